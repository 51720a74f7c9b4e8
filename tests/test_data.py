"""Tests for mecoq_hf.data on real images: Fashion-MNIST (Debian package) and foolbox's photo fixtures.

Also the package's one RGB conversion, `to_rgb_image` (image_processing_mecoq), which every decoded image
goes through before any transform.
"""

from __future__ import annotations

import gzip
import io
import re
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Dataset, DatasetDict, load_dataset
from real_data import LITE0_DATA_CONFIG, require_fashion_mnist, require_foolbox_data

from mecoq_hf.data.loaders import make_eval_dataloader, make_train_dataloader
from mecoq_hf.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    BadImageError,
    DataSource,
    class_names,
    image_paths,
    load_fashion_mnist,
    load_image_dataset,
    read_idx,
)
from mecoq_hf.data.splits import retrieval_splits
from mecoq_hf.data.transforms import build_eval_transform, build_train_transform
from mecoq_hf.models.mecoq.image_processing_mecoq import to_rgb_image

require_fashion_mnist()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def fmnist_test() -> Dataset:
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def fmnist_train() -> Dataset:
    start = time.perf_counter()
    dataset = load_fashion_mnist("train")
    print(f"Fashion-MNIST train (60k) loaded in {time.perf_counter() - start:.2f} s")
    return dataset


# Fashion-MNIST


def test_fashion_mnist_known_facts(fmnist_train, fmnist_test):
    assert len(fmnist_train) == 60_000 and len(fmnist_test) == 10_000
    assert fmnist_test.features["label"].names == list(FASHION_MNIST_CLASSES)
    assert np.bincount(fmnist_test["label"][:]).tolist() == [1000] * 10
    assert np.bincount(fmnist_train["label"][:]).tolist() == [6000] * 10
    first = fmnist_test[0]
    assert first["label"] == 9 and FASHION_MNIST_CLASSES[first["label"]] == "Ankle boot"
    assert first["image"].mode == "L" and first["image"].size == (28, 28)
    assert fmnist_test["index"][:5] == [0, 1, 2, 3, 4]


def test_fashion_mnist_limit_and_bad_split():
    assert len(load_fashion_mnist("test", limit=7)) == 7
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("validation")


def test_first_20_test_images_match_foolbox_fixtures(fmnist_test):
    files = sorted(require_foolbox_data().glob("fashionMNIST_*_*.png"))
    assert len(files) == 20
    for file in files:
        _, position, label = file.stem.split("_")
        row = fmnist_test[int(position)]
        assert row["label"] == int(label), file.name
        expected = np.asarray(PIL.Image.open(file).convert("L"))
        np.testing.assert_array_equal(np.asarray(row["image"]), expected, err_msg=file.name)


