"""What the search page takes from the rest of mecoq-hf, in one place: model, index, images, one search.

Every access of the page to the model, the code index, its sidecar, the data sources and the run records goes
through this module, so that a change of those APIs is ported here only. Nothing here imports gradio.

- `open_search(model, index, images)` loads the model (folder or Hub id), the index file with its sidecar
  (`retrieval.image_index.ImageIndex`), and the indexed images (from the source the sidecar records, or
  `images`), and checks that the index was built with the model's codebooks.
- `SearchEngine.search(image, k)` ranks the index for one query image as `mecoq search` does
  (`ImageIndex.search`) and returns `Neighbour`s (rank, score, id, label, image).
- `headline_numbers(model_source, model)` gives the model card's headline: bits, bytes per image and mAP.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.sources import DataSource, decode_image
from ..models.loading import load_model
from ..retrieval.image_index import ImageIndex
from ..retrieval.index import CodeIndex
from ..retrieval.sidecar import IndexSidecar

if TYPE_CHECKING:
    import PIL.Image
    from datasets import Dataset

    from ..models.mecoq.modeling_mecoq import MeCoQModel

logger = logging.getLogger(__name__)


class IndexModelMismatchError(ValueError):
    """The index was built with other codebooks than the model that should search it."""


@dataclass(frozen=True)
class Neighbour:
    """One search result: rank (1 = best), score (higher is better), id, label text, image (or None)."""

    rank: int
    score: float
    id: int
    label: str
    image: PIL.Image.Image | None


@dataclass(frozen=True)
class Headline:
    """The model card's headline numbers.

    Args:
        bits: code length, M x log2(K).
        bytes_per_image: M for K <= 256 (one byte per codebook), else None.
        num_codebooks / codebook_size: M and K.
        results: (metric name, dataset, split, value) per recorded retrieval result, test results first.
    """

    bits: float
    bytes_per_image: int | None
    num_codebooks: int
    codebook_size: int
    results: list[tuple[str, str, str | None, float]] = field(default_factory=list)


# the checks and readers the page shares with `mecoq search`


def check_codebooks_match(
    index: CodeIndex, codebooks: torch.Tensor, index_path: str | os.PathLike, model_source: str | os.PathLike
) -> None:
    """`CodeIndex.check_codebooks_match` (the test of `mecoq search`), raising `IndexModelMismatchError`."""
    try:
        index.check_codebooks_match(codebooks, str(model_source), str(index_path))
    except ValueError as error:
        raise IndexModelMismatchError(str(error)) from error


def read_query_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Decode an uploaded file fully; `data.sources.BadImageError` (a ValueError) names the file otherwise."""
    return decode_image({"bytes": None, "path": str(path)}, Path(path).name)


# the engine


class SearchEngine:
    """A model, its code index and, when they could be loaded, the indexed images; built by `open_search`.

    Attributes:
        model_source: the folder or Hub id the model was loaded from.
        index_path: the index file.
        image_problem: why the images cannot be shown (None when they can); results then have no image.
    """

    def __init__(
        self,
        model: MeCoQModel,
        model_source: str,
        image_index: ImageIndex,
        images: Dataset | None,
        image_problem: str | None,
    ) -> None:
        self.model = model
        self.model_source = model_source
        self.image_index = image_index
        self.image_problem = image_problem
        self._images = images
        self._rows = {int(item): row for row, item in enumerate(images["index"])} if images else {}

    @property
    def index_path(self) -> Path | None:
        return self.image_index.path

    @property
    def sidecar(self) -> IndexSidecar | None:
        return self.image_index.sidecar

    @property
    def ntotal(self) -> int:
        return self.image_index.index.ntotal

    @property
    def distance(self) -> str:
        return self.image_index.index.settings.distance

    def ids_without_image(self) -> list[int]:
        """The indexed ids whose image is not in the loaded images (all of them when none are loaded)."""
        return [item for item in self.image_index.index.ids.tolist() if item not in self._rows]

    def image_of(self, item: int) -> PIL.Image.Image | None:
        """The indexed image with id `item`, or None when the images are not available or lack that id."""
        row = self._rows.get(int(item))
        return None if row is None else self._images[row]["image"]

    def search(self, image: PIL.Image.Image, k: int) -> list[Neighbour]:
        """The top-`k` items for one query image (fewer when the index holds fewer), best first."""
        hits = self.image_index.search(self.model, image, k=k)
        return [
            Neighbour(
                rank, hit.score, hit.id, hit.label if hit.label is not None else "-", self.image_of(hit.id)
            )
            for rank, hit in enumerate(hits, start=1)
        ]

    def examples(self, count: int) -> list[tuple[int, str, PIL.Image.Image]]:
        """Up to `count` indexed (id, label, image) triples to start from: one per label, in index order."""
        if self._images is None or count < 1:
            return []
        ids = self.image_index.index.ids.tolist()
        labels = (self.sidecar.label_texts(ids) if self.sidecar else None) or [str(item) for item in ids]
        chosen: dict[str, int] = {}
        for item, label in zip(ids, labels):
            if label not in chosen and int(item) in self._rows:
                chosen[label] = int(item)
                if len(chosen) == count:
                    break
        return [(item, label, self.image_of(item)) for label, item in chosen.items()]


