"""Images into tensors for MeCoQ: loading, retrieval splits, view recipe, DataLoaders (METHOD.md §3, §8).

Every function works on a `datasets.Dataset` in one normal form:

- `image`: a `datasets.Image()` column;
- `label`: one class id per image (`ClassLabel`), **or** `labels`: a multi-hot row per image
  (`List(Value("int8"))`, one 0/1 entry per concept, as in Flickr25K and NUS-WIDE); absent when unlabelled;
- `index`: the row's position in the source (int64), kept through every split so that retrieval results
  map back to the source items.

The torch side decodes images itself (from the `{"bytes", "path"}` values of an `Image(decode=False)` column),
so an unreadable file is reported with its path and is raised or skipped as asked (`on_bad_image`).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    List,
    Value,
    load_dataset,
    load_from_disk,
)
from datasets import config as datasets_config
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision import transforms as T

logger = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
BadImagePolicy = Literal["raise", "skip"]
_IDX_UINT8 = 0x08  # idx dtype code of unsigned bytes (the only one Fashion-MNIST uses)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


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


def _load_source(source: Any, split: str | None, labels: Any, cache_dir: str | None) -> tuple[Dataset, bool]:
    """Dispatch on the kind of source; also says whether the images are loose files worth checking."""
    if isinstance(source, (Dataset, DatasetDict)):
        return (
            source if isinstance(source, Dataset) else _pick_split(source, split, "The DatasetDict")
        ), False
    if isinstance(source, (np.ndarray, list, tuple)):
        return dataset_from_arrays(source, labels), False
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Unsupported dataset source of type {type(source).__name__}; see load_image_dataset."
        )
    if str(source) == "fashion-mnist":
        return load_fashion_mnist(split or "train"), False
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = load_from_disk(str(path))
            return (loaded if isinstance(loaded, Dataset) else _pick_split(loaded, split, str(path))), False
        try:
            folder = load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        except FileNotFoundError as exc:  # datasets' EmptyDatasetError
            raise ValueError(
                f"The image folder {path} is empty: {exc}. Expected <root>/<class>/<images>."
            ) from exc
        return _pick_split(folder, split, f"The image folder {path}"), True
    if path.exists() or str(source).startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"{path} is not a folder: expected an image folder or a `save_to_disk` folder."
        )
    loaded = _load_from_hub(str(source), split, cache_dir)
    return (loaded if isinstance(loaded, Dataset) else _pick_split(loaded, split, str(source))), False


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
    fix = "Pass image_column=/label_column= (label_column=None for unlabelled data)."
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
) -> Dataset:
    """Load images from any supported source into the normal form described in the module docstring.

    Args:
        source: an image folder (`<root>/<class>/<file>`), a folder written by `save_to_disk`, the literal
            "fashion-mnist", a Hub dataset name (only where the Hub is reachable), a `Dataset`/`DatasetDict`,
            or in-memory images (uint8 array or list of PIL images; labels via `labels`).
        split (`str`, *optional*): which split of a multi-split source (Fashion-MNIST defaults to "train").
        image_column / label_column: the source's column names; label_column=None for unlabelled data.
        on_bad_image: for image folders every file is decoded once up front; unreadable ones are reported
            with their path, then raised ("raise") or dropped with a warning ("skip").
        cache_dir: cache folder for `load_dataset` (image folders and Hub datasets).
    """
    in_memory = isinstance(source, (np.ndarray, list, tuple))
    if labels is not None and not in_memory:
        raise ValueError("labels= is only for in-memory images; other sources carry their own label column.")
    dataset, loose_files = _load_source(source, split, labels, cache_dir)
    if len(dataset) == 0:
        raise ValueError(f"The dataset loaded from {source!r} is empty (0 rows); check the path and split.")
    if in_memory and labels is None:
        label_column = None
    dataset = _normalize_columns(dataset, image_column, label_column)
    return check_images(dataset, on_bad_image=on_bad_image) if loose_files else dataset


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


def check_images(dataset: Dataset, *, on_bad_image: BadImagePolicy = "raise") -> Dataset:
    """Decode every image once; raise a `BadImageError` listing the unreadable ones, or drop them ("skip")."""
    if on_bad_image not in ("raise", "skip"):
        raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}.")
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
            f"{len(problems)} of {len(dataset)} images cannot be read: {listing}. "
            "Remove or replace these files, or pass on_bad_image='skip' to drop them."
        )
    logger.warning("Dropping %d unreadable images: %s", len(problems), listing)
    return dataset.select([row for row in range(len(dataset)) if row not in problems])


# retrieval splits


def _single_labels(dataset: Dataset) -> np.ndarray | None:
    """(N,) class ids when the dataset has a single-label `label` column, else None."""
    if "label" not in dataset.column_names:
        return None
    table = dataset.select_columns(["label"]).with_format("arrow")[:]  # fast, honours a select() mapping
    return table["label"].to_numpy().astype(np.int64)


def _check_counts(**counts: int) -> None:
    for name, count in counts.items():
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"{name} must be a non-negative number of images, got {count!r}.")


def _even_shares(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` counts that differ by at most one (the first ones get the remainder)."""
    return [total // parts + (part < total % parts) for part in range(parts)]


class _Pools:
    """Per-class (or one global) seeded permutations, consumed from the front in equal per-class shares."""

    def __init__(self, labels: np.ndarray | None, count: int, rng: np.random.Generator) -> None:
        classes = np.unique(labels) if labels is not None else [None]
        self.names = [f"class {c}" if c is not None else "the dataset" for c in classes]
        self.pools = [
            rng.permutation(np.arange(count) if c is None else np.flatnonzero(labels == c)) for c in classes
        ]
        self.cursors = [0] * len(self.pools)

    def take(self, total: int, what: str) -> np.ndarray:
        taken = []
        for position, share in enumerate(_even_shares(total, len(self.pools))):
            pool, cursor = self.pools[position], self.cursors[position]
            if cursor + share > len(pool):
                raise ValueError(
                    f"Not enough images for {what}: {self.names[position]} has {len(pool) - cursor} left, "
                    f"needs {share}. Ask for fewer images or pass per_class=False."
                )
            taken.append(pool[cursor : cursor + share])
            self.cursors[position] += share
        return np.concatenate(taken)

    def rest(self) -> np.ndarray:
        return np.concatenate([pool[cursor:] for pool, cursor in zip(self.pools, self.cursors, strict=True)])


def _to_splits(dataset: Dataset, positions: dict[str, np.ndarray]) -> DatasetDict:
    """Select each split's rows in ascending source order; the `index` column travels with them."""
    if "index" not in dataset.column_names:
        dataset = dataset.add_column("index", np.arange(len(dataset), dtype=np.int64))
    return DatasetDict({name: dataset.select(np.sort(rows)) for name, rows in positions.items()})


def retrieval_splits(
    dataset: Dataset,
    *,
    num_query: int,
    num_validation: int,
    num_train: int | None,
    seed: int = 0,
    per_class: bool = True,
    train_from_database: bool = True,
) -> DatasetDict:
    """Seeded `query` / `validation` / `database` / `train` splits for unsupervised retrieval.

    query, validation and database are pairwise disjoint and together cover the dataset. Validation is the
    held-out query set for model selection, so the query (test) set is never used to pick a checkpoint.
    With single labels and `per_class`, every split draws equal shares per class (1,000 queries on 10
    classes -> 100 per class); with multi-hot or no labels the draw is one global permutation.

    Args:
        num_query / num_validation (`int`): sizes of the query and validation sets.
        num_train (`int` or `None`): training-set size; None -> the whole database.
        seed (`int`): seed of `numpy.random.default_rng`; the same seed gives the same splits.
        per_class (`bool`): stratify by class when single labels exist.
        train_from_database (`bool`): True -> train is a subset of the database (CIFAR-10 II, Flickr25K);
            False -> train is drawn first and is disjoint from the database.
    """
    _check_counts(num_query=num_query, num_validation=num_validation, num_train=num_train or 0)
    labels = _single_labels(dataset) if per_class else None
    pools = _Pools(labels, len(dataset), np.random.default_rng(seed))
    positions = {
        "query": pools.take(num_query, "the query set"),
        "validation": pools.take(num_validation, "validation"),
    }
    if not train_from_database:
        if num_train is None:
            raise ValueError("num_train=None (train = database) needs train_from_database=True.")
        positions["train"] = pools.take(num_train, "the training set")
        positions["database"] = pools.rest()
    else:
        positions["database"] = pools.rest()
        positions["train"] = (
            positions["database"] if num_train is None else pools.take(num_train, "the training set")
        )
    return _to_splits(dataset, positions)


def cifar10_protocol_splits(
    dataset: Dataset, protocol: Literal["I", "II"], *, seed: int = 2021, num_validation: int = 0
) -> DatasetDict:
    """CIFAR-10 protocols of METHOD.md §8 on the merged 60k images (official train then test, `label` column).

    Each class (in label order) is permuted with `numpy.random.RandomState(seed)`: the first 1,000 -> query;
    I: the rest -> database = train; II: positions 1000-1499 -> train, 1000-end -> database. The paper has no
    validation set (it selects on the query set); `num_validation` images (equal shares per class) are taken
    from the end of each class permutation and removed from database and train (query and II-train unchanged).
    """
    if protocol not in ("I", "II"):
        raise ValueError(f"CIFAR-10 protocol must be 'I' or 'II', got {protocol!r}.")
    _check_counts(num_validation=num_validation)
    labels = _single_labels(dataset)
    if labels is None:
        raise ValueError(
            f"CIFAR-10 protocols need a single-label 'label' column; columns: {dataset.column_names}."
        )
    classes = np.unique(labels)
    rng = np.random.RandomState(seed)  # legacy generator, as in the official code
    splits: dict[str, list[np.ndarray]] = {"query": [], "validation": [], "database": [], "train": []}
    for label, held_out in zip(classes, _even_shares(num_validation, len(classes)), strict=True):
        order = rng.permutation(np.flatnonzero(labels == label))
        kept = order[: len(order) - held_out]
        if len(kept) < 1500:
            raise ValueError(
                f"Class {label} keeps {len(kept)} images after validation; CIFAR-10 protocols need >= 1500."
            )
        splits["query"].append(kept[:1000])
        splits["validation"].append(order[len(kept) :])
        splits["database"].append(kept[1000:])
        splits["train"].append(kept[1000:1500] if protocol == "II" else kept[1000:])
    return _to_splits(dataset, {name: np.concatenate(rows) for name, rows in splits.items()})


def flickr25k_splits(
    dataset: Dataset,
    *,
    seed: int = 2021,
    num_query: int = 2000,
    num_train: int = 5000,
    num_validation: int = 0,
) -> DatasetDict:
    """Flickr25K protocol (METHOD.md §8): one `RandomState(seed)` permutation of all rows (unlabelled ones
    included); the first `num_query` -> query, the rest -> database, its first `num_train` -> train.
    `num_validation` rows from the end of the permutation are held out of database and train."""
    _check_counts(num_query=num_query, num_train=num_train, num_validation=num_validation)
    order = np.random.RandomState(seed).permutation(len(dataset))
    kept = order[: len(order) - num_validation]
    if len(kept) < num_query + num_train:
        raise ValueError(
            f"Flickr25K splits need >= {num_query + num_train + num_validation} rows, got {len(dataset)}."
        )
    database = kept[num_query:]
    positions = {"query": kept[:num_query], "validation": order[len(kept) :], "database": database}
    return _to_splits(dataset, positions | {"train": database[:num_train]})


def read_multilabel_list(
    path: str | os.PathLike, *, num_labels: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Parse "relative/path.jpg 0 1 0 ..." lines (NUS-WIDE lists) into paths and an (N, C) int8 multi-hot.

    The last `num_labels` tokens of a line are the labels (inferred from the first line when None).
    """
    paths, rows = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        num_labels = len(tokens) - 1 if num_labels is None else num_labels
        if (
            num_labels < 1
            or len(tokens) <= num_labels
            or any(token not in ("0", "1") for token in tokens[-num_labels:])
        ):
            raise ValueError(
                f"{path}, line {number}: expected a path and {num_labels} 0/1 labels, got {line.strip()!r}."
            )
        paths.append(" ".join(tokens[:-num_labels]))
        rows.append([int(token) for token in tokens[-num_labels:]])
    if not paths:
        raise ValueError(f"{path} lists no images: the dataset would be empty.")
    return paths, np.asarray(rows, dtype=np.int8)


def load_multilabel_list(
    list_file: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    labels_file: str | os.PathLike | None = None,
) -> Dataset:
    """A multi-label dataset from list files: NUS-WIDE style ("path + labels" per line) or, with
    `labels_file`, Flickr25K style (paths in `img.txt`, label rows in `targets.txt`). Images load lazily."""
    if labels_file is None:
        paths, labels = read_multilabel_list(list_file)
    else:
        paths = [line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()]
        labels = np.loadtxt(labels_file, dtype=np.int8, ndmin=2)
        if labels.shape[0] != len(paths):
            raise ValueError(
                f"{list_file} lists {len(paths)} images but {labels_file} has {labels.shape[0]} label rows."
            )
    columns = {
        "image": [str(Path(image_root) / p) for p in paths],
        "labels": labels,
        "index": np.arange(len(paths)),
    }
    features = Features({"image": Image(), "labels": List(Value("int8")), "index": Value("int64")})
    return Dataset.from_dict(columns, features=features)


def nuswide_splits(image_root: str | os.PathLike, list_dir: str | os.PathLike) -> DatasetDict:
    """NUS-WIDE from the fixed lists `test.txt` (query), `database.txt` and `train.txt` (METHOD.md §8).
    `train.txt` falls back to the database list when absent (the official lists are identical). The
    validation split is empty: the fixed protocol has none. `index` is the entry's position in its list."""
    list_dir = Path(list_dir)
    database = load_multilabel_list(list_dir / "database.txt", image_root)
    train = (
        load_multilabel_list(list_dir / "train.txt", image_root)
        if (list_dir / "train.txt").is_file()
        else database
    )
    return DatasetDict(
        query=load_multilabel_list(list_dir / "test.txt", image_root),
        validation=database.select([]),
        database=database,
        train=train,
    )


# transforms (METHOD.md §3)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited onto white; 16-bit grey ("I;16") is scaled by
    1/257; "I" is treated as 16-bit when it exceeds 255; float ("F") images in [0, 1] are scaled by 255."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max() > 255):
            values = values / 257.0
        elif image.mode == "F" and values.max() <= 1.0:
            values = values * 255.0
        image = PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def build_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """One draw of the MeCoQ view recipe (METHOD.md §3.1); wrap it in `TwoViewTransform` for the two views.

    The backbone's mean/std are passed in: (0.5, 0.5, 0.5) for EfficientNet-Lite, ImageNet statistics for
    the paper's VGG-16. The 3x3 blur runs on the PIL image with torchvision instead of OpenCV.
    """
    return T.Compose([
        to_rgb,
        T.RandomResizedCrop(image_size, scale=(0.5, 1.0)),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.7),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=3, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip


class TwoViewTransform:
    """Applies one random transform twice, independently: image -> (view 1, view 2), each (3, H, W)."""

    def __init__(self, transform: Callable[[PIL.Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: PIL.Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.transform!r})"


def build_eval_transform(data_config: dict[str, Any], image_size: int | None = None) -> T.Compose:
    """Query/database transform from a timm data config (`resolve_model_data_config` or the saved
    preprocessor config): RGB, resize to size / crop_pct, centre crop, ToTensor, Normalize.

    `image_size` overrides the config's input size (e.g. 64 px for fast CPU runs). The output is always
    (3, image_size, image_size), also for images smaller than that (28x28 Fashion-MNIST is upsampled).
    """
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {key: data_config[key] for key in keys if key in data_config}
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    if "input_size" not in config:
        raise ValueError(
            f"The data config has no 'input_size' (keys: {sorted(data_config)}); pass image_size=."
        )
    return T.Compose([to_rgb, *create_transform(**config, is_training=False).transforms])


# torch side


class ImageDataset(torch.utils.data.Dataset):
    """Torch view of a normal-form dataset: item = {"pixel_values"[, "pixel_values_2"], "index"[, "labels"]}.

    A transform returning a pair (e.g. `TwoViewTransform`) fills both pixel keys. Unreadable images raise a
    `BadImageError` naming the path, or (on_bad_image="skip") yield None, which the collate functions drop.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[PIL.Image.Image], Any],
        *,
        on_bad_image: BadImagePolicy = "raise",
    ) -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}.")
        _require_columns(dataset, ["image"], "Run load_image_dataset first to normalise the column names.")
        self.label_column = next((c for c in ("label", "labels") if c in dataset.column_names), None)
        columns = ["image"] + [c for c in ("index", self.label_column) if c and c in dataset.column_names]
        self.dataset = dataset.select_columns(columns).cast_column("image", Image(decode=False))
        self.transform, self.on_bad_image = transform, on_bad_image

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict[str, Any] | None:
        row = self.dataset[position]
        try:
            image = decode_image(row["image"], _where(row["image"], position))
        except BadImageError as exc:
            if self.on_bad_image == "raise":
                raise
            logger.warning("Skipping: %s", exc)
            return None
        pixels = self.transform(image)
        item = {"index": row.get("index", position)}
        if isinstance(pixels, tuple):
            item["pixel_values"], item["pixel_values_2"] = pixels
        else:
            item["pixel_values"] = pixels
        if self.label_column:
            item["labels"] = row[self.label_column]
        return item


def _readable(items: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    kept = [item for item in items if item is not None]
    if not kept:
        raise BadImageError(f"All {len(items)} images of a batch were unreadable; run check_images() first.")
    return kept


def collate_train(items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Two-view batch {"pixel_values": (B, 3, H, W), "pixel_values_2": (B, 3, H, W)}; skipped rows dropped."""
    items = _readable(items)
    return {key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "pixel_values_2")}


def collate_eval(items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Evaluation batch: pixel_values (B, 3, H, W), index (B,) int64 and, when labelled, labels as int64:
    (B,) class ids or (B, C) multi-hot."""
    items = _readable(items)
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),  # (B, 3, H, W)
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),  # (B,)
    }
    if "labels" in items[0]:  # (B,) class ids or (B, C) multi-hot
        batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.int64)
    return batch


def make_train_dataloader(
    dataset: Dataset,
    transform: Callable[[PIL.Image.Image], Any],
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    on_bad_image: BadImagePolicy = "raise",
) -> DataLoader:
    """Shuffled two-view loader; the order comes from a generator seeded with `seed` (also seeding workers).

    A single-view `transform` is wrapped in `TwoViewTransform`. With num_workers=0 the augmentations draw
    from torch's global RNG: seed it (e.g. `accelerate.utils.set_seed`) for reproducible views.
    """
    views = transform if isinstance(transform, TwoViewTransform) else TwoViewTransform(transform)
    return DataLoader(
        ImageDataset(dataset, views, on_bad_image=on_bad_image),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_train,
    )


def make_eval_dataloader(
    dataset: Dataset,
    transform: Callable[[PIL.Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    on_bad_image: BadImagePolicy = "raise",
) -> DataLoader:
    """Loader in dataset order yielding {"pixel_values", "index"[, "labels"]} batches (see `collate_eval`)."""
    return DataLoader(
        ImageDataset(dataset, transform, on_bad_image=on_bad_image),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
    )


__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "BadImageError",
    "ImageDataset",
    "TwoViewTransform",
    "build_eval_transform",
    "build_train_transform",
    "check_images",
    "cifar10_protocol_splits",
    "collate_eval",
    "collate_train",
    "dataset_from_arrays",
    "decode_image",
    "flickr25k_splits",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_multilabel_list",
    "make_eval_dataloader",
    "make_train_dataloader",
    "nuswide_splits",
    "read_idx",
    "read_multilabel_list",
    "retrieval_splits",
    "to_rgb",
]
