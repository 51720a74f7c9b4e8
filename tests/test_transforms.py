"""Tests for mecoq_hf.transforms on real images: the view recipe, the evaluation transform, and the proof that
the evaluation transform is the saved image processor's (Fashion-MNIST and foolbox's photo fixtures)."""

from __future__ import annotations

import PIL.Image
import pytest
import timm.data
import torch
from datasets import Dataset
from real_data import (
    FOOLBOX_INSTALL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE0_DATA_CONFIG,
    foolbox_data_dir,
    require_fashion_mnist,
    require_foolbox_data,
)
from torchvision import transforms as T

from mecoq_hf import MeCoQImageProcessor
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.transforms import TwoViewTransform, build_eval_transform, build_train_transform

require_fashion_mnist()


@pytest.fixture(scope="session")
def fmnist_test() -> Dataset:
    return load_fashion_mnist("test")


# the view recipe


def test_train_transform_follows_the_recipe(fmnist_test):
    transform = build_train_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    steps = {type(step).__name__: step for step in transform.transforms}
    assert steps["RandomResizedCrop"].size == (32, 32) and steps["RandomResizedCrop"].scale == (0.5, 1.0)
    jitter, blur = (step for step in transform.transforms if isinstance(step, T.RandomApply))
    assert jitter.p == 0.7 and isinstance(jitter.transforms[0], T.ColorJitter)
    assert jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue == (-0.1, 0.1)
    assert (
        blur.p == 0.5 and blur.transforms[0].kernel_size == (3, 3) and blur.transforms[0].sigma == (0.1, 2.0)
    )
    assert steps["RandomGrayscale"].p == 0.2 and steps["RandomHorizontalFlip"].p == 0.5
    assert tuple(steps["Normalize"].mean) == IMAGENET_MEAN and tuple(steps["Normalize"].std) == IMAGENET_STD

    torch.manual_seed(0)
    view_1, view_2 = TwoViewTransform(transform)(fmnist_test[0]["image"])  # grey 28x28 source
    assert view_1.shape == view_2.shape == (3, 32, 32) and view_1.dtype == torch.float32
    assert not torch.equal(view_1, view_2)


def test_eval_transform_sizes_channels_and_normalisation(fmnist_test):
    grey = build_eval_transform(LITE0_DATA_CONFIG, image_size=64)(fmnist_test[0]["image"])
    assert grey.shape == (3, 64, 64) and grey.dtype == torch.float32
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert build_eval_transform(LITE0_DATA_CONFIG)(fmnist_test[0]["image"]).shape == (3, 224, 224)

    flat = PIL.Image.new("L", (28, 28), 128)
    out = build_eval_transform(LITE0_DATA_CONFIG, image_size=32)(flat)
    torch.testing.assert_close(out, torch.full((3, 32, 32), (128 / 255 - 0.5) / 0.5), atol=1e-5, rtol=0)
    imagenet = build_eval_transform(
        {**LITE0_DATA_CONFIG, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}, image_size=32
    )
    per_channel = imagenet(flat).mean(dim=(1, 2))
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(per_channel, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="input_size"):
        build_eval_transform({"mean": IMAGENET_MEAN})


def test_eval_transform_on_real_photos():
    photo = PIL.Image.open(min(require_foolbox_data().glob("imagenet_*")))
    assert min(photo.size) >= 224
    assert build_eval_transform(LITE0_DATA_CONFIG, image_size=48)(photo).shape == (3, 48, 48)


# the evaluation transform is the image processor's


def real_images(fmnist_test: Dataset) -> dict[str, PIL.Image.Image]:
    """The first Fashion-MNIST test image (grey 28x28) and, when foolbox is installed, an ImageNet photo."""
    images = {"fashion-mnist": fmnist_test[0]["image"]}
    folder = foolbox_data_dir()
    if folder is not None:
        images["photo"] = PIL.Image.open(min(folder.glob("imagenet_*")))
    return images


