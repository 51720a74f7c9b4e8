"""Retrieval splits of a normal-form dataset (see `mecoq_hf.data`): query / validation / database / train.

- `retrieval_splits`: seeded, optionally class-stratified splits for any dataset;
- the paper protocols of docs/method.md §8: CIFAR-10 I and II (`cifar10_protocol_splits`), Flickr25K
  (`flickr25k_splits`) and NUS-WIDE from its fixed list files (`nuswide_splits`);
- multi-label list files (NUS-WIDE "path + 0/1 labels" lines, Flickr25K `img.txt` + `targets.txt`);
- `SplitDefinition`: a data source plus one of these protocols, recorded in a run's `splits.json` with a
  fingerprint of every split, so that evaluation rebuilds exactly the splits a model was trained on.

Every split keeps the `index` column, so retrieval results map back to the source rows. The split functions
need only numpy and `datasets`; `SplitDefinition` loads its images through `data.DataSource`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value

from ..file_io import read_json, write_json
from .sources import DataSource

SPLITS_FILE = "splits.json"
SPLITS_FORMAT = "mecoq-hf/splits"
PROTOCOLS = ("random", "cifar10-i", "cifar10-ii", "flickr25k")

# helpers


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
                    f"needs {share}. Ask for fewer images (mecoq: --num-query, --num-validation, "
                    "--train-size), or draw without classes (--set data.per_class=false; per_class=False)."
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


# generic splits


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


# paper protocols (docs/method.md §8)


def cifar10_protocol_splits(
    dataset: Dataset, protocol: Literal["I", "II"], *, seed: int = 2021, num_validation: int = 0
) -> DatasetDict:
    """CIFAR-10 protocols of docs/method.md §8 on the merged 60k images (official train then test, `label`
    column).

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
    """Flickr25K protocol (docs/method.md §8): one `RandomState(seed)` permutation of all rows (unlabelled
    ones included); the first `num_query` -> query, the rest -> database, its first `num_train` -> train.
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


# multi-label list files (NUS-WIDE, Flickr25K)


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
    """NUS-WIDE from the fixed lists `test.txt` (query), `database.txt` and `train.txt` (docs/method.md §8).
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


# recorded splits (splits.json)


def split_fingerprint(split: Dataset) -> str:
    """sha256 of a split's `index` column: proves that a rebuilt split holds exactly the recorded items."""
    index = np.asarray(split["index"] if len(split) else [], dtype=np.int64)
    return hashlib.sha256(index.tobytes()).hexdigest()


