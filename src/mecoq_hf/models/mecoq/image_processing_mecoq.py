"""Image processor of MeCoQ: turns images of any mode and size into the backbone's `pixel_values`.

It stores the timm data config of the backbone (input size, interpolation, mean/std, crop) in
`preprocessor_config.json` and rebuilds timm's evaluation transform on load, so `AutoImageProcessor` gives the
exact preprocessing the model was trained and evaluated with. Images of every mode become RGB first
(`to_rgb_image`); the training code (`mecoq_hf.transforms`) uses the same function and builds its evaluation
transform through this processor, so training, evaluation and the saved processor share one code path.
Only numpy, PIL, torch, timm and transformers are imported: this file travels with remote-code checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

# the keys of a timm data config, as `timm.data.resolve_model_data_config` returns them
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _as_pil_image(image: Any) -> Image.Image:
    """A PIL image, a (H, W) / (H, W, C) uint8 array or a (C, H, W) uint8 tensor -> a PIL image (any mode)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # (C, H, W) -> (H, W, C)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(
                f"Array images must be uint8 in [0, 255], got dtype {image.dtype}. Convert with "
                "`(array * 255).astype(np.uint8)` or pass PIL images."
            )
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    return image


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white instead of the black that a plain `convert("RGB")` gives."""
    if image.mode == "La":  # PIL converts premultiplied grey+alpha only to "LA"
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey -> 8-bit "L" with a fixed scale (never stretched per image).

    "I;16*" is divided by 257 (65535 -> 255); "I" is treated as 16-bit when its maximum exceeds 255 and as
    8-bit otherwise; "F" in [0, 1] is multiplied by 255, other floats are taken as 0-255. Then round and clip.
    """
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max() > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb_image(image: Any) -> Image.Image:
    """Any image -> an RGB PIL image: the one RGB conversion of mecoq-hf, for training and for inference.

    Accepts a PIL image of any mode, a (H, W) / (H, W, C) uint8 array or a (C, H, W) uint8 tensor.
    Transparent pixels ("RGBA", "LA", "PA", premultiplied "RGBa"/"La", palettes with a transparent colour)
    are composited onto white; wide grey ("I;16", "I", "F") is scaled to 8 bits as `_wide_grey_to_l` says;
    every other mode goes through PIL's `convert("RGB")`.
    """
    image = _as_pil_image(image)
    if image.mode == "RGB":
        return image
    if image.mode in _TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_grey_to_l(image)
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
        unknown = set(data_config or {}) - set(DATA_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"Unknown data config keys {sorted(unknown)}; expected some of {DATA_CONFIG_KEYS}."
            )
        config = {**defaults, **(data_config or {})}
        self.data_config = {
            key: list(value) if isinstance(value, tuple) else value for key, value in config.items()
        }
        self._transform = timm.data.create_transform(
            **{
                key: tuple(value) if isinstance(value, list) else value
                for key, value in self.data_config.items()
            },
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


__all__ = ["DATA_CONFIG_KEYS", "MeCoQImageProcessor", "to_rgb_image"]
