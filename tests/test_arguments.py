"""`TrainingArguments`: checks at construction, and plumbing told apart from hyperparameters by the fields."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mecoq_hf import MeCoQConfig
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.model_card import build_model_card
from mecoq_hf.training import RunFolder, TrainingArguments
from mecoq_hf.training.checkpoints import TrainerState


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"max_steps": 0}, "max_steps must be >= 1 or None, got 0"),
        ({"cached_views": 1}, "cached_views must be 0 .off. or >= 2"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"memory_pointer": "half"}, "memory_pointer must be one of"),
        ({"codebook_lr_scale": -1.0}, "codebook_lr_scale >= 0"),
        ({"codebook_init": "pca"}, "codebook_init must be one of"),
        ({"cache_dtype": "int8"}, "cache_dtype must be one of"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir=str(tmp_path), **overrides)


def test_plumbing_is_marked_on_the_fields():
    plumbing = TrainingArguments.plumbing_names()
    assert {
        "output_dir",
        "report_to",
        "progress_bar",
        "num_workers",
        "resume",
        "feature_cache_dir",
    } <= plumbing
    hyperparameters = {"num_epochs", "learning_rate", "batch_size", "seed", "top_k", "cached_views"}
    assert not hyperparameters & plumbing
    assert plumbing < {item.name for item in dataclasses.fields(TrainingArguments)}


def test_model_card_shows_hyperparameters_and_hides_plumbing(tmp_path):
    run = RunFolder(tmp_path / "secret-folder")
    args = TrainingArguments(output_dir=str(run.path), num_epochs=3, num_workers=4, report_to=[],
                             feature_cache_dir="/cache/features", progress_bar=False)  # fmt: skip
    config = MeCoQConfig(
        backbone="test_efficientnet", backbone_weights=None, embedding_dim=16, num_codebooks=2
    )
    run.write_run_record(config, args, TrainerState(), load_fashion_mnist("test", limit=8), num_processes=1,
                         finished=True)  # fmt: skip
    record = run.card_record()
    assert record["training_args_plumbing"] == sorted(TrainingArguments.plumbing_names())
    old_record = {key: value for key, value in record.items() if key != "training_args_plumbing"}
    (run.path / "run_record.json").write_text(json.dumps(old_record))  # written before plumbing was listed
    for card_record in (record, run.card_record()):
        text = str(build_model_card(card_record))
        assert "| `num_epochs` | `3` |" in text
        for hidden in ("secret-folder", "num_workers", "report_to", "/cache/features", "progress_bar"):
            assert hidden not in text, hidden
