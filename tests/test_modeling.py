"""MeCoQModel: gradients by preset, initialisation, outputs, save/load round trips, remote code, integrity."""

from __future__ import annotations

import json
import math
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
from tiny_runs import TINY_MODEL
from transformers import AutoImageProcessor, AutoModel

from mecoq_hf import MeCoQConfig, MeCoQImageProcessor, MeCoQModel, load_codebooks

TINY = {**TINY_MODEL, "memory_size": 8}


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
    assert torch.equal(load_codebooks(tmp_path / "codebooks.safetensors"), model.normalized_codebooks())
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


def test_trunk_outputs_give_the_same_loss_as_images_and_gradients_reach_the_tail():
    model = tiny_model("paper", backbone_trainable=1).eval()
    first, second = views()
    from_images = model(first, second)
    trunk, trunk_2 = model.backbone.forward_trunk(first), model.backbone.forward_trunk(second)
    from_trunk = model(trunk_features=trunk, trunk_features_2=trunk_2)
    assert torch.equal(from_images.loss, from_trunk.loss) and torch.equal(from_images.codes, from_trunk.codes)
    from_trunk.loss.backward()
    tail = model.backbone.model.blocks[-1][0].conv_pw.weight
    assert tail.grad is not None and torch.isfinite(tail.grad).all() and tail.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one of `pixel_values_2`"):
        model(trunk_features=trunk, pixel_values_2=second, trunk_features_2=trunk_2)


# codebook scale (unit-norm codewords, renormalised after every optimizer step)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_fresh_models_hold_unit_norm_codewords(preset):
    """Construction, `for_training` and `_init_weights` all give unit-norm codewords (docs/method.md §2.3).

    `_init_weights` used to re-draw Xavier values without normalising: norms of ~0.05-0.4.
    """
    config = MeCoQConfig.from_preset(preset, **TINY)
    for model in (MeCoQModel(config), tiny_model(preset)):
        norms = model.quantizer.codebooks.detach().norm(dim=-1)  # (M, K)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
        model._init_weights(model.quantizer)  # what post_init applies to a model that is not loaded
        norms = model.quantizer.codebooks.detach().norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)


def test_sgd_step_then_renormalisation_gives_small_even_angular_steps():
    """One real SGD step (lr 0.01) on the paper preset, then `renormalize_codebooks_`.

    The forward pass normalises the codewords, so the gradient of a codeword of norm r is tangent and scaled
    by 1/r, and the step turns it by atan(lr * |grad| / r). Only at r = 1 is the angle lr * |grad| for every
    codeword: the same learning rate for all. Measured on this setup (M=2, K=16, batch 32), mean / max turn
    per step: before the fix 0.042 / 0.175 degrees with norms 0.17-0.43 (the angle was 2.3-5.9x lr * |grad|);
    after it 0.0006 / 0.020 degrees. (K=256, d=64: 0.0082 / 0.071 before, 0.0016 / 0.028 after.)
    """
    model = tiny_model("paper")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = model.quantizer.codebooks.detach().clone()  # (M, K, D)
    model(*views(batch=32)).loss.backward()
    gradient_norms = model.quantizer.codebooks.grad.norm(dim=-1)  # (M, K)
    optimizer.step()
    model.renormalize_codebooks_()

    after = model.quantizer.codebooks.detach()
    norms = after.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    cosines = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1).clamp(max=1)
    angles = torch.acos(cosines)  # (M, K) radians
    # Every codeword turns by lr * |grad|: no per-codeword learning rate. (acos is inaccurate for tiny
    # angles, so compare where the turn is well resolved.)
    resolved = angles > 1e-5
    assert resolved.sum() >= 8
    torch.testing.assert_close(
        angles[resolved], torch.atan(0.01 * gradient_norms.double())[resolved], rtol=2e-2, atol=0
    )
    assert torch.rad2deg(angles).max() < 0.05 and torch.rad2deg(angles).mean() < 0.005


def test_renormalisation_keeps_codes_and_outputs():
    """Rescaling raw codewords (e.g. a checkpoint from before the fix) changes neither codes nor the loss."""
    model = tiny_model("paper").eval()
    with torch.no_grad():
        model.quantizer.codebooks.mul_(torch.rand(2, 16, 1) * 0.4 + 0.05)  # raw Xavier-like norms
    first, second = views()
    expected, expected_codes = model(first, second), model.encode(first)
    model.renormalize_codebooks_()
    norms = model.quantizer.codebooks.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    assert torch.equal(model.encode(first), expected_codes)
    torch.testing.assert_close(model(first, second).loss, expected.loss, rtol=1e-6, atol=0)


