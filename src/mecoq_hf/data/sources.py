"""Where images come from: loading any supported source into one normal-form `datasets.Dataset`.

Every function works on a `datasets.Dataset` in one normal form:

- `image`: a `datasets.Image()` column;
- `label`: one class id per image (`ClassLabel`), **or** `labels`: a multi-hot row per image
  (`List(Value("int8"))`, one 0/1 entry per concept, as in Flickr25K and NUS-WIDE); absent when unlabelled;
- `index`: the row's position in the source (int64), kept through every split so that retrieval results
  map back to the source items.

Unreadable image files are reported with their path (`check_images`, `decode_image`) and raised or skipped as
asked (`on_bad_image`); the torch loaders of `mecoq_hf.data.loaders` use the same decoding.

`DataSource` is the recordable form of a load (source, split or "train+test", row limit, column names): a run
stores it as plain data and reloads exactly the same images from it later.

Retrieval splits and the paper protocols live in `mecoq_hf.data.splits`; the view recipe and the evaluation
transform in `mecoq_hf.data.transforms`.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets import config as datasets_config

logger = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Licences of the named sources (Hub-style ids), for model cards: Zalando Research's Fashion-MNIST is MIT.
KNOWN_LICENSES = {"fashion-mnist": "mit"}
BadImagePolicy = Literal["raise", "skip"]
_IDX_UINT8 = 0x08  # idx dtype code of unsigned bytes (the only one Fashion-MNIST uses)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)
SKIP_HINT = "--on-bad-image skip (on_bad_image='skip' in Python)"


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names its path (or row)."""


