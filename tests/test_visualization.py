"""Tests of visualization.py: the PNG files exist, decode, and have the expected layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from file_modes import UMASKS, modes_not_following, process_umask
from PIL import Image

from mecoq_hf.visualization import plot_pr_curve, save_retrieval_grid


def test_plot_pr_curve_writes_a_png(tmp_path):
    recall = torch.linspace(0, 1, 50)
    curves = {"16 bits": (1 - 0.5 * recall, recall), "32 bits": (np.ones(50) * 0.8, recall.numpy())}
    path = plot_pr_curve(curves, tmp_path / "figures" / "pr.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200
    assert [p.name for p in path.parent.iterdir()] == ["pr.png"]
    with pytest.raises(ValueError, match="differ"):
        plot_pr_curve({"bad": (np.ones(3), np.ones(4))}, tmp_path / "bad.png")


def test_save_retrieval_grid_is_one_row_of_panels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 32, 32, generator=generator)  # normalised pixel values are rescaled for display
    results = [torch.rand(1, 28, 28, generator=generator) for _ in range(5)]
    path = save_retrieval_grid(
        query,
        results,
        torch.linspace(0.9, 0.5, 5),
        torch.tensor([1, 1, 2, 1, 3]),
        tmp_path / "grid.png",
        query_label=torch.tensor(1),
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 3 * image.height  # six panels side by side
    with pytest.raises(ValueError, match="one score"):
        save_retrieval_grid(query, results, [0.5], None, tmp_path / "bad.png")


@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_pngs_follow_the_umask(tmp_path, umask):
    recall = torch.linspace(0, 1, 20)
    images = [torch.rand(1, 28, 28) for _ in range(3)]
    with process_umask(umask):
        curve = plot_pr_curve({"32 bits": (1 - 0.5 * recall, recall)}, tmp_path / "figures" / "pr_curve.png")
        grid = save_retrieval_grid(images[0], images[1:], [0.9, 0.8], None, tmp_path / "search.png")
    assert curve.is_file() and grid.is_file()
    assert modes_not_following(umask, tmp_path) == {}
