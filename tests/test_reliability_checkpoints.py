"""Checkpoints hold no pickle, and a damaged one is named and skipped (issue: reliability, item 7).

A "poisoned" file is a pickle whose loading would run code (it would create a marker file): the checkpoint
loader must never unpickle it, name the damaged checkpoint and resume exactly from the one before.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mecoq_hf import MeCoQConfig, cli
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.training import TrainingArguments, build_accelerator, train
from mecoq_hf.training.checkpoints import (
    CHECKPOINTS_DIR,
    TrainerState,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)

TINY = dict(
    backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16, num_codebooks=2,
    codebook_size=16, memory_size=16, memory_start_epoch=1,
)  # fmt: skip


def tiny_args(folder: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(folder), num_epochs=2, batch_size=8, learning_rate=0.05,
                    progress_bar=False, report_to=[], seed=0, deterministic=True,
                    checkpoint_every_steps=2)  # fmt: skip
    return TrainingArguments(**{**settings, **overrides})


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist("test", limit=48)  # 6 steps per epoch at batch 8


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> Path:
    """An uninterrupted 12-step run: the parameters every resumed run must reach bit for bit."""
    warnings.simplefilter("ignore")
    folder = tmp_path_factory.mktemp("straight")
    train(MeCoQConfig(**TINY), tiny_args(folder), images)
    return folder


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(list_checkpoints(folder)[-1] / "model.safetensors"), framework="pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118


def refuse_constant(name: str):
    raise AssertionError(f"not strict JSON: {name}")


def poison(path: Path, marker: Path) -> None:
    """Replace `path` by a pickle that creates `marker` when it is unpickled."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"state": Payload()}))


def test_checkpoints_hold_only_safetensors_and_json(straight):
    checkpoints = list_checkpoints(straight)
    assert [path.name for path in checkpoints] == ["step_10", "step_12"]
    for checkpoint in checkpoints:
        names = sorted(path.name for path in checkpoint.iterdir())
        assert names == [
            "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
            "rng_state_0.json", "rng_state_0.safetensors", "trainer_state.json",
        ]  # fmt: skip
        for path in checkpoint.iterdir():
            raw = path.read_bytes()
            assert not raw.startswith((b"\x80", b"PK")), path  # neither a pickle nor a torch.save zip
            if path.suffix == ".json":
                json.loads(raw, parse_constant=refuse_constant)  # strict JSON: no NaN or Infinity
            else:
                with safe_open(str(path), framework="pt") as file:
                    assert file.metadata() == {"format": "pt"}
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert sorted(manifest["files"]) == [name for name in names if name != "manifest.json"]
    with safe_open(str(checkpoints[-1] / "optimizer.safetensors"), framework="pt") as file:
        assert any(name.endswith("momentum_buffer") for name in file.keys())  # noqa: SIM118


