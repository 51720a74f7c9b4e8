"""PNG figures for retrieval results: precision-recall curves and a query-plus-results image grid.

matplotlib is imported inside the functions and used through its object-oriented API with the Agg canvas, so
importing this module is free and the caller's pyplot backend (e.g. in a notebook) is left untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .file_io import write_atomic


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Any, path: str | os.PathLike) -> Path:
    """Write the figure as a PNG with `write_atomic` (complete or absent, mode from the umask)."""
    return write_atomic(path, lambda name: figure.savefig(name, format="png", bbox_inches="tight"))


def _as_array(values: Any) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def plot_pr_curve(
    curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str = "Precision-recall"
) -> Path:
    """Plot one precision-recall curve per label, e.g. `{"32 bits": (precision, recall)}`, to a PNG at `path`.

    The curves are what `evaluation.precision_recall_curve` returns (precision first).
    """
    if not curves:
        raise ValueError("plot_pr_curve needs at least one curve, got an empty mapping.")
    figure = _new_figure(5, 4)
    axes = figure.add_subplot()
    for label, (precision, recall) in curves.items():
        precision, recall = _as_array(precision), _as_array(recall)
        if precision.shape != recall.shape:
            raise ValueError(
                f"Curve {label!r}: precision {precision.shape} and recall {recall.shape} differ."
            )
        axes.plot(recall, precision, label=str(label))
    axes.set(xlabel="Recall", ylabel="Precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend()
    return _save_png(figure, path)


def _plain(value: Any) -> Any:
    """Tensor or NumPy scalars -> Python values, for titles and comparisons."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.item() if np.size(value) == 1 else np.asarray(value).tolist()
    return value


def _display_image(image: Any) -> np.ndarray:
    """A PIL image, (C, H, W) / (H, W) tensor or (H, W, C) array -> (H, W[, 3]) floats in [0, 1] for imshow.

    Normalised pixel values (e.g. ImageNet mean/std) are min-max rescaled per image for display.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float()
        image = image.permute(1, 2, 0) if image.ndim == 3 else image
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(
            f"Cannot display an image of shape {array.shape}; expected (C, H, W), (H, W, C) or (H, W)."
        )
    low, high = array.min(), array.max()
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def save_retrieval_grid(
    query_image: Any,
    result_images: Sequence[Any],
    scores: Sequence[float] | torch.Tensor,
    labels: Sequence[Any] | None,
    path: str | os.PathLike,
    query_label: Any = None,
) -> Path:
    """One row: the query, then its ranked results titled with score (and label) to a PNG at `path`.

    When `query_label` is given, results whose label equals it are framed green and the others red.
    """
    scores = _as_array(scores).reshape(-1)
    query_label = _plain(query_label)
    if len(result_images) != len(scores) or (labels is not None and len(labels) != len(scores)):
        raise ValueError(
            f"Got {len(result_images)} result images, {len(scores)} scores and "
            f"{'no' if labels is None else len(labels)} labels; pass one score (and label) per result."
        )
    figure = _new_figure(1.6 * (len(result_images) + 1), 2.0)
    panels = figure.subplots(1, len(result_images) + 1, squeeze=False)[0]
    panels[0].imshow(_display_image(query_image), cmap="gray")
    panels[0].set_title("query" if query_label is None else f"query\n{query_label}", fontsize=8)
    for rank, (axes, image, score) in enumerate(zip(panels[1:], result_images, scores), start=1):
        axes.imshow(_display_image(image), cmap="gray")
        label = None if labels is None else _plain(labels[rank - 1])
        axes.set_title(f"#{rank} {score:.3f}" + ("" if label is None else f"\n{label}"), fontsize=8)
        if query_label is not None and label is not None:
            for spine in axes.spines.values():
                spine.set(edgecolor="green" if label == query_label else "red", linewidth=3)
    for axes in panels:
        axes.set_xticks([])
        axes.set_yticks([])
    return _save_png(figure, path)


__all__ = ["plot_pr_curve", "save_retrieval_grid"]
