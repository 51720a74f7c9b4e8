"""Frozen-backbone feature caches: equality with a direct forward pass, the disk cache, view pairs."""

from __future__ import annotations

import pytest
import torch
from file_modes import UMASKS, modes_not_following, process_umask

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.loaders import ImageDataset
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.transforms import build_eval_transform, build_train_transform
from mecoq_hf.feature_cache import (
    CachedViewPairs,
    compute_eval_features,
    compute_features,
    compute_view_features,
    view_cache_bytes,
)
from mecoq_hf.models.mecoq.backbones import TimmBackbone
from mecoq_hf.retrieval.evaluation import evaluate_model


def tiny_backbone(trainable: str | int = "frozen") -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("test_efficientnet", image_size=32, trainable=trainable)


def test_features_equal_a_direct_forward_pass_and_keep_labels():
    backbone, images = tiny_backbone(), load_fashion_mnist("test", limit=12)
    transform = build_eval_transform(backbone.data_config)
    encoded = compute_features(backbone, images, transform, batch_size=5, show_progress_bar=False)
    with torch.no_grad():
        expected = backbone.eval()(torch.stack([transform(image) for image in images["image"]]))
    assert torch.allclose(encoded.outputs, expected, atol=1e-6)
    assert encoded.labels.tolist() == images["label"] and encoded.ids.tolist() == list(range(12))


def test_eval_features_of_several_splits_share_the_disk_cache(tmp_path):
    backbone, images = tiny_backbone(), load_fashion_mnist("test", limit=12)
    first, second = images.select(range(5)), images.select(range(5, 12))
    features = compute_eval_features(backbone, [first, second], batch_size=4, num_workers=1,
                                     show_progress_bar=False, cache_dir=tmp_path)  # fmt: skip
    transform = build_eval_transform(backbone.data_config)
    whole = compute_features(backbone, images, transform, show_progress_bar=False)
    assert torch.allclose(torch.cat([f.outputs for f in features]), whole.outputs, atol=1e-6)  # other batches
    assert [f.labels.tolist() for f in features] == [images["label"][:5], images["label"][5:]]
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2
    again = compute_features(backbone, second, transform, show_progress_bar=False, cache_dir=tmp_path)
    assert torch.equal(again.outputs, features[1].outputs)  # found on disk by another caller
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2


def test_disk_cache_is_reused_and_keyed_by_settings(tmp_path):
    backbone, images = tiny_backbone(), load_fashion_mnist("test", limit=8)
    config = backbone.data_config
    view = build_train_transform(32, config["mean"], config["std"])
    first = compute_view_features(
        backbone, images, view, 3, seed=1, cache_dir=tmp_path, show_progress_bar=False
    )
    assert first.shape == (8, 3, backbone.num_features)
    assert not torch.equal(first[:, 0], first[:, 1])  # views differ
    files = sorted(tmp_path.glob("views-*.safetensors"))
    assert len(files) == 1
    again = compute_view_features(
        backbone, images, view, 3, seed=1, cache_dir=tmp_path, show_progress_bar=False
    )
    assert torch.equal(first, again)
    compute_view_features(backbone, images, view, 3, seed=2, cache_dir=tmp_path, show_progress_bar=False)
    assert len(list(tmp_path.glob("views-*.safetensors"))) == 2  # another seed, another entry
    with torch.no_grad():  # other weights must never hit the same entry
        backbone.model.conv_stem.weight.add_(1.0)
    changed = compute_view_features(
        backbone, images, view, 3, seed=1, cache_dir=tmp_path, show_progress_bar=False
    )
    assert len(list(tmp_path.glob("views-*.safetensors"))) == 3 and not torch.equal(changed, first)


@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_cache_files_follow_the_umask(tmp_path, umask):
    backbone, images = tiny_backbone(), load_fashion_mnist("test", limit=4)
    transform = build_eval_transform(backbone.data_config)
    with process_umask(umask):
        compute_features(backbone, images, transform, cache_dir=tmp_path / "cache", show_progress_bar=False)
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 1
    assert modes_not_following(umask, tmp_path) == {}


def test_view_pairs_are_distinct_and_depend_only_on_seed_epoch_and_item():
    features = torch.arange(5 * 4 * 2, dtype=torch.float32).reshape(5, 4, 2)
    pairs = CachedViewPairs(features, seed=3)
    items = [pairs[i] for i in range(5)]
    assert all(not torch.equal(item["features"], item["features_2"]) for item in items)
    assert all(torch.equal(a["features"], b["features"]) for a, b in zip(items, [pairs[i] for i in range(5)]))
    pairs.set_epoch(1)
    later = [pairs[i] for i in range(5)]
    assert any(not torch.equal(a["features"], b["features"]) for a, b in zip(items, later))