# loading: Fashion-MNIST idx files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzipped idx file (magic: two zero bytes, dtype code 0x08, ndim; big-endian uint32 sizes)."""
    path = Path(path)
    fix = (
        "Install it with `apt-get install dataset-fashion-mnist` or pass root=<folder of the four .gz files>."
    )
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file {path} does not exist. {fix}")
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise ValueError(
            f"{path} is not a complete gzip file ({exc}): it is truncated or corrupt. {fix}"
        ) from exc
    if len(raw) < 4 or raw[:3] != bytes([0, 0, _IDX_UINT8]):
        raise ValueError(
            f"{path} is not a uint8 idx file: magic {raw[:4].hex()}, expected 000008<ndim>. {fix}"
        )
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) != offset + math.prod(shape):
        raise ValueError(
            f"{path} holds {len(raw)} bytes, its header (shape {shape}) needs {offset + math.prod(shape)}: "
            f"the file is truncated or corrupt. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(
    split: Literal["train", "test"] = "train",
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    limit: int | None = None,
) -> Dataset:
    """Fashion-MNIST from the idx files of the Debian package `dataset-fashion-mnist` (60,000 / 10,000).

    Images are stored as uncompressed PGM bytes (28x28, mode "L"), which takes well under a second for the
    60k split, where PNG-encoding every image would take several seconds.

    Args:
        split (`str`): "train" or "test" (the official t10k files).
        root (`str`, *optional*): folder holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`.
        limit (`int`, *optional*): keep only the first `limit` images (in file order).
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}.")
    images = read_idx(Path(root) / f"{prefixes[split]}-images-idx3-ubyte.gz")  # (N, 28, 28)
    labels = read_idx(Path(root) / f"{prefixes[split]}-labels-idx1-ubyte.gz")  # (N,)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} do not match labels {labels.shape}.")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {limit}.")
        images, labels = images[:limit], labels[:limit]
    return dataset_from_arrays(images, labels, class_names=FASHION_MNIST_CLASSES)


# loading: arrays, folders, saved datasets, Hub names


def _pnm_bytes(images: np.ndarray) -> list[bytes]:
    """(N, H, W) or (N, H, W, 3) uint8 -> binary PGM/PPM files, which PIL decodes without decompression."""
    height, width = images.shape[1:3]
    header = f"{'P5' if images.ndim == 3 else 'P6'}\n{width} {height}\n255\n".encode()
    return [header + image.tobytes() for image in images]


def dataset_from_arrays(
    images: np.ndarray | Sequence[PIL.Image.Image | np.ndarray],
    labels: np.ndarray | Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """Build the normal-form dataset from in-memory images.

    Args:
        images: a uint8 array (N, H, W) or (N, H, W, 3) (fast path), or a list of PIL images / uint8 arrays.
        labels: (N,) class ids -> `label` column; (N, C) 0/1 matrix -> multi-hot `labels` column; or None.
        class_names: names of the class ids (defaults to "0", "1", ...).
    """
    if isinstance(images, np.ndarray):
        if (
            images.dtype != np.uint8
            or images.ndim not in (3, 4)
            or (images.ndim == 4 and images.shape[3] != 3)
        ):
            raise TypeError(
                f"Image arrays must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}. "
                "Convert with `(x * 255).round().astype(np.uint8)` or pass a list of PIL images."
            )
        columns: dict[str, Any] = {"image": [{"bytes": b, "path": None} for b in _pnm_bytes(images)]}
    else:
        columns = {"image": list(images)}
    count = len(columns["image"])
    if count == 0:
        raise ValueError("No images given: the dataset would be empty.")
    features = {"image": Image()}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] != count or labels.ndim not in (1, 2):
            raise ValueError(f"Expected labels of shape ({count},) or ({count}, C), got {labels.shape}.")
        if labels.ndim == 2:
            columns["labels"], features["labels"] = labels.astype(np.int8), List(Value("int8"))
        else:
            names = (
                list(class_names)
                if class_names is not None
                else [str(c) for c in range(int(labels.max()) + 1)]
            )
            columns["label"], features["label"] = labels.astype(np.int64), ClassLabel(names=names)
    columns["index"], features["index"] = np.arange(count, dtype=np.int64), Value("int64")
    return Dataset.from_dict(columns, features=Features(features))


def _pick_split(splits: DatasetDict, split: str | None, source: str) -> Dataset:
    if split is None and len(splits) == 1:
        return next(iter(splits.values()))
    if split not in splits:
        raise ValueError(f"{source} has splits {sorted(splits)}; pass split=<one of them> (got {split!r}).")
    return splits[split]


def _load_from_hub(name: str, split: str | None, cache_dir: str | None) -> Dataset | DatasetDict:
    try:
        return load_dataset(name, split=split, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as exc:
        offline = (
            " The Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."
            if datasets_config.HF_HUB_OFFLINE
            else ""
        )
        raise ValueError(
            f"{name!r} is neither a local folder nor a dataset that loads from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}).{offline} Offline, use an image folder, a folder written by "
            "`save_to_disk`, 'fashion-mnist', or in-memory arrays."
        ) from exc


# What a loaded source holds: loose image files (checked when loaded), stored image bytes (checked when
# bad images are to be skipped), or images this module encoded itself (never checked).
_FILES, _STORED, _DECODED = "files", "stored", "decoded"


def _load_source(source: Any, split: str | None, labels: Any, cache_dir: str | None) -> tuple[Dataset, str]:
    """Dispatch on the kind of source; also says what it holds (`_FILES`, `_STORED` or `_DECODED`)."""
    if isinstance(source, (Dataset, DatasetDict)):
        return (
            source if isinstance(source, Dataset) else _pick_split(source, split, "The DatasetDict")
        ), _STORED
    if isinstance(source, (np.ndarray, list, tuple)):
        return dataset_from_arrays(source, labels), _DECODED
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Unsupported dataset source of type {type(source).__name__}; see load_image_dataset."
        )
    if str(source) == "fashion-mnist":
        return load_fashion_mnist(split or "train"), _DECODED
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = load_from_disk(str(path))
            return (loaded if isinstance(loaded, Dataset) else _pick_split(loaded, split, str(path))), _STORED
        _check_file_names(path)
        try:
            folder = load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        except FileNotFoundError as exc:  # datasets' EmptyDatasetError
            raise ValueError(
                f"The image folder {path} is empty: {exc}. Expected <root>/<class>/<images>."
            ) from exc
        return _pick_split(folder, split, f"The image folder {path}"), _FILES
    if path.exists() or str(source).startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"{path} is not a folder: expected an image folder or a `save_to_disk` folder."
        )
    loaded = _load_from_hub(str(source), split, cache_dir)
    return (loaded if isinstance(loaded, Dataset) else _pick_split(loaded, split, str(source))), _STORED


def _check_file_names(folder: Path) -> None:
    """Refuse file names that are not UTF-8 before `datasets` fails on them with a traceback naming none.

    Such names (e.g. Latin-1 bytes from an old archive) reach Python as surrogate escapes, which Arrow cannot
    store.
    """
    undecodable = []
    for parent, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                undecodable.append(os.fsencode(os.path.join(parent, name)))
    if undecodable:
        listing = ", ".join(repr(name)[1:] for name in sorted(undecodable)[:5])
        more = f" and {len(undecodable) - 5} more" if len(undecodable) > 5 else ""
        raise ValueError(
            f"The image folder {folder} holds {len(undecodable)} file or folder name(s) that are not valid "
            f"UTF-8, which `datasets` cannot store: {listing}{more}. Rename them to UTF-8 names (for Latin-1 "
            f"names, `convmv -r -f latin1 -t utf-8 {folder}` lists the renames and --notest applies them), "
            "or move them out of the folder."
        )


def _unlabelled_folder_error(folder: Path) -> ValueError:
    """Why an image folder has no labels: `datasets` takes them from two or more class folders."""
    classes = sorted(
        child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")
    )
    found = f"only one class folder ({classes[0]!r})" if len(classes) == 1 else "no class folders"
    return ValueError(
        f"The image folder {folder} has {found}, so its images have no labels: labels come from two or more "
        "class folders (<root>/<class>/<images>). Add the other classes' folders, or use the images "
        "unlabelled: --label-column none (label_column=None in Python)."
    )


def _require_columns(dataset: Dataset, columns: Sequence[str], fix: str = "") -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Column(s) {missing} not found; the dataset has columns {dataset.column_names}. {fix}"
        )


def _normalize_columns(dataset: Dataset, image_column: str, label_column: str | None) -> Dataset:
    """Rename to `image` / `label` / `labels`, cast the image column to `Image()`, add `index` if absent."""
    if label_column == "label" and "label" not in dataset.column_names and "labels" in dataset.column_names:
        label_column = "labels"
    fix = (
        "Name the columns with --image-column / --label-column (--label-column none: unlabelled images; in "
        "Python image_column= / label_column=None)."
    )
    _require_columns(dataset, [image_column] + ([label_column] if label_column else []), fix)
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if not isinstance(dataset.features["image"], Image):
        try:
            dataset = dataset.cast_column("image", Image())
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"Column {image_column!r} ({dataset.features['image']}) cannot hold images: {exc}"
            ) from exc
    if label_column:
        feature = dataset.features[label_column]
        if isinstance(feature, Value) and feature.dtype == "string":
            dataset, feature = dataset.class_encode_column(label_column), None
        target = "labels" if isinstance(feature, List) else "label"
        if label_column != target:
            dataset = dataset.rename_column(label_column, target)
    if "index" not in dataset.column_names:
        dataset = dataset.add_column("index", np.arange(len(dataset), dtype=np.int64))
    return dataset


def load_image_dataset(
    source: str | os.PathLike | Dataset | DatasetDict | np.ndarray | Sequence[PIL.Image.Image],
    *,
    split: str | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    labels: np.ndarray | Sequence[int] | None = None,
    on_bad_image: BadImagePolicy = "raise",
    cache_dir: str | None = None,
    skipped: list[str] | None = None,
) -> Dataset:
    """Load images from any supported source into the normal form described in the module docstring.

    Args:
        source: an image folder (`<root>/<class>/<file>`), a folder written by `save_to_disk`, the literal
            "fashion-mnist", a Hub dataset name (only where the Hub is reachable), a `Dataset`/`DatasetDict`,
            or in-memory images (uint8 array or list of PIL images; labels via `labels`).
        split (`str`, *optional*): which split of a multi-split source (Fashion-MNIST defaults to "train").
        image_column / label_column: the source's column names; label_column=None for unlabelled data.
        on_bad_image: for image folders every file is decoded once up front; unreadable ones are reported
            with their path, then raised ("raise") or dropped with a warning ("skip"). With "skip" the images
            of saved datasets, Hub datasets and `Dataset` objects are checked up front too.
        cache_dir: cache folder for `load_dataset` (image folders and Hub datasets).
        skipped: a list that receives one line (path and reason) per image dropped by "skip".

    Raises:
        BadImageError: unreadable images with on_bad_image="raise" (the message lists them).
        ValueError: an empty source, missing columns, an image folder without labels (one class folder or
            none) while a label column is asked for, or file names that are not UTF-8.
    """
    in_memory = isinstance(source, (np.ndarray, list, tuple))
    if labels is not None and not in_memory:
        raise ValueError("labels= is only for in-memory images; other sources carry their own label column.")
    dataset, holds = _load_source(source, split, labels, cache_dir)
    if len(dataset) == 0:
        raise ValueError(f"The dataset loaded from {source!r} is empty (0 rows); check the path and split.")
    if in_memory and labels is None:
        label_column = None
    unlabelled = not {"label", "labels"} & set(dataset.column_names)
    if holds == _FILES and label_column in ("label", "labels") and unlabelled:
        raise _unlabelled_folder_error(Path(source).expanduser())
    dataset = _normalize_columns(dataset, image_column, label_column)
    if holds == _FILES or (holds == _STORED and on_bad_image == "skip"):
        return check_images(dataset, on_bad_image=on_bad_image, skipped=skipped)
    return dataset


# bad images


def decode_image(value: dict | PIL.Image.Image, where: str) -> PIL.Image.Image:
    """Decode one `{"bytes", "path"}` value fully, raising `BadImageError` that names `where` on failure."""
    if isinstance(value, PIL.Image.Image):
        return value
    try:
        image = Image().decode_example(value)
        image.load()
        return image
    except _DECODE_ERRORS as exc:
        raise BadImageError(f"Cannot read image {where}: {type(exc).__name__}: {exc}") from exc


def _where(value: Any, row: int) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    return f"{path} (row {row})" if path else f"at row {row}"


def check_images(
    dataset: Dataset, *, on_bad_image: BadImagePolicy = "raise", skipped: list[str] | None = None
) -> Dataset:
    """Decode every image once; raise a `BadImageError` listing the unreadable ones, or drop them ("skip").

    Args:
        dataset: a normal-form dataset.
        on_bad_image: "raise" or "skip".
        skipped: a list that receives one line (path and reason) per dropped image.
    """
    _check_policy(on_bad_image)
    raw = dataset.select_columns(["image"]).cast_column("image", Image(decode=False))
    problems: dict[int, str] = {}
    for start, batch in enumerate(raw.iter(batch_size=256)):
        for offset, value in enumerate(batch["image"]):
            row = start * 256 + offset
            try:
                decode_image(value, _where(value, row))
            except BadImageError as exc:
                problems[row] = str(exc)
    if not problems:
        return dataset
    listing = "; ".join(list(problems.values())[:10]) + (" ..." if len(problems) > 10 else "")
    if on_bad_image == "raise":
        raise BadImageError(
            f"{len(problems)} of {len(dataset)} images cannot be read: {listing}. Remove or replace these "
            f"files, or drop them: {SKIP_HINT}."
        )
    if skipped is None:
        logger.warning("Dropping %d unreadable images: %s", len(problems), listing)
    else:  # the caller reports them
        skipped.extend(problems.values())
    return dataset.select([row for row in range(len(dataset)) if row not in problems])


def _check_policy(on_bad_image: str) -> None:
    if on_bad_image not in ("raise", "skip"):
        raise ValueError(
            f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r} (mecoq: --on-bad-image "
            "raise|skip)."
        )


# sources: where a run's images come from, as recorded in splits.json and index sidecars


@dataclass
class DataSource:
    """Where images come from: a source as `load_image_dataset` takes it, plus a split and a row limit.

    A `DataSource` is plain data (`to_dict`), so a run can record it and reload exactly the same images later
    (`mecoq evaluate`, `mecoq search --grid`).

    Args:
        source (`str`): "fashion-mnist", an image folder, a `save_to_disk` folder, or a Hub dataset name.
            Local paths are stored absolute, so a recorded source still resolves from another working
            directory.
        split (`str`, *optional*): split of a multi-split source; "train+test" concatenates splits in that
            order and re-numbers `index` over the concatenation.
        limit (`int`, *optional*): keep only the first `limit` rows (small CPU runs).
        image_column (`str`, *optional*, defaults to "image"): the source's image column.
        label_column (`str`, *optional*, defaults to "label"): the source's label column; None (or "none"):
            unlabelled images.
        on_bad_image (`str`, *optional*, defaults to "raise"): "raise" on an unreadable image, or "skip" it
            (`load_image_dataset`); after `load`, `skipped_images` lists the skipped ones. Recorded, so that
            a reload drops the same images.
    """

    source: str
    split: str | None = None
    limit: int | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    on_bad_image: str = "raise"

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError(
                "No dataset given: pass --dataset SOURCE (fashion-mnist, a folder or a Hub name)."
            )
        if self.source != "fashion-mnist" and Path(self.source).expanduser().exists():
            self.source = str(Path(self.source).expanduser().resolve())
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {self.limit}.")
        if isinstance(self.label_column, str) and self.label_column.lower() in ("", "none", "null"):
            self.label_column = None  # unlabelled images
        _check_policy(self.on_bad_image)
        self.skipped_images: list[str] = []  # filled by `load` (not a field: never recorded)

    @property
    def name(self) -> str:
        """A short display name: the literal, the folder name, or the Hub id."""
        return Path(self.source).name if os.path.isabs(self.source) else self.source

    @property
    def hub_id(self) -> str | None:
        """The Hub dataset id when the source is one (neither "fashion-mnist" nor a local path), else None."""
        return None if self.source == "fashion-mnist" or os.path.isabs(self.source) else self.source

    @property
    def license(self) -> str | None:
        """The licence id of the source's images where it is known (`KNOWN_LICENSES`), else None."""
        return KNOWN_LICENSES.get(self.source)

    def load(self) -> Dataset:
        """The images in the normal form of this module (`image`, `label`/`labels`, `index`); with "skip",
        `skipped_images` then lists the dropped images (path and reason)."""
        names = self.split.split("+") if self.split else [None]
        self.skipped_images = []
        parts = [
            load_image_dataset(self.source, split=name, image_column=self.image_column,
                               label_column=self.label_column, on_bad_image=self.on_bad_image,
                               skipped=self.skipped_images)
            for name in names
        ]  # fmt: skip
        images = parts[0]
        if len(parts) > 1:  # one numbering over the concatenation, in the order given
            images = concatenate_datasets([part.remove_columns("index") for part in parts])
            images = images.add_column("index", list(range(len(images))))
        if self.limit is not None and self.limit < len(images):
            images = images.select(range(self.limit))
        return images

    def images_by_id(self, ids: Sequence[int]) -> list[PIL.Image.Image]:
        """The images whose `index` value is in `ids`, in that order, reloaded from the source.

        Raises `ValueError` when an id is no longer there (the source changed since the ids were recorded).
        """
        images = self.load()
        positions = {int(item): row for row, item in enumerate(images["index"])}
        missing = [item for item in ids if item not in positions]
        if missing:
            raise ValueError(
                f"Ids {missing[:5]} are no longer in {self.source!r}: the dataset changed after indexing."
            )
        return [images[positions[item]]["image"] for item in ids]

    def to_dict(self) -> dict[str, Any]:
        """The fields of this source (not of a subclass), JSON-ready: `DataSource(**to_dict())` rebuilds
        it."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(DataSource)}


def image_paths(dataset: Dataset) -> list[str | None]:
    """The file path of every image in row order; None for images stored as bytes (e.g. Fashion-MNIST)."""
    raw = dataset.select_columns(["image"]).cast_column("image", Image(decode=False)).with_format("arrow")[:]
    return raw["image"].combine_chunks().field("path").to_pylist()


def class_names(dataset: Dataset) -> list[str] | None:
    """The names of the class ids of a single-label dataset (its `ClassLabel` feature), else None."""
    feature = dataset.features.get("label")
    return list(feature.names) if isinstance(feature, ClassLabel) else None


__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "KNOWN_LICENSES",
    "SKIP_HINT",
    "BadImageError",
    "DataSource",
    "check_images",
    "class_names",
    "dataset_from_arrays",
    "decode_image",
    "image_paths",
    "load_fashion_mnist",
    "load_image_dataset",
    "read_idx",
]
