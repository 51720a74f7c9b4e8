"""Backbone features computed once, for training and evaluating MeCoQ's head on top of a frozen backbone.

With a frozen backbone (the paper's setting for Flickr25K and NUS-WIDE, and our CPU default) nearly all the
compute of a training step is the backbone's forward pass over two augmented views. Computing V augmented
views per training image once and then training on random pairs of them turns each step into a few small
matrix products: on a CPU that is the difference between hours and minutes. The same holds for evaluation:
the database's backbone features never change, so each epoch only re-runs the projection and the quantizer.

The cached views follow the same augmentation recipe, and are computed with the backbone in training mode
(frozen BatchNorm stays in eval mode; dropout, where the backbone has it, stays on, as in the reference code).
The price is a finite set of V views per image instead of a fresh draw every epoch.

When only the last layer groups of the backbone train (`backbone_trainable=N`), the same holds for the
frozen trunk before them: its outputs (`TimmBackbone.forward_trunk`, a few KB per view for EfficientNet-Lite0
at 64 px) are computed once per view (`trunk=True`), and training runs only the tail, the projection and the
quantizer on them (docs/method.md §6.1). `storage_dtype="float16"` halves what is kept.

With a `cache_dir`, features are also kept on disk (safetensors) under a key made of the backbone's weights,
its data config, the dataset's fingerprint and the settings, so repeated runs on the same data (several bit
lengths, ablations, resumed runs) compute them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .data.loaders import ImageDataset, collate_eval, make_eval_dataloader
from .encoding import EncodedDataset, encode_dataset, module_mode
from .file_io import write_atomic
from .progress import phase

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset

logger = logging.getLogger(__name__)


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class _BackboneAsEncoder(nn.Module):
    """Lets `encode_dataset` run a bare backbone: `embed(pixel_values)` -> (B, F) pooled features, or the
    output of the frozen trunk (`trunk=True`). `encode_dataset` switches it to eval mode; `train_mode`
    keeps the backbone in training mode instead (dropout on, frozen BN in eval), as for training views."""

    def __init__(self, backbone: nn.Module, train_mode: bool, trunk: bool) -> None:
        super().__init__()
        self.backbone, self.train_mode, self.trunk = backbone, train_mode, trunk

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.trunk:
            return self.backbone.forward_trunk(pixel_values)  # (B, C, h, w)
        return self.backbone(pixel_values)  # (B, F)

    def train(self, mode: bool = True) -> _BackboneAsEncoder:
        self.training = mode
        self.backbone.train(mode or self.train_mode)
        return self


def default_num_workers() -> int:
    """Loader workers for augmenting views while the main process runs the backbone: one per spare core
    (at most 4), none on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def _storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {tuple(STORAGE_DTYPES)}, got {name!r}.")
    return STORAGE_DTYPES[name]


def _describe_output(backbone: nn.Module, trunk: bool, storage_dtype: str) -> dict[str, Any]:
    """The settings that tell a trunk or reduced-precision cache entry apart (none for pooled float32)."""
    described: dict[str, Any] = {}
    if trunk:
        described["trunk_before"] = backbone.tail_start  # where the trunk is cut
    if storage_dtype != "float32":
        described["dtype"] = storage_dtype
    return described


def _encode(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    accelerator: Accelerator | None,
    *,
    train_mode: bool,
    trunk: bool,
    storage_dtype: str,
    show_progress_bar: bool,
) -> EncodedDataset:
    """Run the backbone (or its trunk) over `loader`, then put the backbone back in the caller's mode."""
    encoder = _BackboneAsEncoder(backbone, train_mode=train_mode, trunk=trunk)
    with module_mode(backbone):  # `encode_dataset` switches it to eval, and `train_mode` back
        encoded = encode_dataset(
            encoder, loader, accelerator, method="embed", show_progress_bar=show_progress_bar
        )
    return encoded._replace(outputs=encoded.outputs.to(_storage_dtype(storage_dtype)))


