"""Frozen-backbone feature caches: equality with a direct forward pass, the disk cache, view pairs."""

from __future__ import annotations

import pytest
import torch
from file_modes import UMASKS, modes_not_following, process_umask

from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.transforms import build_eval_transform, build_train_transform
from mecoq_hf.feature_cache import (
    CachedViewPairs,
    compute_eval_features,
    compute_features,
    compute_view_features,
)
from mecoq_hf.models.mecoq.backbones import TimmBackbone


def tiny_backbone() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("test_efficientnet", image_size=32, trainable="frozen")


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