@dataclass
class SplitDefinition(DataSource):
    """A `DataSource` plus how it splits into query / validation / database / train.

    Training records it in `<output_dir>/splits.json` (`save`) together with each split's size and a
    fingerprint of its `index` column; evaluation rebuilds the splits from it (`read`, `build`) and checks
    the fingerprints (`check_against`), so a model is tested on exactly the splits it was selected on.

    Args:
        protocol (`str`, *optional*, defaults to "random"): "random" (`retrieval_splits`), "cifar10-i" /
            "cifar10-ii" (`cifar10_protocol_splits`, fixed 1,000 queries per class; use split "train+test"
            for the merged 60k images) or "flickr25k" (`flickr25k_splits`).
        num_query, num_validation, num_train (`int`): split sizes (num_train None: train = the whole database;
            Flickr25K: 5,000).
        seed (`int`, *optional*, defaults to 2021): seed of the split draw (the paper's).
        per_class, train_from_database (`bool`): as in `retrieval_splits`.
        The other arguments are `DataSource`'s.

    Example:
        >>> definition = SplitDefinition(source="fashion-mnist", limit=100, num_query=10, num_validation=10)
        >>> splits = definition.build()
        >>> definition.describe(splits)
        'fashion-mnist: random splits (seed 2021): 10 query, 10 validation, 80 database, 80 train'
    """

    protocol: str = "random"
    num_query: int = 1000
    num_validation: int = 1000
    num_train: int | None = None
    seed: int = 2021
    per_class: bool = True
    train_from_database: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")

    def build(self) -> DatasetDict:
        """Load the images and split them: a `DatasetDict` with query, validation, database and train.

        Raises:
            ValueError: the images are unlabelled but validation queries are asked for (they select the
                model by mAP, which needs labels), or the splits do not fit the data.
        """
        images = self.load()
        if self.num_validation and not {"label", "labels"} & set(images.column_names):
            raise ValueError(
                f"{self.name} is unlabelled, but {self.num_validation} validation queries were asked for: "
                "validation selects the model by mAP, which needs labels. Train without validation "
                "(mecoq train --num-validation 0; data.num_validation=0): the last epoch's model is kept."
            )
        if self.protocol in ("cifar10-i", "cifar10-ii"):
            protocol = "I" if self.protocol == "cifar10-i" else "II"
            return cifar10_protocol_splits(
                images, protocol, seed=self.seed, num_validation=self.num_validation
            )
        if self.protocol == "flickr25k":
            return flickr25k_splits(
                images,
                seed=self.seed,
                num_query=self.num_query,
                num_train=self.num_train or 5000,
                num_validation=self.num_validation,
            )
        return retrieval_splits(
            images,
            num_query=self.num_query,
            num_validation=self.num_validation,
            num_train=self.num_train,
            seed=self.seed,
            per_class=self.per_class,
            train_from_database=self.train_from_database,
        )

    def describe(self, splits: DatasetDict) -> str:
        """One line for logs and model cards: source, protocol, seed and the size of each split."""
        sizes = ", ".join(
            f"{len(splits[name])} {name}" for name in ("query", "validation", "database", "train")
        )
        return f"{self.name}: {self.protocol} splits (seed {self.seed}): {sizes}"

    def record(self, splits: DatasetDict) -> dict[str, Any]:
        """The `splits.json` content: this definition, the split sizes and their fingerprints."""
        return {
            "format": SPLITS_FORMAT,
            "version": 1,
            "definition": dataclasses.asdict(self),
            "sizes": {name: len(split) for name, split in splits.items()},
            "fingerprints": {name: split_fingerprint(split) for name, split in splits.items()},
            "skipped_images": list(self.skipped_images),  # unreadable images dropped by on_bad_image="skip"
        }

    def save(self, splits: DatasetDict, folder: str | os.PathLike) -> Path:
        """Write `record(splits)` to `<folder>/splits.json` atomically; call it on the main process only."""
        return write_json(Path(folder) / SPLITS_FILE, self.record(splits))

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[SplitDefinition, dict[str, Any]]:
        """(definition, full record) from a `splits.json` written by `save`."""
        path = Path(path)
        record = read_json(path, "Split record")
        if not isinstance(record, dict) or record.get("format") != SPLITS_FORMAT:
            raise ValueError(f"{path} is not a mecoq split record (format {SPLITS_FORMAT!r} expected).")
        definition = record.get("definition") or {}
        unknown = sorted(set(definition) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"{path} records unknown data settings {unknown}: it was written by another mecoq-hf version "
                "or edited by hand. Remove those keys, or train again to record the splits."
            )
        return cls(**definition), record

    def check_against(self, splits: DatasetDict, record: dict[str, Any], fix: str) -> None:
        """Raise `ValueError` (with `fix` as the advice) if the rebuilt splits differ from the recorded
        ones."""
        for name, expected in (record.get("fingerprints") or {}).items():
            if name in splits and split_fingerprint(splits[name]) != expected:
                raise ValueError(
                    f"The {name} split built from {self.source!r} differs from the one recorded in "
                    f"{SPLITS_FILE}: the data or the split options changed since. {fix}"
                )


__all__ = [
    "PROTOCOLS",
    "SPLITS_FILE",
    "SPLITS_FORMAT",
    "SplitDefinition",
    "cifar10_protocol_splits",
    "flickr25k_splits",
    "load_multilabel_list",
    "nuswide_splits",
    "read_multilabel_list",
    "retrieval_splits",
    "split_fingerprint",
]
