"""Training MeCoQ with Accelerate: one CPU, one GPU or many processes (docs/method.md §5-§6).

The loop follows the shape of accelerate's examples: seed, build, one `prepare` call, then per step
forward two views -> loss -> backward -> SGD step -> per-iteration learning rate -> enqueue the gathered soft
codes into the code memory. After each evaluation epoch the validation split (never the query set) picks
the best model, with patience. Checkpoints are `accelerator.save_state` folders written under a temporary
name and renamed when complete; `resume=True` continues from the newest one.

The output folder is a ready model folder (`MeCoQModel.from_pretrained(output_dir)`) holding the best model,
its codebooks and preprocessor config, `training_args.json`, `run_record.json` and `log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR

from ..data.loaders import make_train_dataloader
from ..data.transforms import build_train_transform
from ..feature_cache import CachedViewPairs, compute_view_features
from ..file_io import apply_umask
from ..models.mecoq.configuration_mecoq import MeCoQConfig
from ..models.mecoq.modeling_mecoq import MeCoQModel
from .validation import ValidationSet

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
RUN_RECORD_FILE = "run_record.json"
TRAINING_ARGS_FILE = "training_args.json"
LOG_FILE = "log.jsonl"


@dataclass
class TrainingArguments:
    """Optimisation and run settings; the model's own settings live in `MeCoQConfig`.

    Defaults follow the reference recipe (docs/method.md §6): SGD with momentum 0.9, lr 0.01, one epoch of linear
    warm-up from 1e-5, cosine decay to 1e-5, batch 128, at most 50 epochs, patience 10.

    Args:
        output_dir: the run's folder; becomes a model folder.
        num_epochs: maximum number of epochs.
        max_steps: stop after this many optimizer steps in total (a checkpoint is written there); the schedule
            still spans `num_epochs`, so a stopped run resumes exactly.
        batch_size: images per process per step (each gives two views).
        learning_rate: peak learning rate of the head (projection and codebooks).
        backbone_lr_scale: the trainable backbone layers use learning_rate * backbone_lr_scale. The reference
            code meant 1e-3 but its scheduler overwrote it (docs/method.md §13.9); here the scale really applies.
        warmup_epochs, warmup_start_lr, final_lr: per-iteration linear warm-up, then cosine decay.
        momentum, weight_decay: SGD settings (weight decay is the paper's beta; not applied to codebooks).
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: "no", "fp16" or "bf16" (ignored when an `accelerator` is passed to `train`).
        seed, deterministic: seeding of python, numpy and torch; deterministic algorithms when True.
        eval_every_epochs, patience, top_k: validation mAP@top_k every N epochs; stop after `patience`
            evaluations without improvement (None: never stop early).
        checkpoint_every_steps: also checkpoint every N optimizer steps (epochs always end with one).
        keep_checkpoints: how many checkpoint folders to keep.
        resume: continue from the newest checkpoint in `output_dir/checkpoints`.
        memory_pointer: "nominal" advances the memory pointer by the nominal global batch even after a short
            last batch (reference behaviour), "actual" by the number of codes written.
        cached_views: 0 runs the backbone on fresh augmentations every step. N >= 2 (frozen backbone only)
            computes N augmented views per training image once and trains the head on random pairs of them,
            and caches the validation features too: much faster on a CPU (see `feature_cache.py`).
        feature_cache_dir: keep those frozen-backbone features on disk and reuse them across runs.
        num_workers, on_bad_image: DataLoader workers; "raise" or "skip" for unreadable images.
        log_every_steps, report_to, progress_bar: JSON-lines logging cadence, Accelerate trackers ("auto":
            TensorBoard when installed), and a tqdm bar on the main process.
    """

    output_dir: str
    num_epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 128
    learning_rate: float = 0.01
    backbone_lr_scale: float = 1e-3
    warmup_epochs: float = 1.0
    warmup_start_lr: float = 1e-5
    final_lr: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 1e-3
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 2021
    deterministic: bool = False
    eval_every_epochs: int = 1
    patience: int | None = 10
    top_k: int | None = 1000
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    memory_pointer: str = "nominal"
    cached_views: int = 0
    feature_cache_dir: str | None = None
    num_workers: int = 0
    on_bad_image: str = "raise"
    log_every_steps: int = 10
    report_to: list[str] | str = "auto"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        positive = (
            "num_epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "eval_every_epochs",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_steps", "patience", "top_k", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}.")
        if self.cached_views == 1 or self.cached_views < 0:
            raise ValueError(
                f"cached_views must be 0 (off) or >= 2 views per image, got {self.cached_views}."
            )
        if self.learning_rate <= 0 or self.backbone_lr_scale < 0:
            raise ValueError(
                f"learning_rate must be > 0 and backbone_lr_scale >= 0, got {self.learning_rate} and "
                f"{self.backbone_lr_scale}."
            )
        choices = {"mixed_precision": ("no", "fp16", "bf16"), "memory_pointer": ("nominal", "actual"),
                   "on_bad_image": ("raise", "skip")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


@dataclass
class TrainingResult:
    """What `train` returns: the trained (best) model and where its folder is."""

    model: MeCoQModel
    output_dir: Path
    best_metric: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]
    stopped_early: bool


# learning rate


def learning_rate_factor(
    step: int, total_steps: int, warmup_steps: int, peak: float, start: float, final: float
) -> float:
    """lr(step) / peak: linear warm-up from `start` over `warmup_steps`, then cosine from `peak` to `final`."""
    if step < warmup_steps:
        lr = start + (peak - start) * step / max(warmup_steps - 1, 1)
    else:
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        lr = final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr / peak


def build_optimizer(model: MeCoQModel, args: TrainingArguments) -> torch.optim.SGD:
    """SGD with the backbone at `learning_rate * backbone_lr_scale`; codebooks without weight decay."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    codebooks = [p for p in (model.quantizer.codebooks,) if p.requires_grad]
    head = [p for p in model.projection.parameters() if p.requires_grad]
    groups = [
        {"params": head, "lr": args.learning_rate, "weight_decay": args.weight_decay, "name": "head"},
        {"params": backbone, "lr": args.learning_rate * args.backbone_lr_scale, "weight_decay": args.weight_decay,
         "name": "backbone"},
        {"params": codebooks, "lr": args.learning_rate, "weight_decay": 0.0, "name": "codebooks"},
    ]  # fmt: skip
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.learning_rate, momentum=args.momentum)


