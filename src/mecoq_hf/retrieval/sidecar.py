"""What the ids of an index stand for: the model the codes were made with, how to reload the indexed images
(a `data.DataSource` dict), and per id its label and image file path, so that a search can print labels and
paths and draw the retrieved images.

Index files of format version 2 store this description inside the index file, under its checksum
(`sidecar_file_entries` / `sidecar_from_file`): codes and labels are one unit. Version 1 files kept it in a
JSON file next to the index (`x.safetensors` -> `x.meta.json`), which `IndexSidecar.load` still reads; a
reader checks that its ids are the index's (`check_matches`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..file_io import read_json, write_json

if TYPE_CHECKING:
    import PIL.Image

    from ..data.sources import DataSource

SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = "mecoq-hf/index-sidecar"
SIDECAR_VERSION = 1


def sidecar_path(index_path: str | os.PathLike) -> Path:
    """`index.safetensors` -> `index.meta.json`: where the description of an index's items is stored."""
    return Path(index_path).with_suffix(SIDECAR_SUFFIX)


@dataclass(frozen=True)
class IndexSidecar:
    """The description of an index's items, saved next to the index file.

    Args:
        model (`str`): the model the codes were made with: an absolute folder path or a Hub id.
        data (`dict`): how to reload the indexed images, e.g. `data.DataSource.to_dict()`.
        ids (`list[int]`): the index's ids, in insertion order.
        labels (`list`, *optional*): one label per id (a class id or a multi-hot list); None if unlabelled.
        class_names (`list[str]`, *optional*): the names of the class ids, if known.
        paths (`list`, *optional*): one image file path per id (None for images stored as bytes); None when
            no image has a file.
    """

    model: str
    data: dict[str, Any]
    ids: list[int]
    labels: list[Any] | None = None
    class_names: list[str] | None = None
    paths: list[str | None] | None = None

    @classmethod
    def describe(
        cls,
        *,
        model: str | os.PathLike,
        data: Mapping[str, Any],
        ids: Sequence[int],
        labels: Sequence[Any] | None = None,
        class_names: Sequence[str] | None = None,
        paths: Sequence[str | None] | None = None,
    ) -> IndexSidecar:
        """A sidecar in normal form: a model folder as an absolute path, plain lists, `paths` only if any."""
        model_folder = Path(model).expanduser()
        return cls(
            model=str(model_folder.resolve()) if model_folder.is_dir() else str(model),
            data=dict(data),
            ids=[int(item) for item in ids],
            labels=list(labels) if labels is not None else None,
            class_names=list(class_names) if class_names is not None else None,
            paths=list(paths) if paths is not None and any(paths) else None,
        )

    def __post_init__(self) -> None:
        for name in ("labels", "paths"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.ids):
                raise ValueError(f"The sidecar has {len(self.ids)} ids but {len(values)} {name}.")

    # files

    def save(self, index_path: str | os.PathLike) -> Path:
        """Write the sidecar of `index_path` (`sidecar_path`) atomically; returns its path."""
        document = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "model": self.model,
            "data": self.data,
            "class_names": self.class_names,
            "ids": self.ids,
            "labels": self.labels,
            "paths": self.paths,
        }
        return write_json(sidecar_path(index_path), document, indent=None)

    @classmethod
    def load(cls, index_path: str | os.PathLike) -> IndexSidecar | None:
        """The sidecar saved for `index_path`, or None when there is none.

        Raises `ValueError` when the file is damaged or is not a mecoq index sidecar.
        """
        path = sidecar_path(index_path)
        if not path.is_file():
            return None
        document = read_json(path, "Index sidecar")
        if not isinstance(document, dict) or document.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{path} is not a mecoq index sidecar (format {SIDECAR_FORMAT!r} expected).")
        fields = ("model", "data", "ids", "labels", "class_names", "paths")
        if not {"model", "data", "ids"} <= set(document) or not isinstance(document["ids"], list):
            raise ValueError(f"{path} lacks the model, data or ids of the index; rebuild the index.")
        return cls(**{name: document.get(name) for name in fields})

    @cached_property
    def _labels_by_id(self) -> dict[int, Any]:
        return dict(zip(self.ids, self.labels or []))

    @cached_property
    def _paths_by_id(self) -> dict[int, str | None]:
        return dict(zip(self.ids, self.paths or []))

    def check_matches(self, ids: torch.Tensor, where: str) -> None:
        """Raise a ValueError unless this description is of exactly these (N,) ids, in order."""
        if len(self.ids) != ids.numel() or self.ids != ids.tolist():
            raise ValueError(
                f"{where} describes {len(self.ids)} items that are not the index's {ids.numel()} items: the "
                "index and its description come from different builds (or were edited). Rebuild the index "
                "with `mecoq index build`."
            )

    # what the ids of search results stand for

    def label_texts(self, ids: Sequence[int]) -> list[str] | None:
        """The label of each id as text (class names where known, "-" for none); None if unlabelled."""
        if self.labels is None:
            return None
        by_id = self._labels_by_id
        return [_label_text(by_id[item], self.class_names) if item in by_id else "-" for item in ids]

    def paths_of(self, ids: Sequence[int]) -> list[str | None] | None:
        """The image file path of each id (None where unknown); None when no image has a file."""
        if self.paths is None:
            return None
        by_id = self._paths_by_id
        return [by_id.get(item) for item in ids]

    def data_source(self) -> DataSource:
        """The recorded data source of the indexed images (`data.DataSource`; `.load()` gives the dataset)."""
        from ..data.sources import DataSource

        return DataSource(**self.data)

    def images(self, ids: Sequence[int]) -> list[PIL.Image.Image]:
        """The images of `ids`, in that order, reloaded from the recorded data source."""
        return self.data_source().images_by_id(list(ids))