def test_evaluation_leaves_an_eval_mode_model_in_eval_mode():
    # The feature extraction used to switch the backbone of an eval-mode model back to training mode.
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=16)  # fmt: skip
    model = MeCoQModel(config).eval()
    images = load_fashion_mnist("test", limit=24)
    evaluate_model(model, images.select(range(4)), images.select(range(4, 24)), top_k=10,
                   show_progress_bar=False)  # fmt: skip
    assert not model.training and not model.backbone.training
    model.train()
    evaluate_model(model, images.select(range(4)), images.select(range(4, 24)), top_k=10,
                   show_progress_bar=False)  # fmt: skip
    assert model.training and model.backbone.training


@pytest.mark.parametrize("train_mode", [False, True])
def test_features_and_views_restore_the_backbones_mode(train_mode):
    backbone, images = tiny_backbone(), load_fashion_mnist("test", limit=6)
    transform = build_eval_transform(backbone.data_config)
    view = build_train_transform(32, backbone.data_config["mean"], backbone.data_config["std"])
    for mode in (False, True):
        backbone.train(mode)
        compute_features(backbone, images, transform, train_mode=train_mode, show_progress_bar=False)
        assert backbone.training is mode
        compute_view_features(backbone, images, view, 2, num_workers=0, show_progress_bar=False)
        assert backbone.training is mode


def test_view_v_is_the_image_loaders_epoch_v_draw_whatever_the_workers():
    backbone, images = tiny_backbone(trainable=1), load_fashion_mnist("test", limit=10)
    view = build_train_transform(32, backbone.data_config["mean"], backbone.data_config["std"])
    lines = []
    trunk = compute_view_features(backbone, images, view, 3, seed=5, batch_size=4, num_workers=0, trunk=True,
                                  show_progress_bar=False, report=lines.append)  # fmt: skip
    assert trunk.shape == (10, 3, 48, 2, 2)
    size = view_cache_bytes(trunk.shape) / 2**20
    assert size == pytest.approx(trunk.numel() * 4 / 2**20)
    assert lines == [f"Caching 3 augmented views of 10 images as outputs of the frozen trunk (before "
                     f"blocks.4.0): shape (10, 3, 48, 2, 2), float32, {size:,.1f} MiB (0 augmentation "
                     "workers)."]  # fmt: skip
    with_workers = compute_view_features(backbone, images, view, 3, seed=5, batch_size=4, num_workers=2,
                                         trunk=True, show_progress_bar=False)  # fmt: skip
    assert torch.equal(trunk, with_workers)
    loader_images = ImageDataset(images, view, seed=5)
    loader_images.set_epoch(2)
    backbone.train()
    with torch.no_grad():
        expected = backbone.forward_trunk(torch.stack([loader_images[i]["pixel_values"] for i in range(10)]))
    assert torch.allclose(trunk[:, 2], expected, atol=1e-6)
    pooled = compute_view_features(tiny_backbone(), images, view, 3, seed=5, num_workers=0,
                                   show_progress_bar=False)  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(backbone.eval().forward_tail(trunk[:, 1]), pooled[:, 1], atol=1e-5)


def test_float16_storage_halves_the_cache_and_is_keyed_apart(tmp_path):
    backbone, images = tiny_backbone(trainable=1), load_fashion_mnist("test", limit=8)
    view = build_train_transform(32, backbone.data_config["mean"], backbone.data_config["std"])
    common = dict(seed=1, num_workers=0, trunk=True, show_progress_bar=False, cache_dir=tmp_path)
    full = compute_view_features(backbone, images, view, 2, **common)
    half = compute_view_features(backbone, images, view, 2, storage_dtype="float16", **common)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), full, atol=1e-2, rtol=1e-3)
    sizes = sorted(path.stat().st_size for path in tmp_path.glob("views-*.safetensors"))
    assert len(sizes) == 2 and sizes[0] < 0.6 * sizes[1]
    lines = []
    again = compute_view_features(backbone, images, view, 2, storage_dtype="float16", report=lines.append,
                                  **{k: v for k, v in common.items()})  # fmt: skip
    assert torch.equal(again, half) and lines[0].startswith("Using the 2 cached views of 8 images")
    pairs = CachedViewPairs(half, keys=("trunk_features", "trunk_features_2"))
    assert pairs[0]["trunk_features"].dtype == torch.float32 and pairs[0]["trunk_features"].shape == (
        48,
        2,
        2,
    )
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        compute_view_features(backbone, images, view, 2, storage_dtype="int8", **common)