# checkpoints


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"step_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary `.tmp-*` folders are never listed)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _checkpoint_step(p) >= 0), key=_checkpoint_step)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainerState, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, then rename it: a checkpoint is complete or absent."""
    final = output_dir / CHECKPOINTS_DIR / f"step_{state.global_step}"
    staging = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(staging / TRAINER_STATE_FILE, dataclasses.asdict(state))
        apply_umask(staging)  # accelerate (safetensors) writes 0600 files
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(accelerator: Accelerator, output_dir: Path) -> TrainerState | None:
    """Restore model, optimizer, RNG and sampler states from the newest checkpoint; None when there is none."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    accelerator.load_state(str(latest))
    state = TrainerState(**json.loads((latest / TRAINER_STATE_FILE).read_text()))
    accelerator.print(f"Resumed from {latest} (epoch {state.epoch}, step {state.global_step}).")
    return state


def _write_json(path: Path, payload: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as file:
        json.dump(payload, file, indent=2, default=str)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


# the loop


def build_accelerator(args: TrainingArguments) -> Accelerator:
    """An Accelerator with a seedable sampler (so resumed epochs replay the same order) and trackers.

    Several processes on a machine without CUDA (`accelerate launch --multi_gpu --num_processes 2` on a CPU)
    are joined over gloo on the CPU; otherwise accelerate would start processes that never synchronise.
    """
    report_to = args.report_to
    if report_to == "auto":
        report_to = ["tensorboard"] if _tensorboard_available() else []
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to or None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _tensorboard_available() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )


def train(
    config: MeCoQConfig,
    args: TrainingArguments,
    train_dataset: Dataset,
    validation_queries: Dataset | None = None,
    validation_database: Dataset | None = None,
    accelerator: Accelerator | None = None,
) -> TrainingResult:
    """Train MeCoQ on `train_dataset` (an `image` column; labels are not used) and write a model folder.

    Args:
        config: the model configuration (backbone weights are loaded as `config.backbone_weights` says).
        args: optimisation and run settings.
        train_dataset: unlabelled training images.
        validation_queries, validation_database: labelled splits for model selection (mAP@args.top_k). Keep
            them apart from the final query set. Without them the last epoch's model is kept.
        accelerator: an existing Accelerator (else one is built from `args`).
    """
    if len(train_dataset) == 0:
        raise ValueError("The training dataset is empty: pass at least one image (check the split sizes).")
    if (validation_queries is None) != (validation_database is None):
        raise ValueError("Pass both validation_queries and validation_database, or neither.")
    accelerator = accelerator or build_accelerator(args)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed, deterministic=args.deterministic)

    model = MeCoQModel.for_training(config).to(accelerator.device)
    validation = None
    if validation_queries is not None:
        validation = ValidationSet(
            validation_queries, validation_database, args.top_k, args.batch_size, args.num_workers
        )
    train_loader = _train_dataloader(model, args, train_dataset, accelerator)
    if not model.backbone.is_trainable and validation is not None:
        validation.cache_features(
            model, accelerator, args.feature_cache_dir
        )  # a frozen backbone's features never change
    optimizer = build_optimizer(model, args)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_epochs
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    scheduler = LambdaLR(optimizer, lambda step: learning_rate_factor(
        step, total_steps, warmup_steps, args.learning_rate, args.warmup_start_lr, args.final_lr))  # fmt: skip

    state = (load_latest_checkpoint(accelerator, output_dir) if args.resume else None) or TrainerState()
    if state.global_step:  # the schedule is a function of the step: no scheduler state needs saving
        scheduler.last_epoch = state.global_step
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if accelerator.is_main_process:
        _write_json(output_dir / TRAINING_ARGS_FILE, args.to_dict())
    tracker_config = {**args.to_dict(), **{f"model.{k}": v for k, v in config.to_diff_dict().items()}}
    accelerator.init_trackers(
        "mecoq", config={k: v for k, v in tracker_config.items() if isinstance(v, (int, float, str, bool))}
    )

    network: MeCoQModel = accelerator.unwrap_model(model)
    memory_enabled = config.memory_start_epoch is not None and config.memory_size > 0
    nominal_block = args.batch_size * accelerator.num_processes
    progress = _progress_bar(accelerator, args, total_steps, state.global_step)
    stopped_early = stop = False
    started = last_step_time = time.perf_counter()

    for epoch in range(state.epoch, args.num_epochs):
        train_loader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else train_loader
        )
        use_memory = memory_enabled and epoch >= config.memory_start_epoch
        model.train()
        for batch in batches:
            with accelerator.accumulate(model):
                output = model(**batch, use_memory=use_memory)  # two image views, or two cached feature views
                if not torch.isfinite(output.loss):
                    raise FloatingPointError(
                        f"The loss became {output.loss.item()} at epoch {epoch}, step {state.global_step}. "
                        "Lower learning_rate, raise temperature, or disable mixed precision."
                    )
                accelerator.backward(output.loss)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if memory_enabled:
                codes = accelerator.gather(torch.stack([output.assignments, output.assignments_2]).detach())
                advance = nominal_block if args.memory_pointer == "nominal" else None
                network.update_memory(*_views(codes), advance=advance)
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            now = time.perf_counter()  # images/s include data loading and augmentation
            images_per_second = (
                args.batch_size
                * args.gradient_accumulation_steps
                * accelerator.num_processes
                / (now - last_step_time)
            )
            last_step_time = now
            _log_step(
                accelerator,
                args,
                output_dir,
                state,
                output,
                scheduler.get_last_lr()[0],
                epoch,
                images_per_second,
                progress,
            )
            if args.max_steps is not None and state.global_step >= args.max_steps:
                stop = True
            if stop or (args.checkpoint_every_steps and state.global_step % args.checkpoint_every_steps == 0):
                save_checkpoint(accelerator, output_dir, state, args.keep_checkpoints)
            if stop:
                break
        if stop:
            break
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        record = {
            "epoch": epoch,
            "step": state.global_step,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if validation is not None and (epoch + 1) % args.eval_every_epochs == 0:
            score = validation.mean_average_precision(model, accelerator)
            record["validation_map"] = score
            improved = state.best_metric is None or score > state.best_metric + 1e-6
            if improved:
                state.best_metric, state.best_epoch, state.evaluations_without_improvement = score, epoch, 0
                network.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
            else:
                state.evaluations_without_improvement += 1
            accelerator.print(
                f"epoch {epoch}: validation mAP@{args.top_k} {score:.4f} (best {state.best_metric:.4f} at epoch {state.best_epoch})"
            )
            accelerator.log({"validation/map": score}, step=state.global_step)
            stopped_early = (
                args.patience is not None and state.evaluations_without_improvement >= args.patience
            )
        state.history.append(record)
        _append_log(accelerator, output_dir, {"event": "epoch", **record})
        save_checkpoint(accelerator, output_dir, state, args.keep_checkpoints)
        if stopped_early:
            accelerator.print(f"Stopping early: no improvement in {args.patience} evaluations.")
            break

    if progress is not None:
        progress.close()
    finished = not stop
    if state.best_metric is None:  # no validation split: the last model is the result
        network.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        _write_json(
            output_dir / RUN_RECORD_FILE,
            run_record(config, args, state, train_dataset, accelerator, finished),
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if state.best_metric is not None and finished:  # hand back the selected model, not the last one
        best = MeCoQModel.from_pretrained(output_dir, dtype=torch.float32)
        network.load_state_dict(best.state_dict(), strict=False)
    return TrainingResult(
        network, output_dir, state.best_metric, state.best_epoch, state.history, stopped_early
    )


def _train_dataloader(model: MeCoQModel, args: TrainingArguments, dataset: Dataset, accelerator: Accelerator):
    """Two augmented image views per item, or (cached_views) two cached feature views of a frozen backbone."""
    data_config = model.backbone.data_config
    view = build_train_transform(data_config["input_size"][-1], data_config["mean"], data_config["std"])
    if not args.cached_views:
        return make_train_dataloader(
            dataset, view, args.batch_size, args.seed, args.num_workers, on_bad_image=args.on_bad_image
        )
    if model.backbone.is_trainable:
        raise ValueError(
            f"cached_views={args.cached_views} needs a frozen backbone, but backbone_trainable is "
            f"{model.config.backbone_trainable!r}. Set backbone_trainable='frozen' or cached_views=0."
        )
    accelerator.print(
        f"Caching {args.cached_views} augmented views of {len(dataset)} images with the frozen backbone..."
    )
    features = compute_view_features(model.backbone, dataset, view, args.cached_views, seed=args.seed,
                                     batch_size=args.batch_size, accelerator=accelerator,
                                     show_progress_bar=args.progress_bar, cache_dir=args.feature_cache_dir)  # fmt: skip
    return torch.utils.data.DataLoader(
        CachedViewPairs(features.cpu(), seed=args.seed),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.num_workers,
    )


def _views(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered (P * 2, B, M, K) codes -> all processes' view-1 codes, then all view-2 codes (each (P*B, M, K))."""
    per_process = codes.reshape(-1, 2, *codes.shape[1:])  # (P, 2, B, M, K)
    return per_process[:, 0].flatten(0, 1), per_process[:, 1].flatten(0, 1)


