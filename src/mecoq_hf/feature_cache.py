"""Backbone features computed once, for training and evaluating MeCoQ's head on top of a frozen backbone.

With a frozen backbone (the paper's setting for Flickr25K and NUS-WIDE, and our CPU default) nearly all the
compute of a training step is the backbone's forward pass over two augmented views. Computing V augmented
views per training image once and then training on random pairs of them turns each step into a few small
matrix products: on a CPU that is the difference between hours and minutes. The same holds for evaluation:
the database's backbone features never change, so each epoch only re-runs the projection and the quantizer.

The cached views follow the same augmentation recipe, and are computed with the backbone in training mode
(frozen BatchNorm stays in eval mode; dropout, where the backbone has it, stays on, as in the reference code).
The price is a finite set of V views per image instead of a fresh draw every epoch.

With a `cache_dir`, features are also kept on disk (safetensors) under a key made of the backbone's weights,
its data config, the dataset's fingerprint and the settings, so repeated runs on the same data (several bit
lengths, ablations, resumed runs) compute them once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .data.loaders import make_eval_dataloader
from .encoding import EncodedDataset, encode_dataset
from .file_io import write_atomic
from .progress import phase

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset


class _BackboneAsEncoder(nn.Module):
    """Lets `encode_dataset` run a bare backbone: `embed(pixel_values)` -> (B, F) pooled features."""

    def __init__(self, backbone: nn.Module, keep_train_mode: bool) -> None:
        super().__init__()
        self.backbone, self.keep_train_mode = backbone, keep_train_mode

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)

    def train(self, mode: bool = True) -> _BackboneAsEncoder:
        self.training = mode
        self.backbone.train(
            mode or self.keep_train_mode
        )  # `encode_dataset` calls eval(); views want train mode
        return self


def compute_features(
    backbone: nn.Module,
    dataset: Dataset,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    train_mode: bool = False,
    show_progress_bar: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> EncodedDataset:
    """Pooled backbone features (N, F) of every image of `dataset` in dataset order, with labels and ids.

    Args:
        backbone: a `TimmBackbone` (or any module mapping (B, 3, H, W) to (B, F)).
        dataset: images in the package's normal form (an `image` column).
        transform: image -> (3, H, W) tensor (the eval transform, or one random view of the training recipe).
        batch_size, num_workers: of the DataLoader.
        accelerator: split the work over processes; every process gets the full result.
        train_mode: run the backbone in training mode (dropout on) as during training.
        cache_dir: keep the result on disk and reuse it (see the module docstring); the eval transform is
            assumed to follow the backbone's data config, as `transforms.build_eval_transform` does.
    """

    def compute() -> EncodedDataset:
        loader = make_eval_dataloader(dataset, transform, batch_size, num_workers)
        encoder = _BackboneAsEncoder(backbone, keep_train_mode=train_mode)
        return encode_dataset(
            encoder, loader, accelerator, method="embed", show_progress_bar=show_progress_bar
        )

    return _cached(cache_dir, "features", backbone, dataset, {"train_mode": train_mode}, compute)


def compute_eval_features(
    backbone: nn.Module,
    splits: Sequence[Dataset],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    show_progress_bar: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[EncodedDataset]:
    """`compute_features` of each split through the backbone's evaluation transform, the features that
    evaluation scores (training's validation, `mecoq evaluate`, the PQ baseline), in the order given.

    Args:
        backbone: a `TimmBackbone` (its `data_config` gives the transform, `transforms.build_eval_transform`).
        splits: datasets in the package's normal form.
        batch_size, num_workers, accelerator, show_progress_bar, cache_dir: as in `compute_features`; with
            the same `cache_dir`, every caller finds the features the others computed.
    """
    from .data.transforms import build_eval_transform

    transform = build_eval_transform(backbone.data_config)
    return [
        compute_features(backbone, split, transform, batch_size=batch_size, num_workers=num_workers,
                         accelerator=accelerator, show_progress_bar=show_progress_bar, cache_dir=cache_dir)
        for split in splits
    ]  # fmt: skip


def compute_view_features(
    backbone: nn.Module,
    dataset: Dataset,
    view_transform: Callable[[Any], torch.Tensor],
    num_views: int,
    *,
    seed: int = 0,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    show_progress_bar: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """(N, V, F) features of V independent random views of every image (one pass over the data per view).

    `view_transform` must be the training recipe of `transforms.build_train_transform` at the backbone's
    resolution and statistics when `cache_dir` is used (the cache key does not see the transform itself).
    """
    if num_views < 2:
        raise ValueError(
            f"Two views per image are needed for the contrastive loss; got num_views={num_views}."
        )

    def compute() -> EncodedDataset:
        views = []
        for view in range(num_views):
            torch.manual_seed(seed * 1000 + view)  # augmentations draw from torch's global RNG
            views.append(
                compute_features(
                    backbone,
                    dataset,
                    view_transform,
                    batch_size=batch_size,
                    accelerator=accelerator,
                    train_mode=True,
                    show_progress_bar=show_progress_bar,
                ).outputs  # fmt: skip
            )
        return EncodedDataset(torch.stack(views, dim=1), None, None)  # (N, V, F)

    settings = {"num_views": num_views, "seed": seed}
    show = "bar" if show_progress_bar and (accelerator is None or accelerator.is_main_process) else "off"
    with phase("caching views", num_views * len(dataset), show=show):  # one bar for all the views
        return _cached(cache_dir, "views", backbone, dataset, settings, compute).outputs


def _cached(
    cache_dir: str | os.PathLike | None,
    kind: str,
    backbone: nn.Module,
    dataset: Dataset,
    settings: dict[str, Any],
    compute: Callable[[], EncodedDataset],
) -> EncodedDataset:
    """Load `kind` features from `cache_dir` when present, else compute and store them (atomically)."""
    if cache_dir is None:
        return compute()
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"{kind}-{_cache_key(backbone, dataset, settings)}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return EncodedDataset(tensors["outputs"], tensors.get("labels"), tensors.get("ids"))
    result = compute()
    tensors = {name: value.contiguous() for name, value in result._asdict().items() if value is not None}
    write_atomic(path, lambda name: save_file(tensors, name))
    return result


def _cache_key(backbone: nn.Module, dataset: Dataset, settings: dict[str, Any]) -> str:
    """sha256 of the backbone's weights, its data config, the dataset's fingerprint and the settings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    described = {
        "data_config": getattr(backbone, "data_config", None),
        "dataset": dataset._fingerprint,
        **settings,
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


class CachedViewPairs(torch.utils.data.Dataset):
    """Training items from cached view features: two distinct random views of image i per epoch.

    Items are `{"features": (F,), "features_2": (F,)}`; the pair depends only on (seed, epoch, i), so the
    order of workers or processes and resuming mid-epoch do not change what is drawn.
    """

    def __init__(self, view_features: torch.Tensor, seed: int = 0) -> None:
        if view_features.ndim != 3 or view_features.shape[1] < 2:
            raise ValueError(
                f"view_features must have shape (N, V >= 2, F), got {tuple(view_features.shape)}."
            )
        self.view_features, self.seed, self.epoch = view_features, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.view_features.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        first, second = rng.choice(self.view_features.shape[1], size=2, replace=False)
        return {"features": self.view_features[index, first], "features_2": self.view_features[index, second]}


__all__ = ["CachedViewPairs", "compute_eval_features", "compute_features", "compute_view_features"]
