"""Wrong settings and edited files name the file and the key (issue: reliability, item 8)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassError

from mecoq_hf import MeCoQConfig, MeCoQModel, cli
from mecoq_hf.training import TrainingArguments

MODEL = dict(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
             num_codebooks=2, codebook_size=256)  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    warnings.simplefilter("ignore")
    return tmp_path


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("training.cached_views=abc", "training.cached_views must be a whole number, got 'abc'"),
        ("training.learning_rate=fast", "training.learning_rate must be a number, got 'fast'"),
        ("training.deterministic=maybe", "training.deterministic must be true or false, got 'maybe'"),
        ("model.num_codebooks=2.5", "model.num_codebooks must be a whole number, got 2.5"),
        ("data.num_query=many", "data.num_query must be a whole number, got 'many'"),
    ],
)
def test_set_values_of_the_wrong_kind_name_the_setting(scratch, capsys, assignment, message):
    Path("tiny.json").write_text(json.dumps({"model": MODEL, "training": {"report_to": [], "max_steps": 1}}))
    argv = ["train", "--config", "tiny.json", "--dataset", "fashion-mnist", "--limit", "40", "--num-query",
            "4", "--num-validation", "0", "--output-dir", "run", "--no-progress",
            "--set", assignment]  # fmt: skip
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and message in err and "not supported between" not in err


def test_training_arguments_check_kinds_in_python_too(tmp_path):
    with pytest.raises(TypeError, match="cached_views must be a whole number, got 'abc'"):
        TrainingArguments(output_dir=str(tmp_path), cached_views="abc")
    with pytest.raises(TypeError, match="batch_size must be a whole number, got True"):
        TrainingArguments(output_dir=str(tmp_path), batch_size=True)
    with pytest.raises(ValueError, match="warmup_start_lr must be a finite number, got nan"):
        TrainingArguments(output_dir=str(tmp_path), warmup_start_lr=float("nan"))
    with pytest.raises(StrictDataclassError, match="temperature must be a finite number, got nan"):
        MeCoQConfig(**MODEL, temperature=float("nan"))


def test_a_yaml_error_names_the_file_and_line(scratch, capsys):
    Path("run.yaml").write_text("model:\n  temperature: 0.3\ntraining: [1\n")
    status, _, err = run_cli(["train", "--config", "run.yaml", "--output-dir", "run"], capsys)
    assert status == 2 and "Config file run.yaml is not valid YAML" in err
    assert '"run.yaml", line 3' in err and "<unicode string>" not in err


@pytest.fixture
def saved_model(scratch) -> Path:
    MeCoQModel(MeCoQConfig(**MODEL)).save_pretrained(scratch / "model")
    return scratch / "model"


@pytest.mark.parametrize(
    ("key", "value", "stored"),
    [("num_codebooks", 4, "num_codebooks=2"), ("codebook_size", 16, "codebook_size=256"),
     ("embedding_dim", 32, "embedding_dim=16")],
)  # fmt: skip
def test_a_config_that_disagrees_with_the_weights_names_file_and_key(saved_model, capsys, key, value, stored):
    edited = saved_model.with_name("edited")
    shutil.copytree(saved_model, edited)
    config = json.loads((edited / "config.json").read_text())
    config[key] = value
    (edited / "config.json").write_text(json.dumps(config))
    argv = ["encode", str(edited), "--dataset", "fashion-mnist", "--limit", "4", "--output", "c.safetensors"]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "Traceback" not in err and "ignore_mismatched_sizes" not in err
    assert f"config.json and model.safetensors of {edited} disagree: the config says {key}={value}" in err
    assert f"the weights hold {stored}" in err and f"set {stored} in config.json" in err
    with pytest.raises(ValueError, match=f"the config says {key}={value}"):
        MeCoQModel.from_pretrained(edited)
    assert MeCoQModel.from_pretrained(saved_model).config.num_codebooks == 2  # the saved pair still loads
