"""Checkpoints (`training.checkpoints`): complete or absent, pruned to the newest, restored exactly."""

from __future__ import annotations

import torch

from mecoq_hf.training import TrainingArguments, build_accelerator
from mecoq_hf.training.checkpoints import (
    CHECKPOINTS_DIR,
    TrainerState,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)


def test_checkpoints_are_renamed_when_complete_pruned_and_restored(tmp_path):
    accelerator = build_accelerator(TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainerState()
    for step in (1, 2, 3):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step, state.history = step, [*state.history, {"step": step}]
        save_checkpoint(accelerator, tmp_path, state, keep=2)
    (tmp_path / CHECKPOINTS_DIR / ".tmp-step_4").mkdir()  # what a crash during the next save leaves
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2", "step_3"]
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    with torch.no_grad():
        model.weight.zero_()
    restored = load_latest_checkpoint(accelerator, tmp_path)
    assert restored == state and restored.history == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
    accelerator.end_training()


def test_a_folder_without_checkpoints_starts_fresh(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    accelerator = build_accelerator(TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    assert load_latest_checkpoint(accelerator, tmp_path) is None