def test_read_idx_reports_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    header = bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(header + bytes(10 * 28 * 28)))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    foreign = tmp_path / "foreign.gz"
    foreign.write_bytes(gzip.compress(b"\x89PNG not an idx file"))
    with pytest.raises(ValueError, match="magic"):
        read_idx(foreign)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(Path(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(cut)


# other sources


def test_arrays_and_pil_lists(fmnist_test):
    pixels = np.stack([np.asarray(fmnist_test[i]["image"]) for i in range(6)])  # (6, 28, 28)
    dataset = load_image_dataset(pixels, labels=[3, 1, 4, 1, 5, 9])
    assert dataset.column_names == ["image", "label", "index"]
    np.testing.assert_array_equal(np.asarray(dataset[2]["image"]), pixels[2])
    assert dataset["label"][:] == [3, 1, 4, 1, 5, 9]

    photos = [PIL.Image.fromarray(np.dstack([p, p[::-1], p.T])) for p in pixels]  # RGB
    multi_hot = np.eye(6, 4, dtype=np.int8)
    dataset = load_image_dataset(photos, labels=multi_hot)
    assert "labels" in dataset.column_names and dataset[1]["labels"] == [0, 1, 0, 0]
    np.testing.assert_array_equal(np.asarray(dataset[4]["image"]), np.asarray(photos[4]))
    assert "label" not in load_image_dataset(photos).column_names


def test_save_to_disk_round_trip(fmnist_test, tmp_path):
    subset = fmnist_test.select(range(30, 50))
    subset.save_to_disk(str(tmp_path / "one"))
    loaded = load_image_dataset(tmp_path / "one")
    assert loaded["label"][:] == subset["label"][:] and loaded["index"][:] == list(range(30, 50))
    np.testing.assert_array_equal(np.asarray(loaded[3]["image"]), np.asarray(fmnist_test[33]["image"]))

    DatasetDict(a=subset, b=fmnist_test.select(range(5))).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"splits \['a', 'b'\]"):
        load_image_dataset(tmp_path / "two")
    assert len(load_image_dataset(tmp_path / "two", split="b")) == 5


def test_fashion_mnist_literal_and_renamed_columns(fmnist_test):
    assert len(load_image_dataset("fashion-mnist", split="test")) == 10_000
    renamed = fmnist_test.select(range(8)).rename_columns({"image": "img", "label": "fine_label"})
    dataset = load_image_dataset(renamed, image_column="img", label_column="fine_label")
    assert dataset.column_names == ["image", "label", "index"]


def test_missing_columns_and_empty_datasets(fmnist_test, tmp_path):
    small = fmnist_test.select(range(4))
    with pytest.raises(ValueError, match=r"\['img'\] not found.*\['image', 'label', 'index'\]"):
        load_image_dataset(small, image_column="img")
    with pytest.raises(ValueError, match="label_column=None"):
        load_image_dataset(small.remove_columns("label"))
    assert "label" not in load_image_dataset(small.remove_columns("label"), label_column=None).column_names
    with pytest.raises(ValueError, match="in-memory images"):
        load_image_dataset(small, labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        load_image_dataset(small.select([]))
    with pytest.raises(ValueError, match="empty"):
        load_image_dataset(np.zeros((0, 28, 28), dtype=np.uint8))
    (tmp_path / "no_images").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_image_dataset(tmp_path / "no_images", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TypeError, match="uint8"):
        load_image_dataset(np.zeros((2, 28, 28), dtype=np.float32))


def test_hub_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Hugging Face Hub.*switched off"):
        load_image_dataset("some-org/no-such-dataset")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_dataset("/no/such/folder")


@pytest.fixture()
def folder_with_corrupt_file(fmnist_test, tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "images"
    for position in range(8):
        row = fmnist_test[position]
        (root / f"class{row['label']}").mkdir(parents=True, exist_ok=True)
        row["image"].save(root / f"class{row['label']}" / f"{position}.png")
    corrupt = root / "class9" / "corrupt.png"
    corrupt.write_bytes(png_bytes(np.asarray(fmnist_test[100]["image"]))[:120])  # valid header, cut data
    return root, corrupt


def test_image_folder_with_corrupt_file(folder_with_corrupt_file, tmp_path):
    root, corrupt = folder_with_corrupt_file
    with pytest.raises(
        BadImageError, match=re.escape(f"1 of 9 images cannot be read: Cannot read image {corrupt}")
    ):
        load_image_dataset(root, cache_dir=str(tmp_path / "cache"))
    dataset = load_image_dataset(root, on_bad_image="skip", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 8
    assert dataset.features["label"].names == ["class1", "class2", "class4", "class6", "class9"]
    files = [
        value["path"] for value in dataset.cast_column("image", datasets.Image(decode=False))["image"][:]
    ]
    assert str(corrupt) not in files and len(set(files)) == 8


def test_loader_reports_or_skips_bad_images_at_run_time(folder_with_corrupt_file, tmp_path):
    root, corrupt = folder_with_corrupt_file
    unchecked = load_image_dataset(
        load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "c"))
    )
    transform = build_eval_transform(LITE0_DATA_CONFIG, image_size=16)
    with pytest.raises(BadImageError, match=re.escape(str(corrupt))):
        list(make_eval_dataloader(unchecked, transform, batch_size=3))
    batches = list(make_eval_dataloader(unchecked, transform, batch_size=3, on_bad_image="skip"))
    assert [len(batch["index"]) for batch in batches] == [3, 3, 2]  # the corrupt file is the last row
    assert torch.cat([batch["index"] for batch in batches]).tolist() == list(range(8))
    with pytest.raises(BadImageError, match="All 1 images of a batch"):  # nothing left to return
        list(make_eval_dataloader(unchecked, transform, batch_size=4, on_bad_image="skip"))


# recorded sources (DataSource)


def test_data_source_joins_splits_in_order_and_renumbers(fmnist_train, fmnist_test):
    source = DataSource("fashion-mnist", split="test+train", limit=10_003)
    images = source.load()
    assert len(images) == 10_003 and images["index"][:] == list(range(10_003))
    assert images["label"][9_998:] == fmnist_test["label"][9_998:] + fmnist_train["label"][:3]
    np.testing.assert_array_equal(np.asarray(images[10_001]["image"]), np.asarray(fmnist_train[1]["image"]))
    assert (source.name, source.hub_id) == ("fashion-mnist", None)
    assert DataSource(**source.to_dict()) == source
    assert [np.asarray(image).sum() for image in source.images_by_id([10_002, 5])] == [
        np.asarray(fmnist_train[2]["image"]).sum(),
        np.asarray(fmnist_test[5]["image"]).sum(),
    ]
    with pytest.raises(ValueError, match=r"Ids \[10003\] are no longer in 'fashion-mnist'"):
        source.images_by_id([3, 10_003])


def test_data_source_of_a_folder_records_paths_and_names(fmnist_test, tmp_path, monkeypatch):
    root = tmp_path / "shoes"
    for position in range(6):
        row = fmnist_test[position]
        (root / f"class{row['label']}").mkdir(parents=True, exist_ok=True)
        row["image"].save(root / f"class{row['label']}" / f"{position}.png")
    monkeypatch.chdir(tmp_path)
    source = DataSource("shoes", limit=4)
    assert source.source == str(root) and source.name == "shoes" and source.hub_id is None  # stored absolute
    images = source.load()
    assert len(images) == 4 and class_names(images) == ["class1", "class2", "class6", "class9"]
    paths = image_paths(images)
    assert all(Path(path).parent.parent == root for path in paths)
    assert [class_names(images)[label] for label in images["label"]] == [Path(p).parent.name for p in paths]
    assert (
        image_paths(fmnist_test.select(range(2))) == [None, None]
        and class_names(images.remove_columns("label")) is None
    )

    flat = tmp_path / "flat"
    flat.mkdir()
    fmnist_test[0]["image"].save(flat / "one.png")
    with pytest.raises(ValueError, match="--label-column none"):
        DataSource(str(flat)).load()
    unlabelled = DataSource(str(flat), label_column="none")
    assert unlabelled.label_column is None and "label" not in unlabelled.load().column_names


def test_data_source_rejects_bad_settings():
    with pytest.raises(ValueError, match="No dataset given"):
        DataSource("")
    with pytest.raises(ValueError, match="positive number of images, got 0"):
        DataSource("fashion-mnist", limit=0)
    hub = DataSource("some-org/some-dataset")
    assert (hub.name, hub.hub_id) == ("some-org/some-dataset", "some-org/some-dataset")


# RGB conversion (to_rgb_image)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent -> white
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("LA", (40, 255), (40, 40, 40)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 257 * 100, (100, 100, 100)),
        ("I", 1000 * 257 // 10, (100, 100, 100)),
        ("I", 200, (200, 200, 200)),
        ("F", 0.5, (128, 128, 128)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_to_rgb_image_modes(mode, value, expected):
    image = to_rgb_image(PIL.Image.new(mode, (5, 4), value))
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((2, 2)) == expected


def test_to_rgb_image_palette_with_transparency():
    palette = PIL.Image.new("P", (3, 3), 0)
    palette.putpalette([200, 10, 10] + [0, 0, 0] * 255)
    assert to_rgb_image(palette).getpixel((0, 0)) == (200, 10, 10)
    palette.info["transparency"] = 0
    assert to_rgb_image(palette).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("I;16B", 257 * 30, (30, 30, 30)),  # big-endian 16-bit grey
        ("RGBa", (10, 20, 30, 0), (255, 255, 255)),  # premultiplied alpha, fully transparent
        ("La", (40, 255), (40, 40, 40)),
        ("F", 200.0, (200, 200, 200)),  # float above 1 is taken as 0-255
        ("I", 70_000, (255, 255, 255)),  # 16-bit overflow clips to white
    ],
)
def test_to_rgb_image_more_modes(mode, value, expected):
    image = to_rgb_image(PIL.Image.new(mode, (5, 4), value))
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((2, 2)) == expected


def test_to_rgb_image_scales_wide_grey_by_a_fixed_factor_not_per_image():
    dark = PIL.Image.fromarray(np.array([[0, 257 * 10], [257 * 20, 257 * 40]], dtype=np.uint16))  # I;16
    assert dark.mode == "I;16"
    assert np.asarray(to_rgb_image(dark))[..., 0].tolist() == [[0, 10], [20, 40]]  # not stretched to 255


def test_to_rgb_image_accepts_arrays_and_tensors(fmnist_test):
    grey = np.asarray(fmnist_test[0]["image"])  # (28, 28) uint8
    expected = np.repeat(grey[..., None], 3, axis=2)  # (28, 28, 3)
    for image in (grey, grey[..., None], torch.from_numpy(grey.copy())[None]):  # (H, W), (H, W, 1), (1, H, W)
        np.testing.assert_array_equal(np.asarray(to_rgb_image(image)), expected)
    rgb = np.dstack([grey, grey[::-1], grey.T])  # (28, 28, 3)
    np.testing.assert_array_equal(np.asarray(to_rgb_image(torch.from_numpy(rgb).permute(2, 0, 1))), rgb)
    with pytest.raises(TypeError, match="uint8"):
        to_rgb_image(grey.astype(np.float32))
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb_image("image.png")


# torch side


def test_train_dataloader_batches_and_seeding(fmnist_test):
    subset = fmnist_test.select(range(10))
    transform = build_train_transform(24, (0.5,) * 3, (0.5,) * 3)
    loader = make_train_dataloader(subset, transform, batch_size=4, seed=7)
    batches = list(loader)
    assert [batch["pixel_values"].shape[0] for batch in batches] == [4, 4, 2]
    assert batches[0]["pixel_values_2"].shape == (4, 3, 24, 24) and set(batches[0]) == {
        "pixel_values",
        "pixel_values_2",
    }
    assert len(list(make_train_dataloader(subset, transform, 4, seed=7, drop_last=True))) == 2

    orders = [
        list(make_train_dataloader(subset, transform, 4, seed=seed).batch_sampler) for seed in (7, 7, 8)
    ]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    torch.manual_seed(1)
    first = next(iter(make_train_dataloader(subset, transform, 4, seed=7)))
    torch.manual_seed(1)
    again = next(iter(make_train_dataloader(subset, transform, 4, seed=7)))
    assert torch.equal(first["pixel_values"], again["pixel_values"])


def test_eval_dataloader_keeps_order_labels_and_index(fmnist_test):
    splits = retrieval_splits(fmnist_test, num_query=20, num_validation=0, num_train=None, seed=0)
    loader = make_eval_dataloader(
        splits["query"], build_eval_transform(LITE0_DATA_CONFIG, image_size=16), batch_size=8
    )
    batches = list(loader)
    indices = torch.cat([batch["index"] for batch in batches])
    labels = torch.cat([batch["labels"] for batch in batches])
    assert indices.tolist() == splits["query"]["index"][:] and labels.tolist() == splits["query"]["label"][:]
    assert batches[0]["pixel_values"].shape == (8, 3, 16, 16) and labels.dtype == torch.int64


def test_train_dataloader_with_a_worker(fmnist_test):
    transform = build_train_transform(16, (0.5,) * 3, (0.5,) * 3)
    loader = make_train_dataloader(
        fmnist_test.select(range(6)), transform, batch_size=3, seed=0, num_workers=1
    )
    assert [batch["pixel_values_2"].shape for batch in loader] == [(3, 3, 16, 16)] * 2
