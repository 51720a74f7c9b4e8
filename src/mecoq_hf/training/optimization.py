"""The optimizer and the learning-rate schedule of the reference recipe (docs/method.md §6).

SGD with three parameter groups (head, trainable backbone layers at a scaled rate, codebooks at their own
scaled rate without weight decay) and a per-iteration schedule: linear warm-up, then cosine decay. The
schedule is a pure function of the optimizer step, so resuming builds the scheduler at the step reached
(`build_scheduler(..., completed_steps)`) and no scheduler state is ever saved.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..models.mecoq.modeling_mecoq import MeCoQModel
from .arguments import TrainingArguments


def learning_rate_factor(
    step: int, total_steps: int, warmup_steps: int, peak: float, start: float, final: float
) -> float:
    """lr(step) / peak: linear warm-up from `start` over `warmup_steps`, then a cosine from `peak` to `final`.

    The warm-up ends at the peak on step `warmup_steps - 1` (a linspace from `start` to `peak`).
    """
    if step < warmup_steps:
        lr = start + (peak - start) * step / max(warmup_steps - 1, 1)
    else:
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        lr = final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr / peak


def build_optimizer(model: MeCoQModel, args: TrainingArguments) -> torch.optim.SGD:
    """SGD with the backbone at `learning_rate * backbone_lr_scale`, the codebooks at `learning_rate *
    codebook_lr_scale` without weight decay, the projection at `learning_rate`.

    Each group records its peak rate as `initial_lr` (the key torch schedulers read), so an optimizer restored
    from a checkpoint still knows the peaks its schedule scales.
    """
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    codebooks = [p for p in (model.quantizer.codebooks,) if p.requires_grad]
    head = [p for p in model.projection.parameters() if p.requires_grad]
    backbone_lr = args.learning_rate * args.backbone_lr_scale
    groups = [
        {"params": head, "lr": args.learning_rate, "weight_decay": args.weight_decay, "name": "head"},
        {"params": backbone, "lr": backbone_lr, "weight_decay": args.weight_decay, "name": "backbone"},
        {
            "params": codebooks,
            "lr": args.learning_rate * args.codebook_lr_scale,
            "weight_decay": 0.0,
            "name": "codebooks",
        },  # fmt: skip
    ]
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.learning_rate, momentum=args.momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, steps_per_epoch: int, completed_steps: int = 0
) -> LambdaLR:
    """The per-iteration warm-up + cosine schedule over `args.num_epochs` epochs of `steps_per_epoch` steps.

    Args:
        optimizer: from `build_optimizer` (its groups hold `initial_lr`, the peak each group is scaled from).
        args: `learning_rate` (the peak), `warmup_epochs`, `warmup_start_lr`, `final_lr`, `num_epochs`.
        steps_per_epoch: optimizer steps per epoch.
        completed_steps: optimizer steps already taken (a resumed run); the rates are set for the next one.

    Returns:
        A `LambdaLR` to `step()` after every optimizer step.
    """
    schedule = functools.partial(
        learning_rate_factor,
        total_steps=steps_per_epoch * args.num_epochs,
        warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        peak=args.learning_rate,
        start=args.warmup_start_lr,
        final=args.final_lr,
    )
    # `last_epoch` is the last step taken; the constructor steps once, to `completed_steps`.
    return LambdaLR(optimizer, schedule, last_epoch=completed_steps - 1)


__all__ = ["build_optimizer", "build_scheduler", "learning_rate_factor"]
