"""Checkpoints of a training run, without pickle: `<output_dir>/checkpoints/step_<N>`.

A checkpoint holds everything an exact resume needs, as safetensors and JSON only:

- `model.safetensors`: the model's state dict (the code memory included);
- `optimizer.safetensors` + `optimizer.json`: the optimizer's tensors (momentum buffers) and the rest of its
  state dict (parameter groups with their current learning rates);
- `rng_state_<rank>.safetensors` + `rng_state_<rank>.json`: per process, the torch (CPU and CUDA), numpy and
  python random states and Accelerate's step counter; `grad_scaler.json` under fp16;
- `trainer_state.json`: the loop's progress (`TrainerState`);
- `manifest.json`, written last: the sha256 and size of every other file.

Accelerate's `save_state` would write the optimizer and random states as pickles (`optimizer.bin`,
`random_states_<rank>.pkl`); this module writes the same states itself and never unpickles anything. The data
order needs no file: the samplers are seeded by (seed, epoch) and `skip_first_batches` replays a partial
epoch.

A checkpoint is written into a temporary `.tmp-step_<N>` folder and renamed when complete, so a crash leaves
either a whole checkpoint or none (temporary folders are never listed, and the next save removes them). On
resume every file is checked against the manifest before anything is restored; a damaged newest checkpoint
is moved aside to `damaged-step_<N>` and the previous complete one is used instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ..file_io import apply_umask, write_json

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FORMAT = "mecoq-hf/checkpoint"
CHECKPOINT_VERSION = 1
MODEL_STATE_FILE = "model.safetensors"
OPTIMIZER_FILES = ("optimizer.safetensors", "optimizer.json")
SCALER_FILE = "grad_scaler.json"
DAMAGED_PREFIX = "damaged-"
_PICKLED_FILES = ("optimizer.bin", "random_states_0.pkl")  # what Accelerate's save_state writes
_SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class CheckpointDamagedError(ValueError):
    """A checkpoint file is missing, truncated, altered or not in this version's format."""


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
    """Checkpoint folders, oldest first (temporary `.tmp-*` and `damaged-*` folders are never listed)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _checkpoint_step(p) >= 0), key=_checkpoint_step)


# saving


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, state: TrainerState, keep: int
) -> Path:
    """Write the prepared model and optimizer, the random states and `state`: complete, or absent.

    Every process must call it: each writes its random states; the main process writes the model, the
    optimizer, the trainer state and the manifest, renames the folder and removes checkpoints beyond the
    newest `keep`.

    Raises:
        ValueError: an Accelerate setup whose state this module cannot gather (FSDP, DeepSpeed, Megatron).
    """
    _check_supported(accelerator)
    final = Path(output_dir) / CHECKPOINTS_DIR / f"step_{state.global_step}"
    staging = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        for stale in final.parent.glob(".tmp-step_*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_random_states(accelerator, staging)
    if accelerator.is_main_process:
        _save_model_and_optimizer(accelerator, staging)
        write_json(staging / TRAINER_STATE_FILE, dataclasses.asdict(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_manifest(staging, accelerator.num_processes)
        apply_umask(staging)  # safetensors writes 0600 files
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_supported(accelerator: Accelerator) -> None:
    if accelerator.distributed_type not in _SUPPORTED:
        raise ValueError(
            f"Training checkpoints support one process and DDP (CPU or GPU processes), not "
            f"{accelerator.distributed_type}. Launch without FSDP, DeepSpeed or Megatron-LM."
        )


def _model_file(index: int) -> str:
    return MODEL_STATE_FILE if index == 0 else f"model_{index}.safetensors"


def _optimizer_files(index: int) -> tuple[str, str]:
    return OPTIMIZER_FILES if index == 0 else (f"optimizer_{index}.safetensors", f"optimizer_{index}.json")


def _save_model_and_optimizer(accelerator: Accelerator, folder: Path) -> None:
    for index, model in enumerate(accelerator._models):  # what `prepare` registered, as save_state saves
        state = accelerator.unwrap_model(model).state_dict()
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()},
                  str(folder / _model_file(index)), metadata={"format": "pt"})  # fmt: skip
    for index, optimizer in enumerate(accelerator._optimizers):
        tensors, layout = _split_state(optimizer.state_dict())
        tensor_file, layout_file = _optimizer_files(index)
        save_file(tensors, str(folder / tensor_file), metadata={"format": "pt"})
        write_json(folder / layout_file, layout)
    if accelerator.scaler is not None:
        write_json(folder / SCALER_FILE, accelerator.scaler.state_dict())


def _split_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict -> (its tensors by name, the rest as JSON-ready data naming those tensors)."""
    tensors, state = {}, {}
    for parameter, values in state_dict["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                key = f"state.{parameter}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        state[str(parameter)] = entry
    layout = {"param_groups": state_dict["param_groups"], "state": state}
    json.dumps(layout, allow_nan=False)  # TypeError/ValueError here rather than a half-written checkpoint
    return tensors, layout


def _save_random_states(accelerator: Accelerator, folder: Path) -> None:
    """This process's torch, numpy and python random states and Accelerate's step counter."""
    rank = accelerator.process_index
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(folder / f"rng_state_{rank}.safetensors"), metadata={"format": "pt"})
    write_json(folder / f"rng_state_{rank}.json", {
        "python": [version, list(internal), gauss],
        "numpy": [kind, int(position), int(has_gauss), float(cached_gaussian)],
        "accelerator_step": accelerator.step,
    })  # fmt: skip


