"""The torch side of the data room: normal-form image datasets as `torch.utils.data` loaders.

`ImageDataset` decodes images itself (from the `{"bytes", "path"}` values of an `Image(decode=False)`
column), so an unreadable file is reported with its path and is raised or skipped as asked (`on_bad_image`);
the collate functions drop skipped rows. Training loaders yield two augmented views per image, evaluation
loaders one view in dataset order with ids and labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets import Dataset, Image
from torch.utils.data import DataLoader

from .sources import BadImageError, BadImagePolicy, _check_policy, _require_columns, _where, decode_image
from .transforms import TwoViewTransform

logger = logging.getLogger(__name__)


class ImageDataset(torch.utils.data.Dataset):
    """Torch view of a normal-form dataset: item = {"pixel_values"[, "pixel_values_2"], "index"[, "labels"]}.

    A transform returning a pair (e.g. `TwoViewTransform`) fills both pixel keys. Unreadable images raise a
    `BadImageError` naming the path, or (on_bad_image="skip") yield None, which the collate functions drop.

    With a `seed`, the random augmentations of item i in epoch e are drawn from a generator seeded by
    (seed, e, i) instead of torch's global RNG: the views no longer depend on worker count, prefetching or
    where a resumed run restarts, so an interrupted run resumes to exactly the same result. Call `set_epoch`
    (accelerate's prepared loaders do) to get new views each epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[PIL.Image.Image], Any],
        *,
        on_bad_image: BadImagePolicy = "raise",
        seed: int | None = None,
    ) -> None:
        _check_policy(on_bad_image)
        _require_columns(dataset, ["image"], "Load it with load_image_dataset, which names the image column.")
        self.label_column = next((c for c in ("label", "labels") if c in dataset.column_names), None)
        columns = ["image"] + [c for c in ("index", self.label_column) if c and c in dataset.column_names]
        self.dataset = dataset.select_columns(columns).cast_column("image", Image(decode=False))
        self.transform, self.on_bad_image = transform, on_bad_image
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _apply_transform(self, image: PIL.Image.Image, position: int) -> Any:
        if self.seed is None:
            return self.transform(image)
        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            return self.transform(image)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict[str, Any] | None:
        row = self.dataset[position]
        try:
            image = decode_image(row["image"], _where(row["image"], position))
        except BadImageError as exc:
            if self.on_bad_image == "raise":
                raise
            logger.warning("Skipping: %s", exc)
            return None
        pixels = self._apply_transform(image, position)
        item = {"index": row.get("index", position)}
        if isinstance(pixels, tuple):
            item["pixel_values"], item["pixel_values_2"] = pixels
        else:
            item["pixel_values"] = pixels
        if self.label_column:
            item["labels"] = row[self.label_column]
        return item


def _readable(items: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    kept = [item for item in items if item is not None]
    if not kept:
        raise BadImageError(
            f"All {len(items)} images of a batch were unreadable, so the batch is empty. Remove or replace "
            "the unreadable files (the warnings name them); check a dataset with `check_images` first."
        )
    return kept


def collate_train(items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Two-view batch {"pixel_values": (B, 3, H, W), "pixel_values_2": (B, 3, H, W)}; skipped rows dropped."""
    items = _readable(items)
    return {key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "pixel_values_2")}


def collate_eval(items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Evaluation batch: pixel_values (B, 3, H, W), index (B,) int64 and, when labelled, labels as int64:
    (B,) class ids or (B, C) multi-hot."""
    items = _readable(items)
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),  # (B, 3, H, W)
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),  # (B,)
    }
    if "labels" in items[0]:  # (B,) class ids or (B, C) multi-hot
        batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.int64)
    return batch


def make_train_dataloader(
    dataset: Dataset,
    transform: Callable[[PIL.Image.Image], Any],
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    on_bad_image: BadImagePolicy = "raise",
) -> DataLoader:
    """Shuffled two-view loader; the order comes from a generator seeded with `seed` (also seeding workers).

    A single-view `transform` is wrapped in `TwoViewTransform`. The augmentations of each item are seeded by
    (seed, epoch, item) (see `ImageDataset`), so they are reproducible whatever the number of workers.
    """
    views = transform if isinstance(transform, TwoViewTransform) else TwoViewTransform(transform)
    return DataLoader(
        ImageDataset(dataset, views, on_bad_image=on_bad_image, seed=seed),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_train,
    )


def make_eval_dataloader(
    dataset: Dataset,
    transform: Callable[[PIL.Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    on_bad_image: BadImagePolicy = "raise",
) -> DataLoader:
    """Loader in dataset order yielding {"pixel_values", "index"[, "labels"]} batches (see `collate_eval`)."""
    return DataLoader(
        ImageDataset(dataset, transform, on_bad_image=on_bad_image),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
    )


__all__ = [
    "ImageDataset",
    "collate_eval",
    "collate_train",
    "make_eval_dataloader",
    "make_train_dataloader",
]