def _progress_bar(accelerator: Accelerator, args: TrainingArguments, total: int, done: int):
    if not (args.progress_bar and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=min(total, args.max_steps or total), initial=done, desc="training", dynamic_ncols=True)


def _log_step(accelerator, args, output_dir, state, output, lr, epoch, images_per_second, progress) -> None:
    values = {
        "loss": output.loss.item(),
        "contrastive": output.contrastive_loss.item(),
        "entropy": output.entropy.item(),
        "codeword_diversity": output.codeword_diversity.item(),
        "lr": lr,
        "images_per_second": images_per_second,
    }
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")
    if state.global_step % args.log_every_steps == 0 or state.global_step == 1:
        accelerator.log({f"train/{k}": v for k, v in values.items()}, step=state.global_step)
        _append_log(
            accelerator, output_dir, {"event": "step", "epoch": epoch, "step": state.global_step, **values}
        )


def _append_log(accelerator: Accelerator, output_dir: Path, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        with open(output_dir / LOG_FILE, "a") as file:
            file.write(json.dumps(record) + "\n")


def run_record(config, args, state, train_dataset, accelerator, finished: bool) -> dict[str, Any]:
    """Everything a model card needs about the run (read by `model_card.build_model_card`)."""
    import accelerate
    import datasets
    import timm
    import transformers

    return {
        "config": config.to_dict(),
        "config_changes": config.to_diff_dict(),
        "training_args": args.to_dict(),
        "training_args_defaults": TrainingArguments(output_dir=args.output_dir).to_dict(),
        "dataset": {
            "train_size": len(train_dataset),
            "info": getattr(train_dataset.info, "description", "") or "",
        },
        "metrics": {
            "best_validation_map": state.best_metric,
            "best_epoch": state.best_epoch,
            "top_k": args.top_k,
            "epochs_run": state.epoch,
            "steps": state.global_step,
        },
        "history": state.history,
        "finished": finished,
        "num_processes": accelerator.num_processes,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
    }


__all__ = [
    "TrainerState",
    "TrainingArguments",
    "TrainingResult",
    "build_optimizer",
    "learning_rate_factor",
    "list_checkpoints",
    "load_latest_checkpoint",
    "save_checkpoint",
    "train",
]
