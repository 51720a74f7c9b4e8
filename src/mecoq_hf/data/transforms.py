"""Image transforms of MeCoQ: the random view recipe for training and the evaluation transform.

See docs/method.md §3.

- `build_train_transform` draws one augmented view; `TwoViewTransform` applies it twice, independently, to
  give the two views of the contrastive loss.
- `build_eval_transform` is the query/database transform. It is the `transform` of a `MeCoQImageProcessor`
  built from the same data config, so the preprocessing used in training-time evaluation is, by construction,
  the one saved in `preprocessor_config.json` and reloaded by `AutoImageProcessor`.

Both start with `to_rgb_image`, the package's single RGB conversion (it lives in `image_processing_mecoq`,
which must stay importable from remote-code checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from torchvision import transforms as T

from ..models.mecoq.image_processing_mecoq import DATA_CONFIG_KEYS, MeCoQImageProcessor, to_rgb_image


def build_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """One draw of the MeCoQ view recipe (docs/method.md §3.1); `TwoViewTransform` makes the two views.

    The backbone's mean/std are passed in: (0.5, 0.5, 0.5) for EfficientNet-Lite, ImageNet statistics for
    the paper's VGG-16. The 3x3 blur runs on the PIL image with torchvision instead of OpenCV.

    Args:
        image_size (`int`): side of the square output crop, in pixels.
        mean (`Sequence[float]`): per-channel mean of the backbone's normalisation.
        std (`Sequence[float]`): per-channel standard deviation of the backbone's normalisation.
    """
    return T.Compose([
        to_rgb_image,
        T.RandomResizedCrop(image_size, scale=(0.5, 1.0)),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.7),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=3, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip


class TwoViewTransform:
    """Applies one random transform twice, independently: image -> (view 1, view 2), each (3, H, W)."""

    def __init__(self, transform: Callable[[PIL.Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: PIL.Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.transform!r})"


def build_eval_transform(
    data_config: dict[str, Any], image_size: int | None = None
) -> Callable[[Any], torch.Tensor]:
    """Query/database transform from a timm data config: image -> (3, image_size, image_size) float tensor.

    The result is `MeCoQImageProcessor(config).transform`: RGB via `to_rgb_image`, then timm's evaluation
    transform (resize to size / crop_pct, centre crop, ToTensor, Normalize). Keys other than the six of a
    timm data config are ignored; keys the config lacks take the processor's defaults (EfficientNet-Lite0:
    bicubic, crop 0.875, mean = std = 0.5). Images smaller than the output (28x28 Fashion-MNIST) are
    upsampled.

    Args:
        data_config (`dict`): `resolve_model_data_config(model)`, `backbone.data_config` or the
            `data_config` of a saved processor.
        image_size (`int`, *optional*): overrides the config's input size (e.g. 64 px for fast CPU runs).
    """
    config = {key: data_config[key] for key in DATA_CONFIG_KEYS if key in data_config}
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    if "input_size" not in config:
        raise ValueError(
            f"The data config has no 'input_size' (keys: {sorted(data_config)}); pass image_size=."
        )
    return MeCoQImageProcessor(config).transform


__all__ = ["TwoViewTransform", "build_eval_transform", "build_train_transform"]
