"""MeCoQConfig: validation at construction, presets, derived values, save/load."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import StrictDataclassError

from mecoq_hf import PRESETS, MeCoQConfig


def test_bits_and_subvector_dim():
    config = MeCoQConfig(embedding_dim=96, num_codebooks=8, codebook_size=256)
    assert config.bits == 64 and config.subvector_dim == 12
    assert MeCoQConfig(num_codebooks=2, embedding_dim=32, codebook_size=16).bits == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embedding_dim": 30, "num_codebooks": 4}, r"embedding_dim \(30\) must be a positive multiple"),
        ({"codebook_size": 1}, "codebook_size must be >= 2"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"pos_prior": 1.0}, r"pos_prior must lie in \[0, 1\)"),
        ({"pos_prior": -0.1}, r"pos_prior must lie in \[0, 1\)"),
        ({"backbone_trainable": "some"}, "backbone_trainable must be"),
        ({"backbone_trainable": 0}, "must be >= 1"),
        ({"contrastive_reduction": "sum"}, "contrastive_reduction must be one of"),
        ({"memory_start_epoch": -1}, "memory_start_epoch must be >= 0"),
        ({"num_codebooks": "4"}, "expected int, got str"),
        ({"entropy_weight": -1.0}, "Loss weights must be >= 0"),
    ],
)
def test_invalid_values_are_rejected_with_the_reason(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        MeCoQConfig(**overrides)


def test_presets_differ_where_the_reference_code_differs_from_the_paper():
    official, paper = MeCoQConfig.from_preset("official"), MeCoQConfig.from_preset("paper")
    assert official.trainable_codebooks is False and paper.trainable_codebooks is True
    assert official.contrastive_reduction == "broadcast" and paper.contrastive_reduction == "per_anchor"
    assert official.debias_floor == "official" and paper.debias_floor == "dcl"
    assert official.normalize_query_subvectors is False and paper.normalize_query_subvectors is True


def test_reference_script_rows_are_presets():
    row = MeCoQConfig.from_preset("cifar10-ii-32")
    assert (row.num_codebooks, row.embedding_dim, row.temperature, row.memory_start_epoch) == (
        4,
        48,
        0.35,
        15,
    )
    assert row.backbone == "vgg16" and row.backbone_trainable == 2 and row.bits == 32
    flickr = MeCoQConfig.from_preset("flickr25k-64", temperature=0.5)
    assert flickr.temperature == 0.5 and flickr.backbone_trainable == "frozen"
    assert len([name for name in PRESETS if name not in ("official", "paper")]) == 12
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        MeCoQConfig.from_preset("nope")


def test_save_and_reload(tmp_path):
    config = MeCoQConfig.from_preset(
        "official", embedding_dim=32, num_codebooks=2, backbone_kwargs={"drop_rate": 0.5}
    )
    config.save_pretrained(tmp_path)
    reloaded = MeCoQConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.backbone_kwargs == {"drop_rate": 0.5} and reloaded.model_type == "mecoq"