def _load_images(
    sidecar: IndexSidecar | None, images: str | None, index_path: Path
) -> tuple[Dataset | None, str | None]:
    """(the indexed images as a Dataset, None) or (None, why they cannot be loaded, with the fix)."""
    recorded = sidecar.data if sidecar is not None else None
    if images is None and not recorded:
        return None, (
            f"{index_path} does not record where its images are: pass --images SOURCE (the dataset the "
            "index was built from) to see them."
        )
    fields = dict(recorded or {})
    if images is not None:
        fields["source"] = images
    where = fields.get("source")
    try:
        return DataSource(**fields).load(), None
    except (OSError, ValueError, TypeError) as error:
        flag = "--images SOURCE (the dataset the index was built from)"
        fix = f"fix {flag}" if images is not None else f"pass {flag}"
        return (
            None,
            f"The indexed images cannot be loaded from {where!r}: {error} No images are shown; {fix}.",
        )


def open_search(
    model: str | os.PathLike,
    index: str | os.PathLike,
    images: str | None = None,
    *,
    backend: str | None = None,
) -> SearchEngine:
    """Load a model, its index and the indexed images for searching.

    Args:
        model: a model folder (written by `mecoq train` / `save_pretrained`) or a Hub id `namespace/name`.
        index: an index file written by `mecoq index build` (its `.meta.json` sidecar next to it, if any).
        images: where to load the indexed images from instead of the source the sidecar records (same split,
            limit and columns); a dataset source as `mecoq index build --dataset` takes it.
        backend: the index's search backend, a key of `retrieval.backends.BACKENDS`; None: the one
            `mecoq search` uses (IVF for an IVF index, else the faster exhaustive backend).

    Returns:
        A `SearchEngine`. When the images cannot be loaded it still searches; `image_problem` says why.

    Raises:
        FileNotFoundError: the index file does not exist.
        IndexModelMismatchError: the index was built with other codebooks than the model.
        ValueError: the model or the index file cannot be read.
    """
    index_path = Path(index).expanduser()
    image_index = ImageIndex.load(index_path, backend=backend)  # FileNotFoundError / IndexFormatError
    loaded = load_model(model)
    check_codebooks_match(image_index.index, loaded.normalized_codebooks(), index_path, model)
    dataset, image_problem = _load_images(image_index.sidecar, images, index_path)
    engine = SearchEngine(loaded, str(model), image_index, dataset, image_problem)
    missing = engine.ids_without_image()
    if dataset is not None and missing:
        engine.image_problem = (
            f"{len(missing)} of the {engine.ntotal} indexed ids (e.g. {missing[:3]}) are not in the image "
            "source any more: it changed after indexing, so those results show no image. Rebuild the index, "
            "or pass --images SOURCE (the dataset the index was built from)."
        )
    return engine


# headline numbers


def _run_record(model_source: str | os.PathLike, metrics: str | os.PathLike | None) -> dict[str, Any] | None:
    """A local model folder's run record with its `mecoq evaluate --output` report merged in, if any."""
    from ..training.run_folder import METRICS_FILE, RunFolder

    run = RunFolder(Path(model_source).expanduser())
    default = run.path / METRICS_FILE  # where the demo writes it; an explicit file must exist
    return run.card_record(metrics if metrics is not None else default if default.is_file() else None)


def _card_results(model_source: str | os.PathLike, metrics: str | os.PathLike | None) -> list[Any]:
    """The `EvalResult`s the model card reports: built from a folder's run record, or read from a Hub card."""
    from huggingface_hub import ModelCard

    from ..model_card import MeCoQModelCardData

    if Path(model_source).expanduser().is_dir():
        record = _run_record(model_source, metrics)
        return MeCoQModelCardData.from_run_record(record).eval_results if record else []
    try:
        return ModelCard.load(str(model_source)).data.eval_results or []
    except (OSError, ValueError) as error:  # no card, or the Hub is not reachable: no numbers to show
        logger.warning("No model card results for %s: %s", model_source, error)
        return []


