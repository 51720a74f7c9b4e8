"""The training arguments of the reference-script presets (docs/method.md §9), keyed by the same names as the
model presets (`MeCoQConfig.from_preset`, `models/mecoq/configuration_mecoq.py`).

A reference script fixes both the model (the `MeCoQConfig` preset) and the run: SGD at lr 0.01 with batch 128,
at most 50 epochs with patience 10, a per-dataset weight decay, mAP@1000 (CIFAR-10) or mAP@5000 (Flickr25K,
NUS-WIDE) for model selection, and the backbone trained at the head's rate: the reference meant a scale of
1e-3, but its scheduler overwrote it (docs/method.md §13.9), so `backbone_lr_scale=1.0` reproduces what ran.
`official` and `paper` carry no training arguments: the `TrainingArguments` defaults apply.
"""

from __future__ import annotations

from typing import Any

_REFERENCE_RUN = {
    "learning_rate": 0.01,
    "batch_size": 128,
    "num_epochs": 50,
    "patience": 10,
    "warmup_epochs": 1.0,
    "warmup_start_lr": 1e-5,
    "final_lr": 1e-5,
    "momentum": 0.9,
    "backbone_lr_scale": 1.0,
    "seed": 2021,
}
# name: (weight decay beta, K of mAP@K)
_SCRIPT_RUNS = {
    "flickr25k-16": (0.1, 5000),
    "flickr25k-32": (0.1, 5000),
    "flickr25k-64": (0.1, 5000),
    "cifar10-i-16": (1e-3, 1000),
    "cifar10-i-32": (1e-3, 1000),
    "cifar10-i-64": (1e-3, 1000),
    "cifar10-ii-16": (1e-2, 1000),
    "cifar10-ii-32": (5e-3, 1000),
    "cifar10-ii-64": (1e-2, 1000),
    "nuswide-16": (1e-2, 5000),
    "nuswide-32": (1e-2, 5000),
    "nuswide-64": (1e-2, 5000),
}
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    name: {**_REFERENCE_RUN, "weight_decay": weight_decay, "top_k": top_k}
    for name, (weight_decay, top_k) in _SCRIPT_RUNS.items()
}


def training_preset_settings(name: str) -> dict[str, Any]:
    """The `TrainingArguments` settings of preset `name` (a copy; empty for `official`, `paper` and any
    preset without a reference run). Unknown names are reported by `MeCoQConfig.preset_settings`."""
    return dict(TRAINING_PRESETS.get(name, {}))


__all__ = ["TRAINING_PRESETS", "training_preset_settings"]