def _write_manifest(folder: Path, num_processes: int) -> None:
    """Flush every file to disk and record its digest; the manifest itself is written atomically."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as file:
                files[path.name] = _digest(file.read())
                os.fsync(file.fileno())
    write_json(folder / MANIFEST_FILE, {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "num_processes": num_processes,
        "files": files,
    })  # fmt: skip


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# loading


def load_latest_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike) -> TrainerState | None:
    """Restore the prepared model and optimizer, the random states and the progress of the newest usable
    checkpoint; None when there is none.

    Every file is checked against the manifest first. A damaged checkpoint is moved aside to
    `damaged-step_<N>` and the one before it is tried, with a message saying so.

    Raises:
        ValueError: every checkpoint is damaged (or was written by an older version as pickles), or a
            checkpoint does not fit the model (its settings changed since).
    """
    _check_supported(accelerator)
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return None
    damaged: list[tuple[Path, str]] = []
    for checkpoint in reversed(checkpoints):
        try:
            contents = _read_checkpoint(checkpoint, accelerator.process_index)
        except CheckpointDamagedError as error:
            damaged.append((checkpoint, str(error)))
            continue
        accelerator.wait_for_everyone()  # every process has read what it needs before anything is moved
        _set_aside(accelerator, damaged)
        state = _restore(accelerator, checkpoint, contents)
        if damaged:
            accelerator.print(
                f"Checkpoint {damaged[0][0].name} is damaged ({damaged[0][1]}): resumed from "
                f"{checkpoint.name} instead; the damaged ones were moved to {DAMAGED_PREFIX}step_<N> "
                "(inspect or delete them)."
            )
        accelerator.print(f"Resumed from {checkpoint} (epoch {state.epoch}, step {state.global_step}).")
        return state
    reasons = "; ".join(f"{path.name}: {reason}" for path, reason in damaged)
    raise ValueError(
        f"No usable checkpoint in {checkpoints[0].parent}: {reasons}. Start over: train into a new "
        "--output-dir, or delete the folder's checkpoints/ and run again without --resume."
    )


def _set_aside(accelerator: Accelerator, damaged: list[tuple[Path, str]]) -> None:
    if accelerator.is_main_process:
        for path, _ in damaged:
            target = path.with_name(DAMAGED_PREFIX + path.name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
    accelerator.wait_for_everyone()


def _read_checkpoint(folder: Path, rank: int) -> dict[str, Any]:
    """Every file this process needs, checked against the manifest and parsed, before anything is restored.

    Raises:
        CheckpointDamagedError: naming the file and what is wrong with it.
    """
    if not (folder / MANIFEST_FILE).is_file():
        pickled = [name for name in _PICKLED_FILES if (folder / name).is_file()]
        if pickled:
            raise CheckpointDamagedError(
                f"written by an older mecoq-hf as Accelerate pickles ({', '.join(pickled)}), which this "
                "version does not unpickle"
            )
        raise CheckpointDamagedError(f"no {MANIFEST_FILE}, so its files cannot be checked")
    manifest = _parse_json(MANIFEST_FILE, _read_bytes(folder, MANIFEST_FILE))
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointDamagedError(f"{MANIFEST_FILE} is not a {CHECKPOINT_FORMAT} manifest")
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise CheckpointDamagedError(f"format version {manifest.get('version')}, this version reads 1")
    expected = manifest.get("files")
    if not isinstance(expected, dict):
        raise CheckpointDamagedError(f"{MANIFEST_FILE} lists no files")
    data = {}
    for name, digest in sorted(expected.items()):
        data[name] = _read_bytes(folder, name)
        if _digest(data[name]) != digest:
            raise CheckpointDamagedError(
                f"{name} differs from its recorded checksum: it was truncated, altered or replaced"
            )
    return {
        "manifest": manifest,
        "state": _trainer_state(data),
        "tensors": {
            name: _parse_safetensors(name, raw) for name, raw in data.items() if name.endswith(".safetensors")
        },
        "json": {name: _parse_json(name, raw) for name, raw in data.items() if name.endswith(".json")},
        "rank": rank,
    }


def _read_bytes(folder: Path, name: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except FileNotFoundError as error:
        raise CheckpointDamagedError(f"{name} is missing") from error
    except OSError as error:
        raise CheckpointDamagedError(f"{name} cannot be read ({error})") from error


def _parse_json(name: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointDamagedError(f"{name} is not valid JSON ({error})") from error


def _parse_safetensors(name: str, raw: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(raw)
    except Exception as error:  # safetensors raises its own SafetensorError (and others) on bad bytes
        raise CheckpointDamagedError(f"{name} is not a safetensors file ({error})") from error


def _trainer_state(data: dict[str, bytes]) -> TrainerState:
    if TRAINER_STATE_FILE not in data:
        raise CheckpointDamagedError(f"{TRAINER_STATE_FILE} is missing")
    values = _parse_json(TRAINER_STATE_FILE, data[TRAINER_STATE_FILE])
    try:
        return TrainerState(**values)
    except TypeError as error:
        raise CheckpointDamagedError(
            f"{TRAINER_STATE_FILE} does not hold a trainer state ({error})"
        ) from error


def _restore(accelerator: Accelerator, folder: Path, contents: dict[str, Any]) -> TrainerState:
    """Load what `_read_checkpoint` parsed into the prepared objects and the random generators."""
    tensors, documents = contents["tensors"], contents["json"]
    for index, model in enumerate(accelerator._models):
        _fit(folder, accelerator.unwrap_model(model).load_state_dict, tensors, _model_file(index))
    for index, optimizer in enumerate(accelerator._optimizers):
        tensor_file, layout_file = _optimizer_files(index)
        if tensor_file not in tensors or layout_file not in documents:
            raise ValueError(f"Checkpoint {folder} has no state for optimizer {index}.")
        state_dict = _join_state(tensors[tensor_file], documents[layout_file])
        _fit(folder, optimizer.load_state_dict, {"optimizer": state_dict}, "optimizer")
    if accelerator.scaler is not None and SCALER_FILE in documents:
        accelerator.scaler.load_state_dict(documents[SCALER_FILE])
    _restore_random_states(accelerator, contents)
    return contents["state"]


def _fit(folder: Path, load_state_dict: Callable[[Any], Any], states: dict[str, Any], name: str) -> None:
    """`load_state_dict(states[name])`, explaining a state that does not fit (missing, extra or resized)."""
    try:
        load_state_dict(states[name])
    except (KeyError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"Checkpoint {folder} does not fit this model and optimizer ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}): the settings changed since it was written. Resume "
            "with the first run's settings, or train into a new --output-dir."
        ) from error


def _join_state(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_split_state`."""
    state = {
        int(parameter): {
            name: tensors[value["tensor"]] if "tensor" in value else value["value"]
            for name, value in entry.items()
        }
        for parameter, entry in layout["state"].items()
    }
    return {"state": state, "param_groups": layout["param_groups"]}


def _restore_random_states(accelerator: Accelerator, contents: dict[str, Any]) -> None:
    rank = contents["rank"]
    tensors = contents["tensors"].get(f"rng_state_{rank}.safetensors")
    values = contents["json"].get(f"rng_state_{rank}.json")
    if tensors is None or values is None:
        accelerator.print(
            f"Note: the checkpoint was written by {contents['manifest'].get('num_processes')} process(es) "
            f"and has no random state for process {rank}: the resumed run is not bit-identical to an "
            "uninterrupted one."
        )
        return
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, position, has_gauss, cached_gaussian = values["numpy"]
    np.random.set_state(
        (kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    accelerator.step = values["accelerator_step"]


__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointDamagedError",
    "TrainerState",
    "list_checkpoints",
    "load_latest_checkpoint",
    "save_checkpoint",
]
