"""What the ids of an index file stand for: a JSON sidecar next to it (`x.safetensors` -> `x.meta.json`).

The index holds only codes and ids; the sidecar records the model the codes were made with, how to reload
the indexed images (a `data.DataSource` dict), and per id its label and image file path, so that a search can
print labels and paths and draw the retrieved images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..file_io import read_json, write_json

if TYPE_CHECKING:
    import PIL.Image

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

    # what the ids of search results stand for

    def label_texts(self, ids: Sequence[int]) -> list[str] | None:
        """The label of each id as text (class names where known, "-" for none); None if unlabelled."""
        if self.labels is None:
            return None
        by_id = dict(zip(self.ids, self.labels))
        return [_label_text(by_id[item], self.class_names) if item in by_id else "-" for item in ids]

    def paths_of(self, ids: Sequence[int]) -> list[str | None] | None:
        """The image file path of each id (None where unknown); None when no image has a file."""
        if self.paths is None:
            return None
        by_id = dict(zip(self.ids, self.paths))
        return [by_id.get(item) for item in ids]

    def images(self, ids: Sequence[int]) -> list[PIL.Image.Image]:
        """The images of `ids`, in that order, reloaded from the recorded data source."""
        from ..data.sources import DataSource

        return DataSource(**self.data).images_by_id(list(ids))


def _label_text(label: Any, class_names: list[str] | None) -> str:
    if isinstance(label, list):  # multi-hot
        return ",".join(class_names[i] if class_names else str(i) for i, on in enumerate(label) if on) or "-"
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


__all__ = ["SIDECAR_FORMAT", "SIDECAR_SUFFIX", "IndexSidecar", "sidecar_path"]
