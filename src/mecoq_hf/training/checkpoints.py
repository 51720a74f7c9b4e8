"""Checkpoints of a training run: `accelerator.save_state` folders under `<output_dir>/checkpoints/step_<N>`.

A checkpoint is written into a temporary `.tmp-step_<N>` folder and renamed when complete, so a crash leaves
either a whole checkpoint or none (temporary folders are never listed). Next to Accelerate's files (model as
safetensors, optimizer, RNG and sampler states) each holds `trainer_state.json`: the loop's progress.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..file_io import apply_umask, read_json, write_json

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Progress saved with every checkpoint (JSON), enough to resume exactly."""

    epoch: int = 0
    batches_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    evaluations_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"step_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary `.tmp-*` folders are never listed)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _checkpoint_step(p) >= 0), key=_checkpoint_step)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, state: TrainerState, keep: int
) -> Path:
    """`accelerator.save_state` into a temporary folder, then rename it: a checkpoint is complete or absent.

    Every process must call it (Accelerate gathers the states); only the main process writes the trainer
    state, renames the folder and removes checkpoints beyond the newest `keep`.
    """
    final = Path(output_dir) / CHECKPOINTS_DIR / f"step_{state.global_step}"
    staging = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(staging / TRAINER_STATE_FILE, dataclasses.asdict(state))
        apply_umask(staging)  # accelerate (safetensors) writes 0600 files
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike) -> TrainerState | None:
    """Restore model, optimizer, RNG and sampler states from the newest checkpoint; None if there is none."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    accelerator.load_state(str(latest))
    state = TrainerState(**read_json(latest / TRAINER_STATE_FILE, "Trainer state"))
    accelerator.print(f"Resumed from {latest} (epoch {state.epoch}, step {state.global_step}).")
    return state


__all__ = ["CHECKPOINTS_DIR", "TrainerState", "list_checkpoints", "load_latest_checkpoint", "save_checkpoint"]
