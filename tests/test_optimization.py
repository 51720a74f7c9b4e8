"""The optimizer groups and the warm-up + cosine schedule (`training.optimization`), resumed mid-run."""

from __future__ import annotations

import math
import warnings

import pytest
from tiny_runs import TINY_MODEL

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.training import TrainingArguments
from mecoq_hf.training.optimization import build_optimizer, build_scheduler, learning_rate_factor

TINY = {**TINY_MODEL, "backbone_trainable": 1}


@pytest.fixture(scope="module")
def model() -> MeCoQModel:
    warnings.simplefilter("ignore")
    return MeCoQModel(MeCoQConfig(**TINY))


def test_learning_rate_schedule_matches_reference_recipe():
    total, warmup, peak, start, final = 100, 10, 0.01, 1e-5, 1e-5
    lrs = [peak * learning_rate_factor(step, total, warmup, peak, start, final) for step in range(total + 1)]
    assert lrs[0] == pytest.approx(start)
    assert lrs[warmup - 1] == pytest.approx(peak)  # linspace(start, peak, warmup) ends at the peak
    assert lrs[warmup] == pytest.approx(peak)
    middle = warmup + (total - warmup) // 2
    assert lrs[middle] == pytest.approx(
        final + 0.5 * (peak - final) * (1 + math.cos(math.pi * 0.5)), rel=1e-6
    )
    assert lrs[total] == pytest.approx(final)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))


def test_backbone_learning_rate_scale_survives_the_scheduler(model, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=0.05, backbone_lr_scale=1e-3, num_epochs=2
    )
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch=5)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert groups["backbone"] == pytest.approx(groups["head"] * 1e-3)
    names = {g["name"] for g in optimizer.param_groups}
    assert names == {"head", "backbone", "codebooks"}
    codebook_group = next(g for g in optimizer.param_groups if g["name"] == "codebooks")
    assert codebook_group["weight_decay"] == 0.0


def test_a_resumed_schedule_continues_with_the_same_rates(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.05, num_epochs=3, warmup_epochs=1.0)
    steps_per_epoch, stop = 4, 6
    straight_optimizer = build_optimizer(model, args)
    straight = build_scheduler(straight_optimizer, args, steps_per_epoch)
    rates = [straight.get_last_lr()]
    for _ in range(3 * steps_per_epoch):
        straight_optimizer.step()
        straight.step()
        rates.append(straight.get_last_lr())
    head = args.learning_rate
    total, warmup = 3 * steps_per_epoch, steps_per_epoch
    assert rates[stop][0] == head * learning_rate_factor(stop, total, warmup, head, 1e-5, 1e-5)

    # A run stopped after `stop` steps: its optimizer state is saved and restored into a fresh optimizer
    # (the groups' learning rates are then those of the step it stopped at), as a checkpoint does.
    stopped_optimizer = build_optimizer(model, args)
    stopped = build_scheduler(stopped_optimizer, args, steps_per_epoch)
    for _ in range(stop):
        stopped_optimizer.step()
        stopped.step()
    restored = build_optimizer(model, args)
    restored.load_state_dict(stopped_optimizer.state_dict())
    resumed = build_scheduler(restored, args, steps_per_epoch, completed_steps=stop)
    assert resumed.get_last_lr() == rates[stop]
    assert [group["lr"] for group in restored.param_groups] == rates[stop]
    for step in range(stop + 1, total + 1):
        restored.step()
        resumed.step()
        assert resumed.get_last_lr() == rates[step], step