def compute_features(
    backbone: nn.Module,
    dataset: Dataset,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    train_mode: bool = False,
    trunk: bool = False,
    storage_dtype: str = "float32",
    show_progress_bar: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> EncodedDataset:
    """Pooled backbone features (N, F) of every image of `dataset` in dataset order, with labels and ids.

    The backbone is left in the train/eval mode it had.

    Args:
        backbone: a `TimmBackbone` (or any module mapping (B, 3, H, W) to (B, F)).
        dataset: images in the package's normal form (an `image` column).
        transform: image -> (3, H, W) tensor (the eval transform, or one random view of the training recipe).
        batch_size, num_workers: of the DataLoader.
        accelerator: split the work over processes; every process gets the full result.
        train_mode: run the backbone in training mode (dropout on) as during training.
        trunk: return the outputs of the backbone's frozen trunk, (N, C, h, w), instead of pooled features
            (`TimmBackbone.forward_trunk`, for a backbone whose last layer groups train).
        storage_dtype: "float32", or "float16" to halve the memory and the file.
        cache_dir: keep the result on disk and reuse it (see the module docstring); the eval transform is
            assumed to follow the backbone's data config, as `transforms.build_eval_transform` does.
    """

    def compute() -> EncodedDataset:
        loader = make_eval_dataloader(dataset, transform, batch_size, num_workers)
        return _encode(backbone, loader, accelerator, train_mode=train_mode, trunk=trunk,
                       storage_dtype=storage_dtype, show_progress_bar=show_progress_bar)  # fmt: skip

    settings = {"train_mode": train_mode, **_describe_output(backbone, trunk, storage_dtype)}
    return _cached(_cache_path(cache_dir, "features", backbone, dataset, settings), compute)


def compute_eval_features(
    backbone: nn.Module,
    splits: Sequence[Dataset],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    trunk: bool = False,
    storage_dtype: str = "float32",
    show_progress_bar: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[EncodedDataset]:
    """`compute_features` of each split through the backbone's evaluation transform, the features that
    evaluation scores (training's validation, `mecoq evaluate`, the PQ baseline), in the order given.

    Args:
        backbone: a `TimmBackbone` (its `data_config` gives the transform, `transforms.build_eval_transform`).
        splits: datasets in the package's normal form.
        batch_size, num_workers, accelerator, trunk, storage_dtype, show_progress_bar, cache_dir: as in
            `compute_features`; with the same `cache_dir`, every caller finds the features the others
            computed.
    """
    from .data.transforms import build_eval_transform

    transform = build_eval_transform(backbone.data_config)
    return [
        compute_features(backbone, split, transform, batch_size=batch_size, num_workers=num_workers,
                         accelerator=accelerator, trunk=trunk, storage_dtype=storage_dtype,
                         show_progress_bar=show_progress_bar, cache_dir=cache_dir)
        for split in splits
    ]  # fmt: skip


def view_cache_shape(
    backbone: nn.Module,
    dataset: Dataset,
    view_transform: Callable[[Any], torch.Tensor],
    num_views: int,
    *,
    trunk: bool = False,
) -> tuple[int, ...]:
    """(N, V, ...) the shape `compute_view_features` will return, from one image through the backbone."""
    item = ImageDataset(dataset.select(range(1)), view_transform)[0]
    pixel_values = item["pixel_values"].unsqueeze(0)  # (1, 3, H, W)
    with module_mode(backbone, training=False), torch.no_grad():
        output = backbone.forward_trunk(pixel_values) if trunk else backbone(pixel_values)
    return (len(dataset), num_views, *output.shape[1:])


def view_cache_bytes(shape: Sequence[int], storage_dtype: str = "float32") -> int:
    """Bytes of a view cache of `shape` stored as `storage_dtype`."""
    return math.prod(shape) * torch.empty((), dtype=_storage_dtype(storage_dtype)).element_size()


def compute_view_features(
    backbone: nn.Module,
    dataset: Dataset,
    view_transform: Callable[[Any], torch.Tensor],
    num_views: int,
    *,
    seed: int = 0,
    batch_size: int = 128,
    num_workers: int | None = None,
    accelerator: Accelerator | None = None,
    trunk: bool = False,
    storage_dtype: str = "float32",
    show_progress_bar: bool = True,
    cache_dir: str | os.PathLike | None = None,
    report: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """(N, V, F) features of V independent random views of every image (one pass over the data per view).

    View v of image i is drawn from a generator seeded by (seed, v, i), the draw the image-training loader
    makes for that image in epoch v (`data.loaders.ImageDataset`): the views depend neither on the number
    of loader workers nor on the number of processes.

    `view_transform` must be the training recipe of `transforms.build_train_transform` at the backbone's
    resolution and statistics when `cache_dir` is used (the cache key does not see the transform itself).

    Args:
        backbone, dataset, batch_size, accelerator, show_progress_bar, cache_dir: as in `compute_features`.
        view_transform: image -> one random (3, H, W) view.
        num_views: V >= 2.
        seed: seed of the views.
        num_workers: loader workers that augment while the backbone runs; None: one per spare core (at most
            4, `default_num_workers`).
        trunk: cache the outputs of the frozen trunk, (N, V, C, h, w), instead of pooled features.
        storage_dtype: "float32", or "float16" to halve the memory and the file.
        report: called with one line before the views are computed (their shape and size) or after they were
            read from `cache_dir`; defaults to the module's logger.
    """
    if num_views < 2:
        raise ValueError(
            f"Two views per image are needed for the contrastive loss; got num_views={num_views}."
        )
    say = report or logger.info
    workers = default_num_workers() if num_workers is None else num_workers

    def compute() -> EncodedDataset:
        shape = view_cache_shape(backbone, dataset, view_transform, num_views, trunk=trunk)
        size = view_cache_bytes(shape, storage_dtype) / 2**20
        what = f"outputs of the frozen trunk (before {backbone.tail_start})" if trunk else "pooled features"
        say(f"Caching {num_views} augmented views of {len(dataset)} images as {what}: shape {shape}, "
            f"{storage_dtype}, {size:,.1f} MiB ({workers} augmentation workers).")  # fmt: skip
        per_view = []
        for view in range(num_views):  # view v draws what the image-training loader draws in epoch v
            images = ImageDataset(dataset, view_transform, seed=seed)
            images.set_epoch(view)
            per_view.append(images)
        loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(per_view), batch_size=batch_size,
                                             num_workers=workers, collate_fn=collate_eval)  # fmt: skip
        encoded = _encode(backbone, loader, accelerator, train_mode=True, trunk=trunk,
                          storage_dtype=storage_dtype, show_progress_bar=show_progress_bar)  # fmt: skip
        outputs = encoded.outputs.reshape(num_views, len(dataset), *encoded.outputs.shape[1:])  # (V, N, ...)
        return EncodedDataset(outputs.transpose(0, 1).contiguous(), None, None)  # (N, V, ...)

    settings = {"num_views": num_views, "seed": seed, "views": "seeded per item",
                **_describe_output(backbone, trunk, storage_dtype)}  # fmt: skip
    path = _cache_path(cache_dir, "views", backbone, dataset, settings)
    if path is not None and path.is_file():
        say(f"Using the {num_views} cached views of {len(dataset)} images in {path}.")
    show = "bar" if show_progress_bar and (accelerator is None or accelerator.is_main_process) else "off"
    with phase("caching views", num_views * len(dataset), show=show):  # one bar for all the views
        return _cached(path, compute).outputs


def _cached(path: Path | None, compute: Callable[[], EncodedDataset]) -> EncodedDataset:
    """Load the features at `path` (`_cache_path`) when present, else compute and store them there
    (atomically); without a path, just compute them."""
    if path is None:
        return compute()
    from safetensors.torch import load_file, save_file

    if path.is_file():
        tensors = load_file(str(path))
        return EncodedDataset(tensors["outputs"], tensors.get("labels"), tensors.get("ids"))
    result = compute()
    tensors = {name: value.contiguous() for name, value in result._asdict().items() if value is not None}
    write_atomic(path, lambda name: save_file(tensors, name))
    return result


def _cache_path(
    cache_dir: str | os.PathLike | None, kind: str, backbone: nn.Module, dataset: Dataset, settings: dict
) -> Path | None:
    """Where `kind` features of `backbone` on `dataset` with `settings` are kept (its key hashes the
    backbone's weights: compute it once per call); None without a `cache_dir`."""
    if cache_dir is None:
        return None
    return Path(cache_dir) / f"{kind}-{_cache_key(backbone, dataset, settings)}.safetensors"


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

    Items are `{"features": (F,), "features_2": (F,)}` (or the `keys` given, e.g. `("trunk_features",
    "trunk_features_2")` for trunk outputs of shape (C, h, w)), in float32 whatever the storage dtype. The
    pair depends only on (seed, epoch, i), so the order of workers or processes and resuming mid-epoch do not
    change what is drawn.
    """

    def __init__(
        self,
        view_features: torch.Tensor,
        seed: int = 0,
        keys: tuple[str, str] = ("features", "features_2"),
    ) -> None:
        if view_features.ndim < 3 or view_features.shape[1] < 2:
            raise ValueError(
                f"view_features must have shape (N, V >= 2, ...), got {tuple(view_features.shape)}."
            )
        self.view_features, self.seed, self.epoch, self.keys = view_features, seed, 0, keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.view_features.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        first, second = rng.choice(self.view_features.shape[1], size=2, replace=False)
        views = self.view_features[index]  # (V, ...)
        return {self.keys[0]: views[first].float(), self.keys[1]: views[second].float()}


__all__ = [
    "STORAGE_DTYPES",
    "CachedViewPairs",
    "compute_eval_features",
    "compute_features",
    "compute_view_features",
    "default_num_workers",
    "view_cache_bytes",
    "view_cache_shape",
]
