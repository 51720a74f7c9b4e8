"""An index of an image dataset: a `CodeIndex` and the description of its items (`IndexSidecar`), built from a
model and searched with images; both are saved as one file (`CodeIndex.save(path, sidecar=...)`).
`sharded_build.build_index` builds the same file in shards (bounded memory, several processes, resumable).

What `mecoq index build` and `mecoq search` do, as a library (`source` a `data.DataSource`):

    built = ImageIndex.build(model, source.load(), model_source="runs/fmnist", data=source.to_dict())
    built.save("fmnist.safetensors")
    index = ImageIndex.load("fmnist.safetensors")
    hits = index.search(index.load_model(), "query.png", k=5)  # [SearchHit(id, score, label, path), ...]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..file_io import check_readable
from .index import CodeIndex
from .sidecar import IndexSidecar, sidecar_path

if TYPE_CHECKING:
    import PIL.Image
    from accelerate import Accelerator
    from datasets import Dataset

    from ..models.mecoq.modeling_mecoq import MeCoQModel


BUILD_FIX = "Build it with `mecoq index build` or `CodeIndex.save`."


class SearchHit(NamedTuple):
    """One search result: the item's id and score, its label as text and its image path, where recorded."""

    id: int
    score: float
    label: str | None
    path: str | None


