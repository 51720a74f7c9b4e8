"""`TrainingArguments`: the optimisation and run settings of a training run (the model's: `MeCoQConfig`).

Each field is either a hyperparameter (it changes the trained model) or plumbing (where files go, how much is
logged, how many loader workers run). Plumbing fields carry `metadata={"plumbing": True}`, so model cards and
reports tell the two apart from the arguments themselves (`TrainingArguments.plumbing_names()`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

_POSITIVE = (
    "num_epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "eval_every_epochs",
    "keep_checkpoints",
)
_POSITIVE_OR_NONE = ("max_steps", "patience", "top_k", "checkpoint_every_steps")
_NON_NEGATIVE = ("warmup_epochs", "warmup_start_lr", "final_lr", "momentum", "weight_decay")
_CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "memory_pointer": ("nominal", "actual"),
    "on_bad_image": ("raise", "skip"),
    "codebook_init": ("random", "kmeans"),
    "cache_dtype": ("float32", "float16"),
}


def _plumbing(default: Any) -> Any:
    """A field that does not change the trained model: never shown as a hyperparameter."""
    return field(default=default, metadata={"plumbing": True})


@dataclass
class TrainingArguments:
    """Optimisation and run settings; the model's own settings live in `MeCoQConfig`.

    Defaults follow the reference recipe (docs/method.md §6): SGD with momentum 0.9, lr 0.01, one epoch of
    linear warm-up from 1e-5, cosine decay to 1e-5, batch 128, at most 50 epochs, patience 10.

    Args:
        output_dir: the run's folder; becomes a model folder (see `RunFolder`).
        num_epochs: maximum number of epochs.
        max_steps: stop after this many optimizer steps in total (a checkpoint is written there); the schedule
            still spans `num_epochs`, so a stopped run resumes exactly.
        batch_size: images per process per step (each gives two views).
        learning_rate: peak learning rate of the head (projection and codebooks).
        backbone_lr_scale: the trainable backbone layers use learning_rate * backbone_lr_scale. The reference
            code meant 1e-3 but its scheduler overwrote it (docs/method.md §13.9); here the scale applies.
        codebook_lr_scale: trainable codebooks use learning_rate * codebook_lr_scale (no weight decay; the
            schedule applies). Their codewords are rescaled to unit norm after every optimizer step.
        codebook_init: "random" (unit-norm Xavier directions, as the paper and the reference code) or
            "kmeans": spherical k-means on the projected training embeddings before the first step
            (docs/method.md §2.3); needs at least codebook_size training images.
        warmup_epochs, warmup_start_lr, final_lr: per-iteration linear warm-up, then cosine decay.
        momentum, weight_decay: SGD settings (weight decay is the paper's beta; not applied to codebooks).
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: "no", "fp16" or "bf16" (ignored when an `accelerator` is passed to `train`).
        seed, deterministic: seeding of python, numpy and torch; deterministic algorithms when True.
        eval_every_epochs, patience, top_k: validation mAP@top_k (K of mAP@K) every N epochs; stop after
            `patience` evaluations without improvement (None: never stop early).
        checkpoint_every_steps: also checkpoint every N optimizer steps (epochs always end with one).
        keep_checkpoints: how many checkpoint folders to keep.
        resume: continue from the newest checkpoint in `output_dir/checkpoints`.
        memory_pointer: "nominal" advances the memory pointer by the nominal global batch even after a short
            last batch (reference behaviour), "actual" by the number of codes written. Under several processes
            the memory gets every process's codes (the padding of a short last batch left out);
            `MeCoQConfig.memory_size` is the size of that shared memory and does not grow with the number of
            processes (docs/method.md §5).
        cached_views: 0 runs the backbone on fresh augmentations every step. V >= 2 computes V augmented
            views per training image once and trains on random pairs of them: with a frozen backbone, its
            pooled features (only the head trains); with `backbone_trainable=N`, the outputs of the frozen
            trunk before the last N layer groups (the tail, the head and the codebooks train). Much faster on
            a CPU (docs/method.md §6.1, `feature_cache.py`).
        cache_dtype: "float32" or "float16" storage of cached views and validation trunk outputs.
        feature_cache_dir: keep those frozen-backbone features on disk and reuse them across runs.
        num_workers, on_bad_image: DataLoader workers; "raise" or "skip" for unreadable images.
        log_every_steps, report_to, progress_bar: JSON-lines logging cadence, Accelerate trackers ("auto":
            TensorBoard when installed), and a tqdm bar per phase on the main process (False: one line per
            phase when it ends; `progress.phase`).
    """

    output_dir: str = field(metadata={"plumbing": True})
    num_epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 128
    learning_rate: float = 0.01
    backbone_lr_scale: float = 1e-3
    codebook_lr_scale: float = 1.0
    codebook_init: str = "random"
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
    checkpoint_every_steps: int | None = _plumbing(None)
    keep_checkpoints: int = _plumbing(2)
    resume: bool = _plumbing(False)
    memory_pointer: str = "nominal"
    cached_views: int = 0
    cache_dtype: str = "float32"
    feature_cache_dir: str | None = _plumbing(None)
    num_workers: int = _plumbing(0)
    on_bad_image: str = _plumbing("raise")
    log_every_steps: int = _plumbing(10)
    report_to: list[str] | str = _plumbing("auto")
    progress_bar: bool = _plumbing(True)

    def __post_init__(self) -> None:
        self._check_types()
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in _POSITIVE_OR_NONE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}.")
        if self.cached_views == 1 or self.cached_views < 0:
            raise ValueError(
                f"cached_views must be 0 (off) or >= 2 views per image, got {self.cached_views}."
            )
        if self.learning_rate <= 0 or self.backbone_lr_scale < 0 or self.codebook_lr_scale < 0:
            raise ValueError(
                f"learning_rate must be > 0 and backbone_lr_scale, codebook_lr_scale >= 0, got "
                f"{self.learning_rate}, {self.backbone_lr_scale} and {self.codebook_lr_scale}."
            )
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")

    def _check_types(self) -> None:
        """Numbers are numbers (floats finite: a NaN learning rate would train NaN weights), flags are bools.

        Raises:
            TypeError: a value of the wrong kind (e.g. the string "abc" for `cached_views`).
            ValueError: a NaN or infinite float.
        """
        for item in dataclasses.fields(self):
            value, kind = getattr(self, item.name), item.type.split(" | ")[0]
            if value is None and "None" in item.type:
                continue
            if kind in ("int", "float", "bool") and not _is_kind(value, kind):
                expected = {"int": "a whole number", "float": "a number", "bool": "true or false"}[kind]
                raise TypeError(f"{item.name} must be {expected}, got {value!r}.")
            if kind == "float" and not math.isfinite(value):
                raise ValueError(f"{item.name} must be a finite number, got {value}.")

    def to_dict(self) -> dict[str, Any]:
        """Every argument, JSON-ready (the content of `training_args.json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def plumbing_names(cls) -> frozenset[str]:
        """The arguments that leave the trained model unchanged (folders, logging, workers, checkpoints)."""
        return frozenset(item.name for item in dataclasses.fields(cls) if item.metadata.get("plumbing"))


def _is_kind(value: Any, kind: str) -> bool:
    """Whether `value` is an int (numpy's too), a real number (an int will do) or a bool; a bool is never
    taken for a number."""
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    return isinstance(value, numbers.Integral if kind == "int" else numbers.Real)


__all__ = ["TrainingArguments"]