@pytest.mark.parametrize("source", ["fashion-mnist", "photo"])
@pytest.mark.parametrize("image_size", [None, 48])
def test_eval_transform_is_the_saved_processors_transform(fmnist_test, tmp_path, source, image_size):
    images = real_images(fmnist_test)
    if source not in images:
        pytest.skip(f"foolbox==3.3.4 is not installed ({FOOLBOX_INSTALL})")
    image = images[source]
    config = (
        LITE0_DATA_CONFIG
        if image_size is None
        else {**LITE0_DATA_CONFIG, "input_size": (3, image_size, image_size)}
    )
    MeCoQImageProcessor(config).save_pretrained(tmp_path)  # writes preprocessor_config.json
    reloaded = MeCoQImageProcessor.from_pretrained(tmp_path)

    ours = build_eval_transform(LITE0_DATA_CONFIG, image_size=image_size)(image)  # (3, H, W)
    processed = reloaded(image)["pixel_values"]  # (1, 3, H, W)
    side = image_size or 224
    assert ours.shape == (3, side, side) and processed.shape == (1, 3, side, side)
    assert torch.equal(processed[0], ours)
    assert torch.equal(MeCoQImageProcessor(config)(image)["pixel_values"][0], ours)
    # and it is timm's evaluation transform of the RGB image, not some look-alike
    timm_eval = timm.data.create_transform(**config, is_training=False)
    assert torch.equal(timm_eval(image.convert("RGB")), ours)
    assert ours.std() > 0.1  # a real image, not a constant


def test_train_transform_runs_its_steps_in_the_recipes_order(fmnist_test, monkeypatch):
    """Trace the torchvision operations the composed transform really executes on a real image, over 300
    draws: crop -> flip -> colour jitter (p 0.7) -> grayscale (p 0.2) -> 3x3 blur (p 0.5) -> to tensor ->
    normalise (docs/method.md §3.1), each optional step at its probability."""
    import torchvision.transforms.functional as TF

    steps = {
        "resized_crop": "crop",
        "hflip": "flip",
        "adjust_brightness": "jitter",
        "adjust_contrast": "jitter",
        "adjust_saturation": "jitter",
        "adjust_hue": "jitter",
        "rgb_to_grayscale": "grayscale",
        "gaussian_blur": "blur",
        "to_tensor": "to_tensor",
        "normalize": "normalize",
    }
    trace: list[tuple[str, object]] = []

    def traced(name: str, original):
        def run(image, *args, **kwargs):
            size = image.size if isinstance(image, PIL.Image.Image) else tuple(image.shape)
            trace.append((steps[name], (size, args[:1])))
            return original(image, *args, **kwargs)

        return run

    for name in steps:
        monkeypatch.setattr(TF, name, traced(name, getattr(TF, name)))
    order = ["crop", "flip", "jitter", "grayscale", "blur", "to_tensor", "normalize"]
    transform = build_train_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    image = fmnist_test[0]["image"]
    counts = dict.fromkeys(order, 0)
    torch.manual_seed(0)
    for _ in range(300):
        trace.clear()
        view = transform(image)
        executed = [step for i, (step, _) in enumerate(trace) if i == 0 or trace[i - 1][0] != step]
        assert executed == [step for step in order if step in executed], executed  # recipe order
        assert executed[0] == "crop" and executed[-2:] == ["to_tensor", "normalize"]
        for step in executed:
            counts[step] += 1
        for step, (size, args) in trace:
            if step == "blur":
                assert size == (32, 32) and list(args[0]) == [3, 3]  # after the crop, a 3x3 kernel
        assert view.shape == (3, 32, 32)
    expected = {"flip": 0.5, "jitter": 0.7, "grayscale": 0.2, "blur": 0.5}
    for step, probability in expected.items():
        assert counts[step] / 300 == pytest.approx(probability, abs=0.1), (step, counts[step])
    assert counts["crop"] == counts["to_tensor"] == counts["normalize"] == 300
