"""Image processor of MeCoQ: turns images of any mode and size into the backbone's `pixel_values`.

It stores the timm data config of the backbone (input size, interpolation, mean/std, crop) in
`preprocessor_config.json` and rebuilds timm's evaluation transform on load, so `AutoImageProcessor` gives the
exact preprocessing the model was trained and evaluated with. Grey, palette and RGBA images become RGB first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def to_rgb_image(image: Any) -> Image.Image:
    """A PIL image, a (H, W) / (H, W, C) uint8 array or a (C, H, W) uint8 tensor -> an RGB PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(
                f"Array images must be uint8 in [0, 255], got dtype {image.dtype}. Convert with "
                "`(array * 255).astype(np.uint8)` or pass PIL images."
            )
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency on white instead of letting it turn black.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        return Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class MeCoQImageProcessor(BaseImageProcessor):
    r"""
    Preprocessing for [`MeCoQModel`]: RGB conversion, then timm's evaluation transform of the backbone.

    data_config (`dict`, *optional*):
        timm data config: `input_size` (3, H, W), `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`.
        Defaults to EfficientNet-Lite0's (224 px, bicubic, crop 0.875, mean = std = 0.5).

    Example:

    ```python
    >>> from PIL import Image
    >>> from mecoq_hf import MeCoQImageProcessor
    >>> processor = MeCoQImageProcessor({"input_size": (3, 64, 64)})
    >>> processor(Image.new("L", (28, 28)))["pixel_values"].shape
    torch.Size([1, 3, 64, 64])
    ```
    """

    model_input_names = ["pixel_values"]

    def __init__(self, data_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        defaults = {
            "input_size": (3, 224, 224),
            "interpolation": "bicubic",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
        unknown = set(data_config or {}) - set(_DATA_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"Unknown data config keys {sorted(unknown)}; expected some of {_DATA_CONFIG_KEYS}.")
        config = {**defaults, **(data_config or {})}
        self.data_config = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
        self._transform = timm.data.create_transform(
            **{key: tuple(value) if isinstance(value, list) else value for key, value in self.data_config.items()},
            is_training=False,
        )

    @property
    def image_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    def transform(self, image: Any) -> torch.Tensor:
        """One image -> (3, H, W) float tensor."""
        return self._transform(to_rgb_image(image))

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """An image or a list of images -> `BatchFeature` with `pixel_values` of shape (B, 3, H, W)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given: pass at least one image.")
        pixel_values = torch.stack([self.transform(image) for image in images])  # (B, 3, H, W)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_transform", None)
        return output


__all__ = ["MeCoQImageProcessor", "to_rgb_image"]