@dataclass
class ImageIndex:
    """A `CodeIndex` of images with the `IndexSidecar` that says what its ids are.

    Args:
        index: the codes, ids and codebooks.
        sidecar: the description of the items; None for an index file saved without one.
        path: the file the index was loaded from, if any (named in error messages).
    """

    index: CodeIndex
    sidecar: IndexSidecar | None
    path: Path | None = None

    @classmethod
    def build(
        cls,
        model: MeCoQModel,
        images: Dataset,
        *,
        model_source: str | os.PathLike,
        data: dict[str, Any],
        accelerator: Accelerator | None = None,
        distance: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        show_progress_bar: bool = True,
    ) -> ImageIndex:
        """Hard-code every image of a normal-form dataset and index it under its `index` column.

        Args:
            model: the model that makes the codes; its config gives the scoring (`CodeIndex.from_model`).
            images: a dataset with an `image` column (labels and file paths are recorded when present).
            model_source: where the model was loaded from (a folder or a Hub id), for the sidecar.
            data: how to reload the images, e.g. `data.DataSource.to_dict()`, for the sidecar.
            accelerator: split the encoding over its processes (every process gets the full index).
            distance: overrides the config's `distance`.
            batch_size, num_workers, show_progress_bar: of the encoding (`encoding.encode_images`).
        """
        from ..data.sources import class_names, image_paths
        from ..encoding import encode_images

        encoded = encode_images(model, images, accelerator, method="encode", batch_size=batch_size,
                                num_workers=num_workers, show_progress_bar=show_progress_bar)  # fmt: skip
        index = CodeIndex.from_model(model, distance=distance)
        index.add(encoded.outputs, ids=encoded.ids)
        labels = encoded.labels.tolist() if encoded.labels is not None else None
        sidecar = IndexSidecar.describe(
            model=model_source, data=data, ids=index.ids.tolist(), labels=labels,
            class_names=class_names(images), paths=image_paths(images),
        )  # fmt: skip
        return cls(index, sidecar)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index and its description as one file (format version 2, one checksum); returns the path.

        A JSON sidecar left next to it by an older version is removed: it described an earlier build.
        """
        written = self.index.save(path, sidecar=self.sidecar)
        sidecar_path(written).unlink(missing_ok=True)
        self.path = written
        return written

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, backend: str | None = None, **backend_options: Any
    ) -> ImageIndex:
        """Read an index file with its description; `backend` and its options as in `CodeIndex.load`.

        backend None: "ivf" for an index built with IVF lists, else the faster exhaustive backend
        (`backends.exhaustive_backend`). A version-1 file's description is its JSON sidecar, checked to
        describe the same ids (a sidecar of another build is refused).
        """
        backend = backend or default_backend(path)
        index, sidecar = CodeIndex.load_with_sidecar(path, backend=backend, **backend_options)
        if index.file.version == 1:
            sidecar = IndexSidecar.load(path)
            if sidecar is not None:
                sidecar.check_matches(index.ids, str(sidecar_path(path)))
        return cls(index, sidecar, Path(path))

    # the model

    def model_source(self, override: str | os.PathLike | None = None) -> str:
        """`override`, else the model recorded in the sidecar; a ValueError when there is neither."""
        if override is not None:
            return str(override)
        if self.sidecar is None:
            name = sidecar_path(self.path).name if self.path is not None else "sidecar"
            raise ValueError(f"No model: pass --model MODEL_DIR (the index has no {name}).")
        return self.sidecar.model

    def load_model(self, override: str | os.PathLike | None = None) -> MeCoQModel:
        """The model of `model_source(override)`, checked to hold the codebooks the codes were made with."""
        from ..models.loading import load_model

        source = self.model_source(override)
        model = load_model(source)
        self.index.check_codebooks_match(model.normalized_codebooks(), source, str(self.path or "The index"))
        return model

    # search

    def search(
        self, model: MeCoQModel, image: PIL.Image.Image | str | os.PathLike, k: int
    ) -> list[SearchHit]:
        """The k best items for one query image (a PIL image or a file path), best first, found ones only.

        `model` must be the one the index was built with (see `load_model`).
        """
        from ..encoding import embed_images

        query = embed_images(model, [read_image(image)])  # (1, d)
        scores, ids = self.index.search(query, k=k)
        found = ids[0] >= 0
        scores, ids = scores[0][found].tolist(), ids[0][found].tolist()
        labels = self.sidecar.label_texts(ids) if self.sidecar is not None else None
        paths = self.sidecar.paths_of(ids) if self.sidecar is not None else None
        return [
            SearchHit(item, score, labels[rank] if labels else None, paths[rank] if paths else None)
            for rank, (item, score) in enumerate(zip(ids, scores))
        ]

    def images(self, ids: list[int]) -> list[PIL.Image.Image]:
        """The indexed images of `ids`, reloaded from the data source recorded in the sidecar."""
        if self.sidecar is None:
            name = sidecar_path(self.path).name if self.path is not None else "sidecar"
            raise ValueError(
                f"The database images are recorded in {name} by `mecoq index build`; it is missing."
            )
        return self.sidecar.images(ids)


def default_backend(path: str | os.PathLike) -> str:
    """The backend `ImageIndex.load` uses for an index file when none is named (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    from .backends import exhaustive_backend
    from .scoring import SearchSettings

    try:
        with safe_open(check_readable(path, "Index file", BUILD_FIX), framework="pt") as file:
            names, metadata = set(file.keys()), file.metadata() or {}
            shape = tuple(
                int(metadata.get(key, 0)) for key in ("num_codebooks", "codebook_size", "subvector_dim")
            )
            distance = metadata.get("distance", "asymmetric")
    except (SafetensorError, ValueError):
        return "native"  # `CodeIndex.load` names what is wrong with the file
    if "ivf.centroids" in names:
        return "ivf"
    import torch

    settings = SearchSettings(distance if distance in ("asymmetric", "symmetric") else "asymmetric")
    return exhaustive_backend(torch.empty(shape), settings)


def read_image(image: PIL.Image.Image | str | os.PathLike) -> PIL.Image.Image:
    """A PIL image as given, or read fully from a file path (FileNotFoundError when there is none)."""
    if not isinstance(image, (str, os.PathLike)):
        return image
    from ..data.sources import decode_image

    path = Path(image).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Query image {path} does not exist.")
    return decode_image({"bytes": None, "path": str(path)}, str(path))


__all__ = ["ImageIndex", "SearchHit", "default_backend", "read_image"]
