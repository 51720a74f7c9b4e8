"""Tests for mecoq_hf.splits on real Fashion-MNIST: seeded retrieval splits, paper protocols, list files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from real_data import LITE0_DATA_CONFIG, require_fashion_mnist

from mecoq_hf.data.loaders import make_eval_dataloader
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.splits import (
    SplitDefinition,
    cifar10_protocol_splits,
    flickr25k_splits,
    load_multilabel_list,
    nuswide_splits,
    read_multilabel_list,
    retrieval_splits,
    split_fingerprint,
)
from mecoq_hf.data.transforms import build_eval_transform

require_fashion_mnist()


def index_set(split: Dataset) -> set[int]:
    return set(split["index"][:])


@pytest.fixture(scope="session")
def fmnist_test() -> Dataset:
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def fmnist_train() -> Dataset:
    dataset = load_fashion_mnist("train")
    return dataset


# splits


def test_retrieval_splits_sizes_disjointness_balance(fmnist_test):
    splits = retrieval_splits(fmnist_test, num_query=1000, num_validation=200, num_train=500, seed=3)
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"query": 1000, "validation": 200, "database": 8800, "train": 500}
    query, validation, database, train = (
        index_set(splits[name]) for name in ("query", "validation", "database", "train")
    )
    assert not query & validation and not query & database and not validation & database
    assert query | validation | database == set(range(10_000))
    assert train <= database
    for name, per_class in (("query", 100), ("validation", 20), ("train", 50)):
        assert np.bincount(splits[name]["label"][:]).tolist() == [per_class] * 10
    row = splits["query"][7]  # the index column maps a split row back to its source row
    np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(fmnist_test[row["index"]]["image"]))


def test_retrieval_splits_are_reproducible_by_seed(fmnist_test):
    first, again, other = (
        retrieval_splits(fmnist_test, num_query=100, num_validation=50, num_train=100, seed=seed)
        for seed in (0, 0, 1)
    )
    assert all(first[name]["index"][:] == again[name]["index"][:] for name in first)
    assert first["query"]["index"][:] != other["query"]["index"][:]


def test_retrieval_splits_options(fmnist_test):
    uneven = retrieval_splits(fmnist_test, num_query=15, num_validation=0, num_train=None, seed=0)
    counts = np.bincount(uneven["query"]["label"][:], minlength=10)
    assert counts.sum() == 15 and set(counts.tolist()) == {1, 2}
    assert len(uneven["validation"]) == 0 and uneven["train"]["index"][:] == uneven["database"]["index"][:]

    apart = retrieval_splits(
        fmnist_test, num_query=100, num_validation=100, num_train=300, train_from_database=False
    )
    assert not index_set(apart["train"]) & index_set(apart["database"]) and len(apart["database"]) == 9500

    unstratified = retrieval_splits(
        fmnist_test, num_query=100, num_validation=0, num_train=10, per_class=False
    )
    assert len(unstratified["query"]) == 100 and np.bincount(unstratified["query"]["label"][:]).std() > 0
    with pytest.raises(ValueError, match="num_query must be a non-negative"):
        retrieval_splits(fmnist_test, num_query=-1, num_validation=0, num_train=None)
    with pytest.raises(ValueError, match="class 0 has 1000 left, needs 1001"):
        retrieval_splits(fmnist_test, num_query=10_010, num_validation=0, num_train=None)


def test_cifar10_protocols(fmnist_train):
    # Fashion-MNIST train has CIFAR-10's shape: 10 classes x 6,000 images.
    one = cifar10_protocol_splits(fmnist_train, "I")
    two = cifar10_protocol_splits(fmnist_train, "II")
    assert {name: len(split) for name, split in one.items()} == {
        "query": 10_000,
        "validation": 0,
        "database": 50_000,
        "train": 50_000,
    }
    assert one["query"]["index"][:] == two["query"]["index"][:]
    assert np.bincount(two["query"]["label"][:]).tolist() == [1000] * 10
    assert np.bincount(two["train"]["label"][:]).tolist() == [500] * 10
    assert index_set(two["train"]) <= index_set(two["database"])
    assert not index_set(two["query"]) & index_set(two["database"])
    held_out = cifar10_protocol_splits(fmnist_train, "II", num_validation=100)
    assert held_out["train"]["index"][:] == two["train"]["index"][:] and len(held_out["database"]) == 49_900
    assert not index_set(held_out["validation"]) & (
        index_set(held_out["database"]) | index_set(held_out["query"])
    )


def test_flickr25k_protocol(fmnist_test):
    splits = flickr25k_splits(fmnist_test)
    order = np.random.RandomState(2021).permutation(10_000)
    assert splits["query"]["index"][:] == sorted(order[:2000].tolist())
    assert splits["train"]["index"][:] == sorted(order[2000:7000].tolist())
    assert len(splits["database"]) == 8000 and index_set(splits["train"]) <= index_set(splits["database"])


def test_multilabel_lists(fmnist_test, tmp_path):
    root = tmp_path / "Flickr"
    for position in range(5):
        (root / f"concept{position % 2}").mkdir(parents=True, exist_ok=True)
        fmnist_test[position]["image"].save(root / f"concept{position % 2}" / f"{position}.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "test.txt").write_text("concept0/0.png 1 0 1\nconcept1/1.png 0 1 0\n")
    (lists / "database.txt").write_text(
        "concept0/2.png 0 0 1\n\nconcept1/3.png 1 1 0\nconcept0/4.png 0 0 0\n"
    )
    splits = nuswide_splits(root, lists)
    assert {name: len(split) for name, split in splits.items()} == {
        "query": 2,
        "validation": 0,
        "database": 3,
        "train": 3,
    }
    assert splits["database"]["labels"][:] == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]
    np.testing.assert_array_equal(
        np.asarray(splits["query"][1]["image"]), np.asarray(fmnist_test[1]["image"])
    )
    batch = next(
        iter(
            make_eval_dataloader(
                splits["database"], build_eval_transform(LITE0_DATA_CONFIG, 16), batch_size=3
            )
        )
    )
    assert batch["labels"].shape == (3, 3) and batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]] and batch["index"].tolist() == [
        0,
        1,
        2,
    ]

    (lists / "bad.txt").write_text("a.png 0 1 0\nb.png 0 2 0\n")
    with pytest.raises(ValueError, match="line 2: expected a path and 3 0/1 labels"):
        read_multilabel_list(lists / "bad.txt")
    (lists / "img.txt").write_text("concept0/0.png\nconcept1/1.png\n")
    (lists / "targets.txt").write_text("1 0 0 1\n0 1 1 0\n")
    flickr_style = load_multilabel_list(lists / "img.txt", root, labels_file=lists / "targets.txt")
    assert flickr_style["labels"][:] == [[1, 0, 0, 1], [0, 1, 1, 0]]


# recorded splits (SplitDefinition, splits.json)


def test_split_definition_builds_each_protocol(fmnist_train, fmnist_test):
    random = SplitDefinition(
        source="fashion-mnist", split="test", num_query=100, num_validation=50, num_train=200
    )
    splits = random.build()
    expected = retrieval_splits(fmnist_test, num_query=100, num_validation=50, num_train=200, seed=2021)
    assert all(splits[name]["index"][:] == expected[name]["index"][:] for name in expected)
    assert random.describe(splits) == (
        "fashion-mnist: random splits (seed 2021): 100 query, 50 validation, 9850 database, 200 train"
    )
    cifar = SplitDefinition(source="fashion-mnist", protocol="cifar10-ii", num_validation=100).build()
    expected = cifar10_protocol_splits(fmnist_train, "II", num_validation=100)
    assert {name: split_fingerprint(split) for name, split in cifar.items()} == {
        name: split_fingerprint(split) for name, split in expected.items()
    }
    flickr = SplitDefinition(
        source="fashion-mnist", split="test", protocol="flickr25k", num_query=2000
    ).build()
    assert (
        flickr["train"]["index"][:] == flickr25k_splits(fmnist_test)["train"]["index"][:]
    )  # 5,000 by default


def test_split_record_detects_changed_splits(tmp_path):
    recorded = SplitDefinition(source="fashion-mnist", limit=100, num_query=10, num_validation=10, seed=0)
    recorded.save(recorded.build(), tmp_path)
    definition, record = SplitDefinition.read(tmp_path / "splits.json")
    assert definition == recorded and record["sizes"] == {
        "query": 10,
        "validation": 10,
        "database": 80,
        "train": 80,
    }
    definition.check_against(definition.build(), record, fix="")
    reseeded = SplitDefinition(**{**record["definition"], "seed": 1})
    with pytest.raises(ValueError, match="query split built from 'fashion-mnist' differs.*Try again"):
        reseeded.check_against(reseeded.build(), record, fix="Try again.")


def test_split_records_that_cannot_be_read(tmp_path):
    with pytest.raises(ValueError, match="protocol must be one of"):
        SplitDefinition(source="fashion-mnist", protocol="cifar100")
    path = tmp_path / "splits.json"
    path.write_text('{"format": "mecoq-hf/splits", "definition": {"source": "fashion-mnist", "sede": 3}}')
    with pytest.raises(ValueError, match=r"unknown data settings \['sede'\]"):
        SplitDefinition.read(path)
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a mecoq split record"):
        SplitDefinition.read(path)
    path.write_text('{"format": "mecoq-hf/sp')
    with pytest.raises(ValueError, match="Split record .* is not valid JSON"):
        SplitDefinition.read(path)
