"""The tiny model of the tests, and the run config of the tiny real training runs that CLI-level tests start
with `mecoq train --config`.

timm's `test_efficientnet` (random weights) at 32 px, 16 bits (M = 2, K = 256), one epoch over 64 real
Fashion-MNIST images, 20 queries and 20 validation queries: about 10 s on two cores. Plain functions, imported
as `from tiny_runs import tiny_run_config` (`tests/` is on `sys.path`, see `conftest.py`).
"""

from __future__ import annotations

from typing import Any

import yaml

# MeCoQConfig settings of a tiny model: timm's `test_efficientnet` (random weights), 32 px, M = 2, K = 16.
TINY_MODEL = {
    "backbone": "test_efficientnet",
    "backbone_weights": None,
    "image_size": 32,
    "embedding_dim": 16,
    "num_codebooks": 2,
    "codebook_size": 16,
}

TINY_RUN = {
    "model": {
        "backbone": "test_efficientnet",
        "backbone_weights": None,
        "image_size": 32,
        "embedding_dim": 16,
        "num_codebooks": 2,
        "codebook_size": 256,
    },
    "training": {"num_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "report_to": [], "top_k": 100},
    "data": {
        "source": "fashion-mnist",
        "limit": 400,
        "num_query": 20,
        "num_validation": 20,
        "num_train": 64,
        "seed": 0,
    },
}


def tiny_run_config(
    *, model: dict[str, Any] | None = None, training: dict[str, Any] | None = None, **data: Any
) -> str:
    """The YAML text of the tiny run, with `model` / `training` settings and data settings (keywords) changed;
    a value of None removes a training setting."""
    sections = {name: dict(values) for name, values in TINY_RUN.items()}
    sections["model"].update(model or {})
    for key, value in (training or {}).items():
        if value is None:
            sections["training"].pop(key, None)
        else:
            sections["training"][key] = value
    sections["data"].update(data)
    return yaml.safe_dump(sections, sort_keys=False)


__all__ = ["TINY_MODEL", "TINY_RUN", "tiny_run_config"]