# precision: the head, the quantizer and the loss run in float32 under autocast


def _loss_and_projection_gradient(model: MeCoQModel, autocast: bool, **inputs):
    """Forward (under bf16 autocast if asked), then backward outside autocast, as training loops do: torch
    runs a backward called inside `torch.autocast` with autocast on, whatever the forward pass disabled."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = model(**inputs)
    output.loss.backward()
    return output, model.projection.weight.grad.clone()


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_bf16_autocast_leaves_the_head_quantizer_and_loss_in_float32(preset):
    """Same backbone features with and without bf16 autocast: identical loss, gradient and hard codes.

    Before the fix autocast ran the projection, the quantizer's and the loss's matmuls in bf16 (despite
    `.float()`): here the loss moved by ~3.5e-3 relative and the projection gradient by ~8%.
    """
    model = tiny_model(preset)
    first, second = views()
    with torch.no_grad():
        model.update_memory(model(first, second).assignments)
        features, features_2 = model.backbone(first), model.backbone(second)
    inputs = dict(features=features, features_2=features_2, use_memory=True)
    reference, reference_gradient = _loss_and_projection_gradient(model, autocast=False, **inputs)
    mixed, mixed_gradient = _loss_and_projection_gradient(model, autocast=True, **inputs)
    assert mixed.loss.dtype == mixed.embeddings.dtype == mixed.quantized.dtype == torch.float32
    torch.testing.assert_close(mixed.loss, reference.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(mixed.contrastive_loss, reference.contrastive_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(mixed_gradient, reference_gradient, rtol=1e-5, atol=1e-9)
    assert torch.equal(mixed.codes, reference.codes)
    assert torch.equal(mixed.assignments, reference.assignments)


def test_bf16_autocast_still_applies_to_the_backbone():
    """With images, only the backbone follows autocast: the loss equals the float32 head on bf16 features."""
    model = tiny_model("paper", backbone_trainable="all")
    first, second = views()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(first, second)
        codes = model.encode(first)
        with torch.no_grad():
            features, features_2 = model.backbone(first), model.backbone(second)
    assert features.dtype == torch.bfloat16  # the backbone ran in reduced precision
    head_only = model(features=features.float(), features_2=features_2.float())
    torch.testing.assert_close(mixed.loss, head_only.loss, rtol=1e-6, atol=0)
    assert mixed.embeddings.dtype == torch.float32 and torch.equal(codes, head_only.codes)
    mixed.loss.backward()
    backbone_gradients = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in backbone_gradients)


# the loss the model computes


def _soft_reconstruction(assignments: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(N, M, K) soft codes -> (N, M*D) with the unit-normalised codebooks, written out for the tests."""
    unit = torch.nn.functional.normalize(codebooks.detach(), dim=-1)  # (M, K, D)
    return torch.einsum("nmk,mkd->nmd", assignments, unit).reshape(assignments.shape[0], -1)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_contrastive_loss_is_computed_on_the_soft_reconstructions_with_memory(preset):
    """The model's contrastive term is `debiased_contrastive_loss` of the two views' soft reconstructions
    (docs/method.md §2.4, pitfall 3) and the memory's codes decoded with the current codebooks; the same loss
    on the continuous embeddings z is a different number."""
    from mecoq_hf.models.mecoq.losses import debiased_contrastive_loss

    model = tiny_model(preset)
    config = model.config
    first, second = views()
    with torch.no_grad():
        earlier = model(*views(batch=4, size=32)[::-1])
        model.update_memory(earlier.assignments, earlier.assignments_2)
    assert model.memory.num_filled == 8
    output = model(first, second, use_memory=True)
    settings = dict(
        temperature=config.temperature,
        pos_prior=config.pos_prior,
        debias=config.loss_mode == "debias",
        reduction=config.contrastive_reduction,
        count_memory=config.debias_count_memory,
        floor=config.debias_floor,
        normalize_memory=config.normalize_memory,
    )
    memory = _soft_reconstruction(model.memory.soft_codes(), model.quantizer.codebooks)  # (8, d)
    quantized = _soft_reconstruction(output.assignments, model.quantizer.codebooks)
    torch.testing.assert_close(output.quantized, quantized, rtol=0, atol=1e-6)
    expected = debiased_contrastive_loss(output.quantized, output.quantized_2, memory, **settings)
    torch.testing.assert_close(output.contrastive_loss, expected, rtol=1e-6, atol=0)

    without_memory = debiased_contrastive_loss(output.quantized, output.quantized_2, None, **settings)
    embeddings_2 = model(second).embeddings
    on_embeddings = debiased_contrastive_loss(output.embeddings, embeddings_2, memory, **settings)
    assert abs(output.contrastive_loss.item() - without_memory.item()) > 1e-3
    assert abs(output.contrastive_loss.item() - on_embeddings.item()) > 1e-3


