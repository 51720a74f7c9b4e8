"""MeCoQModel: gradients by preset, initialisation, outputs, save/load round trips, remote code, integrity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import torch
from file_modes import UMASKS, modes_not_following, process_umask
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModel

from mecoq_hf import MeCoQConfig, MeCoQImageProcessor, MeCoQModel, load_codebooks

TINY = dict(
    backbone="test_efficientnet",
    backbone_weights=None,
    image_size=32,
    embedding_dim=16,
    num_codebooks=2,
    codebook_size=16,
    memory_size=8,
)


def tiny_model(preset: str = "paper", **overrides) -> MeCoQModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MeCoQModel.for_training(MeCoQConfig.from_preset(preset, **{**TINY, **overrides}))


def views(batch: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=generator), torch.randn(
        batch, 3, size, size, generator=generator
    )


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_every_trainable_parameter_gets_a_finite_gradient(preset):
    model = tiny_model(preset, backbone_trainable=1)
    output = model(*views())
    output.loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert "projection.weight" in trainable
    assert ("quantizer.codebooks" in trainable) == (preset == "paper")
    for name, parameter in trainable.items():
        assert parameter.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_official_codebooks_never_change_and_paper_codebooks_do():
    for preset, should_change in [("official", False), ("paper", True)]:
        model = tiny_model(preset)
        before = model.quantizer.codebooks.detach().clone()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            model(*views()).loss.backward()
            optimizer.step()
        changed = not torch.equal(before, model.quantizer.codebooks.detach())
        assert changed == should_change, preset


def test_diversity_penalty_spreads_codewords_when_codebooks_train():
    """Only the codeword-diversity gradient: it must lower the mean codeword similarity (paper, §4.1)."""
    model = tiny_model("paper")
    with torch.no_grad():  # start from nearly collapsed codebooks
        model.quantizer.codebooks.copy_(
            torch.ones_like(model.quantizer.codebooks) + 0.3 * torch.randn_like(model.quantizer.codebooks)
        )
    optimizer = torch.optim.SGD([model.quantizer.codebooks], lr=100.0)  # the penalty is a mean over K^2 pairs
    first = None
    for _ in range(20):
        optimizer.zero_grad()
        diversity = model.loss(*_soft_outputs(model)).codeword_diversity
        first = diversity.item() if first is None else first
        diversity.backward()
        optimizer.step()
    final = model.loss(*_soft_outputs(model)).codeword_diversity.item()
    assert first > 0.5 and final < first / 2


def _soft_outputs(model: MeCoQModel):
    with torch.no_grad():
        output = model(*views())
    return output.quantized, output.quantized_2, output.assignments, output.assignments_2


def test_construction_keeps_the_backbones_own_initialisation():
    torch.manual_seed(0)
    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    torch.manual_seed(0)
    model = MeCoQModel(MeCoQConfig(**TINY))
    ours = model.backbone.model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_for_training_loads_the_pretrained_backbone():
    from mecoq_hf.models.mecoq.backbones import efficientnet_lite_state_dict

    config = MeCoQConfig(image_size=64, embedding_dim=16, num_codebooks=2, codebook_size=16)
    model = MeCoQModel.for_training(config)
    state = model.backbone.model.state_dict()
    expected = {
        key: value
        for key, value in efficientnet_lite_state_dict(0).items()
        if not key.startswith("classifier.")
    }
    assert len(expected) > 250 and expected.keys() <= state.keys()
    assert all(torch.equal(state[key], value) for key, value in expected.items())
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_outputs_have_documented_shapes_and_memory_changes_the_loss():
    model = tiny_model("paper")
    first, second = views(batch=5)
    single = model(first)
    assert single.loss is None and single.embeddings.shape == (5, 16)
    assert single.assignments.shape == (5, 2, 16) and single.codes.dtype == torch.uint8
    pair = model(first, second)
    assert pair.loss.ndim == 0 and pair.quantized_2.shape == (5, 16)
    expected_total = pair.contrastive_loss + 0.5 * pair.codeword_diversity  # paper preset: no entropy weight
    assert torch.allclose(pair.loss, expected_total)
    model.update_memory(pair.assignments, pair.assignments_2)
    assert model.memory.num_filled == 8
    with_memory = model(first, second, use_memory=True)
    assert with_memory.contrastive_loss > pair.contrastive_loss  # more negatives in the denominator
    assert isinstance(model(first, return_dict=False), tuple)
    with pytest.raises(ValueError, match="same shape"):
        model(first, second[:3])


def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    model = tiny_model("paper").eval()
    model.update_memory(torch.softmax(torch.randn(4, 2, 16), -1))
    images, _ = views()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "codebooks.safetensors", "preprocessor_config.json"} <= set(
        os.listdir(tmp_path)
    )
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".saving-")]
    reloaded = MeCoQModel.from_pretrained(tmp_path)
    assert not reloaded.training
    assert torch.equal(reloaded.embed(images), model.embed(images))
    assert torch.equal(reloaded.encode(images), model.encode(images))
    assert torch.equal(load_codebooks(tmp_path / "codebooks.safetensors"), model.codebooks())
    assert reloaded.memory.num_filled == 0  # training state is not released
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as file:
        assert not [key for key in file.keys() if key.startswith("memory.")]
    assert type(AutoModel.from_pretrained(tmp_path)) is MeCoQModel
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, MeCoQImageProcessor) and processor.image_size == 32


@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_every_saved_file_follows_the_umask(tmp_path, umask):
    model = tiny_model()
    with process_umask(umask):
        model.save_pretrained(tmp_path / "model")
        model.save_pretrained(tmp_path / "model")  # replacing an existing save gives the same modes
    names = set(os.listdir(tmp_path / "model"))
    assert {"config.json", "model.safetensors", "codebooks.safetensors", "preprocessor_config.json",
            "modeling_mecoq.py", "quantization.py"} <= names  # fmt: skip
    assert modes_not_following(umask, tmp_path / "model") == {}


def test_truncated_or_altered_weights_are_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        MeCoQModel.from_pretrained(tmp_path)
    altered = bytearray(data)
    altered[-50] ^= 0x01
    weights.write_bytes(bytes(altered))
    with pytest.raises(ValueError, match="altered after it was saved"):
        MeCoQModel.from_pretrained(tmp_path)


def test_trust_remote_code_works_without_the_package(tmp_path):
    model = tiny_model("official").eval()
    images, _ = views(batch=3)
    model.save_pretrained(tmp_path / "model")
    torch.save(
        {"images": images, "codes": model.encode(images), "embeddings": model.embed(images)},
        tmp_path / "expected.pt",
    )
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mecoq.MeCoQModel"
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class BlockMecoq(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "mecoq_hf":
                    raise ImportError("mecoq_hf is hidden in this process")
        sys.meta_path.insert(0, BlockMecoq())
        try:
            import mecoq_hf
            raise SystemExit("mecoq_hf should not be importable here")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        assert torch.equal(model.encode(expected["images"]), expected["codes"])
        assert torch.equal(model.embed(expected["images"]), expected["embeddings"])
        print("REMOTE-CODE-OK", type(model).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK" in result.stdout and "transformers_modules" in result.stdout


def test_precomputed_backbone_features_give_the_same_loss_as_images():
    model = tiny_model("official").eval()
    first, second = views()
    from_images = model(first, second)
    with torch.no_grad():
        features, features_2 = model.backbone(first), model.backbone(second)
    from_features = model(features=features, features_2=features_2)
    assert torch.equal(from_images.loss, from_features.loss)
    assert torch.equal(from_images.codes, from_features.codes)
    with pytest.raises(ValueError, match="exactly one of `pixel_values`"):
        model(first, features=features)
    with pytest.raises(ValueError, match=r"\(B, 256\)"):
        model(features=features[:, :10])