def headline_numbers(
    model_source: str | os.PathLike, model: MeCoQModel, metrics: str | os.PathLike | None = None
) -> Headline:
    """Bits, bytes per image and the recorded mAP results of a model, as its model card states them.

    Results come from `metrics` (a `mecoq evaluate --output` file, default `MODEL_DIR/metrics.json`) and
    `MODEL_DIR/run_record.json` for a folder, from the model card's `model-index` for a Hub id.
    """
    num_codebooks, codebook_size = model.config.num_codebooks, model.config.codebook_size
    bits = num_codebooks * math.log2(codebook_size)
    results = [
        (entry.metric_name or entry.metric_type, entry.dataset_name, entry.dataset_split, entry.metric_value)
        for entry in _card_results(model_source, metrics)
        if str(entry.metric_type).lower().startswith("map")
    ]
    results.sort(key=lambda result: result[2] == "validation")  # test results before model selection's
    return Headline(
        bits=int(bits) if bits.is_integer() else round(bits, 2),
        bytes_per_image=num_codebooks if codebook_size <= 256 else None,
        num_codebooks=num_codebooks,
        codebook_size=codebook_size,
        results=results,
    )


def _describe(ntotal: int, distance: str, sidecar: IndexSidecar | None) -> str:
    data = sidecar.data if sidecar is not None else {}
    source = DataSource(**data).name if data.get("source") else "an unrecorded source"
    split = f" ({data['split']} split)" if data.get("split") else ""
    return f"{ntotal} images of {source}{split}, {distance} scores"


def describe_source(engine: SearchEngine) -> str:
    """One line on what the index holds: its size, the data source and the scores."""
    return _describe(engine.ntotal, engine.distance, engine.sidecar)


def describe_index_file(index_path: str | os.PathLike) -> str:
    """`describe_source` for an index file."""
    image_index = ImageIndex.load(index_path)
    return _describe(image_index.index.ntotal, image_index.index.settings.distance, image_index.sidecar)


# the index and images of a Space

SPACE_IMAGES_FOLDER = "images"


def check_index_matches_hub_model(
    index_path: str | os.PathLike, model_repo: str, token: str | bool | None
) -> tuple[int, int]:
    """Check an index against a model repo's `codebooks.safetensors` (downloaded alone, not the weights).

    Returns:
        The model's (M, K): codebooks and codewords per codebook.
    """
    from ..hub import download_codebooks

    index = CodeIndex.load(index_path)  # FileNotFoundError / IndexFormatError name the fix
    codebooks = download_codebooks(model_repo, token=token)  # (M, K, D)
    check_codebooks_match(index, codebooks, index_path, model_repo)
    return codebooks.shape[0], codebooks.shape[1]


def local_image_source(index_path: str | os.PathLike) -> str | None:
    """The source recorded for an index's images when only this machine has it (a path, "fashion-mnist")."""
    sidecar = ImageIndex.load(index_path).sidecar
    data = sidecar.data if sidecar is not None else {}
    return data["source"] if data.get("source") and DataSource(**data).hub_id is None else None


def save_indexed_images(index_path: str | os.PathLike, images: str | None, folder: Path) -> dict[str, Any]:
    """Save the images of an index (only its ids, with their labels) as a `save_to_disk` folder.

    The images come from `images` or the source the sidecar records; image files are embedded, so the folder
    is self-contained. Returns the `DataSource` fields that reload it (the folder as the source).

    Raises:
        ValueError: the images cannot be loaded (the message says why and how to fix it).
    """
    from datasets.table import embed_table_storage

    index_path = Path(index_path)
    dataset, problem = _load_images(ImageIndex.load(index_path).sidecar, images, index_path)
    if dataset is None:
        raise ValueError(problem)
    wanted = set(CodeIndex.load(index_path).ids.tolist())
    rows = [row for row, item in enumerate(dataset["index"]) if int(item) in wanted]
    label = next((name for name in ("labels", "label") if name in dataset.column_names), None)
    subset = dataset.select(rows).select_columns(["image", "index", *([label] if label else [])])
    subset = subset.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    subset.save_to_disk(str(folder))
    return {"source": folder.name, "split": None, "limit": None, "image_column": "image",
            "label_column": label}  # fmt: skip


def write_index_copy(
    index_path: str | os.PathLike, folder: Path, *, model: str, data: dict[str, Any] | None
) -> list[Path]:
    """Write a copy of an index file into `folder` whose description names `model` (a Hub id) and `data`
    (None: as recorded), as one file (format version 2): the codes and their description stay one unit.

    Local image paths are left out of the copy's description: they mean nothing on another machine.
    """
    index_path = Path(index_path)
    image_index = ImageIndex.load(index_path, backend="native")
    recorded = image_index.sidecar
    sidecar = IndexSidecar.describe(
        model=model,
        data=data if data is not None else (recorded.data if recorded else {}),
        ids=image_index.index.ids.tolist(),
        labels=recorded.labels if recorded else None,
        class_names=recorded.class_names if recorded else None,
    )
    return [image_index.index.save(folder / index_path.name, sidecar=sidecar)]


__all__ = [
    "Headline",
    "IndexModelMismatchError",
    "Neighbour",
    "SearchEngine",
    "check_codebooks_match",
    "check_index_matches_hub_model",
    "describe_index_file",
    "describe_source",
    "headline_numbers",
    "local_image_source",
    "open_search",
    "read_query_image",
    "save_indexed_images",
    "write_index_copy",
]