def test_debias_floor_binds_with_memory_negatives_in_the_model():
    """Identical views and pos_prior 0.99: (S - rho N P) / (1 - rho) < 0 for every anchor, so the loss is the
    DCL floor N * exp(-1/tau) with N = 2B - 2 + N_M (memory counted, paper preset)."""
    model = tiny_model("paper", pos_prior=0.99, temperature=0.2).eval()
    first, second = views()
    with torch.no_grad():
        model.update_memory(model(second).assignments, model(first).assignments[:2])
        output = model(first, first, use_memory=True)
    assert model.memory.num_filled == 8
    tau, rho, batch = 0.2, 0.99, first.shape[0]
    views_ = torch.cat([output.quantized, output.quantized_2]).double()  # (2B, d)
    anchors = torch.nn.functional.normalize(views_, dim=-1)
    memory = torch.nn.functional.normalize(
        _soft_reconstruction(model.memory.soft_codes(), model.quantizer.codebooks).double(), dim=-1
    )
    similarities = anchors @ anchors.T  # (2B, 2B)
    partner = torch.arange(2 * batch).roll(batch)
    positives = torch.exp(similarities[torch.arange(2 * batch), partner] / tau)  # (2B,)
    mask = torch.ones_like(similarities, dtype=torch.bool)
    mask.fill_diagonal_(False)
    mask[torch.arange(2 * batch), partner] = False
    negatives = (torch.exp(similarities / tau) * mask).sum(1) + torch.exp(anchors @ memory.T / tau).sum(1)
    count = 2 * batch - 2 + 8
    floor = count * math.exp(-1 / tau)
    assert ((negatives - rho * count * positives) / (1 - rho) < floor).all()  # the clamp binds everywhere
    expected = torch.log1p(floor / positives).mean()
    torch.testing.assert_close(output.contrastive_loss.double(), expected, rtol=1e-5, atol=0)
    # Not counting the memory in N would give a smaller floor, hence a smaller loss.
    in_batch_floor = (2 * batch - 2) * math.exp(-1 / tau)
    assert output.contrastive_loss.item() > torch.log1p(in_batch_floor / positives).mean()


# the code memory through the model


def test_update_memory_keeps_a_fifo_when_blocks_exceed_the_memory():
    """Memory of 3, blocks of 5 (DDP gathers world_size x batch): enqueue 0..4 then 9 keeps [3, 4, 9]."""
    model = tiny_model("paper", memory_size=3)

    def soft_codes(*values: float) -> torch.Tensor:
        return torch.tensor(values)[:, None, None].expand(len(values), 2, 16)

    model.update_memory(soft_codes(0, 1, 2, 3, 4))
    model.update_memory(soft_codes(9))
    assert sorted(float(v) for v in model.memory.soft_codes()[:, 0, 0]) == [3.0, 4.0, 9.0]
    # Two views of 5 each, as in a training step: the newest three codes of the second view survive, and the
    # next block replaces the oldest of them.
    model.update_memory(soft_codes(10, 11, 12, 13, 14), soft_codes(20, 21, 22, 23, 24), advance=5)
    model.update_memory(soft_codes(30), advance=5)
    assert sorted(float(v) for v in model.memory.soft_codes()[:, 0, 0]) == [23.0, 24.0, 30.0]


def test_codebooks_is_the_deprecated_name_of_normalized_codebooks():
    model = tiny_model()
    with pytest.warns(FutureWarning, match="renamed normalized_codebooks"):
        old = model.codebooks()
    assert torch.equal(old, model.normalized_codebooks())
    assert torch.allclose(old.norm(dim=-1), torch.ones(old.shape[:2]), atol=1e-6)


def test_save_and_load_use_no_deprecated_name(tmp_path):
    """The package's own save path must not trip the FutureWarning it gives users of `codebooks()`."""
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.save_pretrained(tmp_path)
        MeCoQModel.from_pretrained(tmp_path)