# inside an index file (format version 2)


def sidecar_file_entries(sidecar: IndexSidecar) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensor plans and header entries that store `sidecar` inside an index file (its ids are the index's).

    Labels become a (N,) int64 tensor (class ids) or a (N, C) int8 tensor (multi-hot); paths a UTF-8 byte
    tensor `paths.bytes` with (N + 1,) int64 `paths.offsets` (an empty path: no file).
    """
    from .index_file import TensorPlan

    tensors: dict[str, torch.Tensor] = {}
    if sidecar.labels is not None:
        multi_hot = bool(sidecar.labels) and isinstance(sidecar.labels[0], list)
        tensors["labels"] = torch.tensor(sidecar.labels, dtype=torch.int8 if multi_hot else torch.int64)
        if not sidecar.labels:
            tensors["labels"] = torch.empty(0, dtype=torch.int64)
    if sidecar.paths is not None:
        tensors["paths.bytes"], tensors["paths.offsets"] = pack_paths(sidecar.paths)
    return {name: TensorPlan.of(tensor) for name, tensor in tensors.items()}, describe_header(sidecar)


def describe_header(sidecar: IndexSidecar) -> dict[str, str]:
    """The header entries of a description: the model, the data source and the class names."""
    return {
        "model": sidecar.model,
        "data": json.dumps(sidecar.data, sort_keys=True),
        "class_names": json.dumps(sidecar.class_names),
        "described": "true",
    }


def pack_paths(paths: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) uint8 UTF-8 bytes of all paths and (N + 1,) int64 offsets; None is stored as an empty path."""
    encoded = [(path or "").encode() for path in paths]
    lengths = torch.tensor([len(item) for item in encoded], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    data = (
        torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)
        if offsets[-1]
        else torch.empty(0, dtype=torch.uint8)
    )
    return data, offsets


def unpack_paths(data: torch.Tensor, offsets: torch.Tensor) -> list[str | None]:
    """The inverse of `pack_paths`."""
    raw, bounds = data.numpy().tobytes(), offsets.tolist()
    return [raw[start:end].decode() or None for start, end in zip(bounds[:-1], bounds[1:])]


def sidecar_from_file(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], ids: torch.Tensor
) -> IndexSidecar | None:
    """The description stored in a version-2 index file, or None if it was saved without one."""
    if metadata.get("described") != "true":
        return None
    labels = tensors.get("labels")
    paths = None
    if "paths.bytes" in tensors:
        paths = unpack_paths(tensors["paths.bytes"], tensors["paths.offsets"])
    for name, values in (("labels", labels), ("paths", paths)):
        if values is not None and len(values) != ids.numel():
            raise ValueError(
                f"The index file has {ids.numel()} ids but {len(values)} {name}; it was damaged."
            )
    return IndexSidecar(
        model=metadata["model"],
        data=json.loads(metadata["data"]),
        ids=ids.tolist(),
        labels=labels.tolist() if labels is not None else None,
        class_names=json.loads(metadata["class_names"]),
        paths=paths,
    )


def _label_text(label: Any, class_names: list[str] | None) -> str:
    if isinstance(label, list):  # multi-hot
        return ",".join(class_names[i] if class_names else str(i) for i, on in enumerate(label) if on) or "-"
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


__all__ = ["SIDECAR_FORMAT", "SIDECAR_SUFFIX", "IndexSidecar", "sidecar_path"]