@pytest.mark.parametrize("damaged_file", ["optimizer.safetensors", "rng_state_0.safetensors"])
def test_a_poisoned_newest_checkpoint_is_skipped_and_the_run_resumes_exactly(
    straight, images, tmp_path, capsys, damaged_file
):
    warnings.simplefilter("ignore")
    config, folder, marker = MeCoQConfig(**TINY), tmp_path / "run", tmp_path / "code_was_run"
    train(config, tiny_args(folder, max_steps=4), images)
    assert [path.name for path in list_checkpoints(folder)] == ["step_2", "step_4"]
    poison(folder / CHECKPOINTS_DIR / "step_4" / damaged_file, marker)
    capsys.readouterr()
    train(config, tiny_args(folder, resume=True), images)
    out = capsys.readouterr().out
    assert f"Checkpoint step_4 is damaged ({damaged_file} differs from its recorded checksum" in out
    assert "resumed from step_2 instead" in out
    assert not marker.exists()  # the pickle was never loaded
    assert (folder / CHECKPOINTS_DIR / "damaged-step_4" / damaged_file).is_file()  # kept for inspection
    expected, resumed = final_state(straight), final_state(folder)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_resume_without_a_usable_checkpoint_says_to_start_over(images, tmp_path, capsys):
    warnings.simplefilter("ignore")
    folder = tmp_path / "run"
    train(MeCoQConfig(**TINY), tiny_args(folder, max_steps=2, num_epochs=1), images)
    poison(folder / CHECKPOINTS_DIR / "step_2" / "optimizer.safetensors", tmp_path / "code_was_run")
    config = tmp_path / "tiny.yaml"
    settings = {
        "model": TINY,
        "training": {"report_to": [], "num_epochs": 1, "batch_size": 8},
        "data": {
            "source": "fashion-mnist",
            "split": "test",
            "limit": 48,
            "num_query": 8,
            "num_validation": 0,
        },
    }
    config.write_text(json.dumps(settings))
    status = cli.main(
        ["train", "--config", str(config), "--output-dir", str(folder), "--resume", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "No usable checkpoint" in err and "step_2: optimizer.safetensors differs" in err
    assert "Start over" in err and "--output-dir" in err
    assert not (tmp_path / "code_was_run").exists()


# fast cases: a two-layer model instead of MeCoQ


def saved_linear(folder: Path, steps: int = 2) -> tuple:
    """A prepared Linear and SGD with momentum, checkpointed after each of `steps` steps; also returns the
    weight after each step."""
    accelerator = build_accelerator(TrainingArguments(output_dir=str(folder), report_to=[]))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    weights = []
    for step in range(1, steps + 1):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        save_checkpoint(accelerator, folder, TrainerState(global_step=step), keep=3)
        weights.append(model.weight.detach().clone())
    return accelerator, model, optimizer, weights


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # in the data, past the header
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda c: flip_byte(c / "model.safetensors"),
            "model.safetensors differs from its recorded checksum",
        ),
        (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json differs"),
        (lambda c: (c / "rng_state_0.json").unlink(), "rng_state_0.json is missing"),
        (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
        (lambda c: (c / "manifest.json").write_text("[1, 2"), "manifest.json is not valid JSON"),
    ],
    ids=["flipped byte", "edited json", "missing file", "no manifest", "broken manifest"],
)
def test_every_kind_of_damage_is_named_and_the_previous_checkpoint_used(tmp_path, damage, reason, capsys):
    accelerator, model, optimizer, weights = saved_linear(tmp_path)
    damage(tmp_path / CHECKPOINTS_DIR / "step_2")
    state = load_latest_checkpoint(accelerator, tmp_path)
    out = capsys.readouterr().out
    assert state.global_step == 1 and torch.equal(model.weight, weights[0])
    assert f"Checkpoint step_2 is damaged ({reason}" in out and "resumed from step_1" in out
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_1"]
    accelerator.end_training()


def test_the_restored_optimizer_and_random_states_are_the_saved_ones(tmp_path):
    accelerator, model, optimizer, _ = saved_linear(tmp_path, steps=1)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_random = torch.rand(3)  # the first draw after the checkpoint
    torch.manual_seed(123)
    for buffer in optimizer.state.values():
        buffer["momentum_buffer"].zero_()
    optimizer.param_groups[0]["lr"] = 7.0
    load_latest_checkpoint(accelerator, tmp_path)
    restored = optimizer.state_dict()
    assert restored["param_groups"] == saved_optimizer["param_groups"]
    for key, values in saved_optimizer["state"].items():
        assert torch.equal(restored["state"][key]["momentum_buffer"], values["momentum_buffer"])
    assert torch.equal(torch.rand(3), saved_random)
    accelerator.end_training()


def test_older_pickled_checkpoints_and_other_models_are_refused_clearly(tmp_path):
    accelerator, *_ = saved_linear(tmp_path / "linear", steps=1)
    legacy = tmp_path / "legacy" / CHECKPOINTS_DIR / "step_1"
    accelerator.save_state(str(legacy))  # Accelerate's own format: optimizer.bin, random_states_0.pkl
    (legacy / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    with pytest.raises(ValueError, match=r"step_1: written by an older mecoq-hf as Accelerate pickles"):
        load_latest_checkpoint(accelerator, tmp_path / "legacy")
    accelerator.end_training()
    other = build_accelerator(TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    other.prepare(torch.nn.Linear(4, 5), torch.optim.SGD(torch.nn.Linear(4, 5).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="(?s)does not fit this model and optimizer.*first run's settings"):
        load_latest_checkpoint(other, tmp_path / "linear")
    other.end_training()
