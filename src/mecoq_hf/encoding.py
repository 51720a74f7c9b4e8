"""Run a MeCoQ model over a dataloader: hard codes for a database, embeddings for queries.

Batched, eval mode, no gradients, a tqdm progress bar, and optionally split over Accelerate processes (each
process encodes its shard; the results are gathered back into dataset order). The model is duck-typed: any
object with `.encode(pixel_values) -> (B, M)` and `.embed(pixel_values) -> (B, d)` works. `encode_images`
does the same for a normal-form image dataset (`data.py`) with the model's evaluation transform, and
`save_encoded` writes the result as one safetensors file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import save_file

from .file_io import write_atomic
from .progress import phase

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset

ENCODED_FORMAT = "mecoq-hf/encoded"


class EncodedDataset(NamedTuple):
    """What `encode_dataset` returns, in dataset order.

    outputs: (N, M) codes (method "encode") or (N, d) embeddings (method "embed").
    labels:  (N,) or (N, C) labels when the batches carry "labels"/"label", else None.
    ids:     (N,) ids when the batches carry "ids"/"id"/"index"/"idx", else None.
    """

    outputs: torch.Tensor
    labels: torch.Tensor | None
    ids: torch.Tensor | None


def _split_batch(batch: Any) -> dict[str, torch.Tensor]:
    """A batch (tensor, (pixel_values, labels) pair, or dict with "pixel_values") -> named tensors."""
    if isinstance(batch, torch.Tensor):
        return {"pixel_values": batch}
    if isinstance(batch, (list, tuple)) and batch:
        parts = {"pixel_values": batch[0]}
        if len(batch) > 1:
            parts["labels"] = torch.as_tensor(batch[1])
        return parts
    if isinstance(batch, Mapping) and "pixel_values" in batch:
        parts = {"pixel_values": batch["pixel_values"]}
        for field, keys in (("labels", ("labels", "label")), ("ids", ("ids", "id", "index", "idx"))):
            key = next((key for key in keys if key in batch), None)
            if key is not None:
                parts[field] = torch.as_tensor(batch[key])
        return parts
    raise ValueError(
        f"Cannot read images from a batch of type {type(batch).__name__}: expected a tensor, a "
        "(pixel_values, labels) pair or a dict with a 'pixel_values' key (see `data.py` collate functions)."
    )


def _model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def module_mode(module: torch.nn.Module, training: bool | None = None) -> Iterator[None]:
    """Run the block with `module` in training (True) or eval (False) mode, or as it is (None), and put it
    back in the mode it had afterwards, also when the block raises."""
    was_training = module.training
    if training is not None:
        module.train(training)
    try:
        yield
    finally:
        module.train(was_training)


def non_finite_parameter(model: Any) -> str | None:
    """The name of the first parameter of `model` holding NaN or infinity, or None when all are finite."""
    named = model.named_parameters() if hasattr(model, "named_parameters") else ()
    return next((name for name, value in named if not torch.isfinite(value).all()), None)


def _refuse_non_finite(model: Any, embeddings: torch.Tensor | None = None) -> None:
    """Raise `FloatingPointError` for NaN or infinite `embeddings` (when given, else weights of `model`):
    the codes of such a model are meaningless (the argmax of NaN scores is codeword 0)."""
    if embeddings is None:
        broken = non_finite_parameter(model)
        where = None if broken is None else f"weight {broken}"
    else:
        where = None if torch.isfinite(embeddings).all() else "embeddings"
    if where is not None:
        raise FloatingPointError(
            f"The model's {where} hold NaN or infinite values, so its codes would be meaningless (all "
            "zeros); nothing was written. The training that made it diverged: train again with a lower "
            "learning rate (mecoq train --learning-rate)."
        )


def _prepared(dataloader: Iterable, accelerator: Accelerator) -> Iterable:
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    if isinstance(dataloader, (DataLoaderShard, DataLoaderDispatcher)):
        return dataloader
    return accelerator.prepare_data_loader(dataloader)


def encode_dataset(
    model: Any,
    dataloader: Iterable,
    accelerator: Accelerator | None = None,
    *,
    method: str = "encode",
    show_progress_bar: bool = True,
) -> EncodedDataset:
    """Run `model.encode` (hard codes) or `model.embed` over a dataloader in eval mode, without gradients.

    Args:
        model: any object with `.encode(pixel_values) -> (B, M)` and `.embed(pixel_values) -> (B, d)`.
        dataloader: yields tensors, (pixel_values, labels) pairs or dicts with "pixel_values" (and optionally
            "labels" and "ids"/"index"). Must not shuffle if the order matters.
        accelerator: when given, each process encodes its shard of the (unprepared or prepared) dataloader and
            the results are gathered batch by batch with `gather_for_metrics`, which restores the dataset
            order and drops the padding samples; every process returns the full result.
        method: "encode" or "embed".
        show_progress_bar: a progress bar of the images (main process only; `progress.phase`).

    Returns:
        `EncodedDataset(outputs, labels, ids)` on CPU, in dataset order.
    """
    if method not in ("encode", "embed"):
        raise ValueError(f"method must be 'encode' (hard codes) or 'embed' (embeddings), got {method!r}.")
    network = accelerator.unwrap_model(model) if accelerator is not None else model
    if not callable(getattr(network, method, None)):
        raise TypeError(
            f"The model must have a `.{method}(pixel_values)` method; got {type(network).__name__}."
        )
    if accelerator is not None:
        dataloader = _prepared(dataloader, accelerator)
    device = accelerator.device if accelerator is not None else _model_device(network)
    is_main = accelerator is None or accelerator.is_main_process
    was_training = bool(getattr(network, "training", False))
    _refuse_non_finite(network)
    if hasattr(network, "eval"):
        network.eval()
    collected: dict[str, list[torch.Tensor]] = {"outputs": [], "labels": [], "ids": []}
    show = "bar" if show_progress_bar and is_main else "off"
    try:
        with torch.no_grad(), phase(f"{method} dataset", _num_images(dataloader), show=show) as progress:
            for batch in dataloader:
                parts = _split_batch(batch)
                parts["outputs"] = getattr(network, method)(parts.pop("pixel_values").to(device))
                if method == "embed":
                    _refuse_non_finite(network, parts["outputs"])
                if accelerator is not None:
                    parts = accelerator.gather_for_metrics({k: v.to(device) for k, v in parts.items()})
                for name, value in parts.items():
                    collected[name].append(value.cpu())
                progress.update(len(parts["outputs"]))  # images of every process
    finally:
        if was_training and hasattr(network, "train"):
            network.train()
    return _assemble(collected)


def _num_images(dataloader: Iterable) -> int | None:
    """The number of images a dataloader yields (its dataset's length), or None when it has none."""
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return None


def _assemble(collected: dict[str, list[torch.Tensor]]) -> EncodedDataset:
    batches = len(collected["outputs"])
    for name in ("labels", "ids"):
        if collected[name] and len(collected[name]) != batches:
            raise ValueError(
                f"Some batches carry '{name}' and others do not; make the collate function consistent."
            )
    columns = {name: torch.cat(parts) if parts else None for name, parts in collected.items()}
    if columns["outputs"] is None:
        raise ValueError("The dataloader yielded no batches; nothing to encode.")
    return EncodedDataset(columns["outputs"], columns["labels"], columns["ids"])


# datasets in the normal form of `data.py`, and encoded files


def encode_images(
    model: Any,
    images: Dataset,
    accelerator: Accelerator | None = None,
    *,
    method: str = "encode",
    batch_size: int = 128,
    num_workers: int = 0,
    show_progress_bar: bool = True,
) -> EncodedDataset:
    """`encode_dataset` over a normal-form image dataset, through the model's own evaluation transform.

    The transform is built from `model.backbone.data_config` and the loader keeps dataset order
    (`data.make_eval_dataloader`), so `ids` is the dataset's `index` column and `labels` its labels.

    Args:
        model: a `MeCoQModel` (anything with `backbone.data_config`, `encode` and `embed`).
        images: a dataset with an `image` column (see `data.load_image_dataset`).
        accelerator: move the model to its device and split the work over its processes (every process
            gets the full result).
        method, show_progress_bar: as in `encode_dataset`.
        batch_size, num_workers: of the DataLoader.
    """
    from .data.loaders import make_eval_dataloader
    from .data.transforms import build_eval_transform

    transform = build_eval_transform(model.backbone.data_config)
    loader = make_eval_dataloader(images, transform, batch_size, num_workers)
    if accelerator is not None:
        model.to(accelerator.device)
    return encode_dataset(model, loader, accelerator, method=method, show_progress_bar=show_progress_bar)


@torch.no_grad()
def embed_images(model: Any, images: Sequence[Any]) -> torch.Tensor:
    """(n, d) query embeddings (`model.embed`) of a few PIL images, through the model's evaluation transform.

    For a handful of query images; `encode_images` runs a whole dataset in batches. The model runs in eval
    mode (its mode is restored afterwards) on its own device; the embeddings come back on the CPU.
    """
    from .data.transforms import build_eval_transform

    transform = build_eval_transform(model.backbone.data_config)
    pixel_values = torch.stack([transform(image) for image in images])  # (n, 3, H, W)
    with module_mode(model, training=False):
        embeddings = model.embed(pixel_values.to(_model_device(model))).cpu()
    _refuse_non_finite(model, embeddings)
    return embeddings


@torch.no_grad()
def embed_features(model: Any, features: torch.Tensor, *, chunk_size: int = 4096) -> torch.Tensor:
    """Embeddings (N, d) of backbone features (N, F) by `model.projection`, `chunk_size` rows at a time.

    `model.embed(images)` is `model.projection(model.backbone(images))`, so features computed once (for
    example by `feature_cache.compute_features`) give the same embeddings without another backbone pass.
    """
    device = _model_device(model)
    embeddings = torch.cat([model.projection(chunk.to(device)).cpu() for chunk in features.split(chunk_size)])
    _refuse_non_finite(model, embeddings)
    return embeddings


def quantize_embeddings(model: Any, embeddings: torch.Tensor, *, chunk_size: int = 4096) -> torch.Tensor:
    """Hard codes (N, M) of embeddings (N, d) by `model.quantizer.encode`, `chunk_size` rows at a time.

    These are the codes `model.encode` gives for the same images, so one backbone pass (`method="embed"`)
    yields both embeddings and codes. The work runs on the model's device; the codes come back on the CPU.
    """
    device = _model_device(model)
    return torch.cat(
        [model.quantizer.encode(chunk.to(device)).cpu() for chunk in embeddings.split(chunk_size)]
    )


def save_encoded(
    path: str | os.PathLike,
    codes: torch.Tensor,
    ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    embeddings: torch.Tensor | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write encoded images as one safetensors file, atomically (format "mecoq-hf/encoded").

    Args:
        path: the file to write (parent folders are created).
        codes: (N, M) hard codes; ids: (N,) the items' ids (e.g. the dataset's `index` column).
        labels: (N,) class ids or (N, C) multi-hot labels, if any.
        embeddings: (N, d) embeddings, stored as float32, if wanted.
        metadata: string values for the file header, e.g. the model and the data source.
    """
    tensors = {"codes": codes, "embeddings": embeddings, "ids": ids, "labels": labels}
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items() if tensor is not None}
    if embeddings is not None:
        tensors["embeddings"] = tensors["embeddings"].float()
    header = {"format": ENCODED_FORMAT, **(metadata or {})}
    return write_atomic(path, lambda name: save_file(tensors, name, metadata=header))


__all__ = [
    "ENCODED_FORMAT",
    "EncodedDataset",
    "embed_features",
    "embed_images",
    "encode_dataset",
    "encode_images",
    "module_mode",
    "non_finite_parameter",
    "quantize_embeddings",
    "save_encoded",
]
