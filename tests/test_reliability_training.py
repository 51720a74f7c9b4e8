"""Non-finite numbers never train, never get saved and never get encoded (issue: reliability, item 2).

Run through the command line from a scratch folder, on real Fashion-MNIST images and timm's tiny
`test_efficientnet`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from lock_holder import lock_held_elsewhere
from tiny_runs import TINY_RUN, tiny_run_config

from mecoq_hf import MeCoQConfig, MeCoQModel, cli
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.training import RunFolder, TrainingArguments, TrainingRunLocked, train

TINY_CONFIG = tiny_run_config(
    training={"learning_rate": None, "top_k": None, "log_every_steps": 1}, limit=200, num_validation=0
)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    warnings.simplefilter("ignore")
    Path("tiny.yaml").write_text(TINY_CONFIG)
    return tmp_path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed as strict JSON (NaN and Infinity are not JSON)."""

    def refuse(name: str):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


TRAIN = ["train", "--config", "tiny.yaml", "--output-dir", "run", "--no-progress"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning-rate", "nan"], "training.learning_rate must be a finite number, got nan"),
        (["--learning-rate", "inf"], "training.learning_rate must be a finite number, got inf"),
        (["--set", "training.weight_decay=.nan"], "training.weight_decay must be a finite number"),
        (["--set", "model.temperature=.inf"], "model.temperature must be a finite number, got inf"),
        (["--set", "training.momentum=-0.5"], "momentum must be >= 0, got -0.5"),
    ],
    ids=["nan lr", "inf lr", "nan weight decay", "inf temperature", "negative momentum"],
)
def test_non_finite_settings_are_refused_before_anything_runs(scratch, capsys, flags, message):
    status, _, err = run_cli([*TRAIN, *flags], capsys)
    assert status == 2 and message in err and "Traceback" not in err
    assert not (scratch / "run").exists()


def test_weights_that_blow_up_stop_the_run_before_any_save(scratch, capsys):
    # A finite but absurd learning rate: with a frozen backbone the weights overflow to infinity in step 3
    # (the loss stays finite).
    flags = ["--learning-rate", "1e38", "--epochs", "2", "--max-steps", "3", "--backbone-trainable", "frozen"]
    status, out, err = run_cli([*TRAIN, *flags], capsys)
    assert status == 2 and "Trained model saved" not in out
    assert "Training stopped at step 3: the weights (projection.weight) became NaN or infinite" in err
    assert "--learning-rate" in err
    assert not (scratch / "run" / "model.safetensors").exists()
    assert [path.name for path in (scratch / "run" / "checkpoints").iterdir()] == ["step_2"]  # kept: finite
    records = strict_json_lines(scratch / "run" / "log.jsonl")
    assert records[-1]["event"] == "error" and records[-1]["step"] == 3
    assert "became NaN or infinite" in records[-1]["message"]


def test_a_second_run_into_a_folder_being_trained_is_refused_and_changes_nothing(scratch, capsys):
    """Two runs into one output folder would interleave checkpoints, splits.json and the model files."""
    folder = scratch / "run"
    folder.mkdir()
    (folder / "splits.json").write_text('{"first": "run"}')
    with lock_held_elsewhere(folder / ".mecoq-train.lock") as pid:
        status, out, err = run_cli(TRAIN, capsys)
        assert status == 2 and "Traceback" not in err
        assert f"Another training run (pid {pid}) is writing run: wait for it to finish" in err
        assert "--output-dir" in err
        args = TrainingArguments(output_dir=str(folder), num_epochs=1, report_to=[], progress_bar=False)
        with pytest.raises(TrainingRunLocked, match=f"pid {pid}"):  # the library path too
            train(MeCoQConfig(**TINY_RUN["model"]), args, load_fashion_mnist("train", limit=16))
    assert sorted(p.name for p in folder.iterdir()) == ["splits.json"]  # lock file gone with its holder
    assert (folder / "splits.json").read_text() == '{"first": "run"}'
    status, out, _ = run_cli(TRAIN, capsys)  # free again
    assert status == 0 and "Trained model saved" in out and not (folder / ".mecoq-train.lock").exists()


def test_a_loss_that_overflows_from_huge_weights_blames_the_learning_rate(scratch, capsys):
    # With the default trainable tail the same learning rate leaves the weights finite but huge, and the loss
    # overflows first: the message must still say the learning rate is too high, not "raise temperature".
    status, out, err = run_cli(
        [*TRAIN, "--learning-rate", "1e38", "--epochs", "2", "--max-steps", "3"], capsys
    )
    assert status == 2 and "Trained model saved" not in out
    assert "Training stopped: the loss became nan at step" in err
    assert re.search(r"the weights grew to [\d.e+]+ \([\w.]+\): the learning rate is too high", err), err
    assert "Lower --learning-rate" in err and "Raise model.temperature" not in err
    assert not (scratch / "run" / "model.safetensors").exists()


def test_a_non_finite_loss_names_its_step_and_cause(scratch, capsys):
    status, _, err = run_cli([*TRAIN, "--set", "model.temperature=1e-38"], capsys)
    assert status == 2
    assert "the loss became nan at step 1 (epoch 0" in err
    assert "the weights are finite, so the loss itself overflowed. Raise model.temperature" in err
    records = strict_json_lines(scratch / "run" / "log.jsonl")
    assert [record["event"] for record in records] == ["error"] and records[0]["step"] == 1


def test_the_log_stays_strict_json_whatever_the_values(tmp_path):
    run = RunFolder(tmp_path)
    run.append_log("step", {"step": 1, "loss": math.nan, "lr": math.inf, "nested": {"x": [1.0, -math.inf]}})
    assert strict_json_lines(tmp_path / "log.jsonl") == [
        {"event": "step", "step": 1, "loss": None, "lr": None, "nested": {"x": [1.0, None]}}
    ]
    with open(tmp_path / "log.jsonl", "a") as file:  # what a kill -9 in the middle of a write leaves
        file.write('{"event": "step", "step": 2, "lo')
    assert [record["step"] for record in run.read_log()] == [1]


@pytest.fixture
def nan_model(scratch) -> Path:
    """A saved model whose projection holds NaN: what a diverged run used to save."""
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=256)  # fmt: skip
    model = MeCoQModel(config)
    with torch.no_grad():
        model.projection.weight[0, 0] = math.nan
    model.save_pretrained(scratch / "nan_model")
    return scratch / "nan_model"


@pytest.mark.parametrize(
    ("command", "extra"),
    [(["encode"], []), (["encode"], ["--embeddings"]), (["index", "build"], [])],
    ids=["encode", "encode --embeddings", "index build"],
)
def test_encoding_refuses_a_model_with_non_finite_weights(nan_model, capsys, command, extra):
    output = nan_model.parent / "out.safetensors"
    argv = [*command, str(nan_model), "--dataset", "fashion-mnist", "--limit", "16", "--output", str(output),
            "--no-progress", *extra]  # fmt: skip
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "Traceback" not in err
    assert "weight projection.weight hold NaN or infinite values" in err
    assert "its codes would be meaningless (all zeros)" in err
    assert not output.exists()


def test_evaluation_refuses_a_model_with_non_finite_weights(nan_model, capsys):
    argv = ["evaluate", str(nan_model), "--dataset", "fashion-mnist", "--limit", "40", "--num-query", "4",
            "--map-k", "10", "--no-progress"]  # fmt: skip
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "NaN or infinite values, so its codes would be meaningless" in err
