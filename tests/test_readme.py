"""The README's Python examples run as written (on a tiny saved model instead of the demo's run folder)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from mecoq_hf import MeCoQConfig, MeCoQModel

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_use_a_trained_model_example_runs(tmp_path):
    warnings.simplefilter("ignore")
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32,
                         embedding_dim=16, num_codebooks=2, codebook_size=256)  # fmt: skip
    MeCoQModel(config).save_pretrained(tmp_path / "model")
    block = next(b for b in python_blocks() if "model.encode(" in b)
    namespace: dict = {}
    exec(block.replace("runs/fashion-mnist-demo", str(tmp_path / "model")), namespace)
    assert namespace["codes"].shape == (3, 2) and namespace["codes"].dtype == torch.uint8
    assert namespace["vectors"].shape == (3, 16) and namespace["queries"].shape == (3, 16)
    assert namespace["ids"].shape == (3, 2) and namespace["scores"].shape == (3, 2)
    # Hard codes maximise each sub-space's cosine, so every image's own code scores best (ties aside).
    queries, vectors = namespace["queries"], namespace["vectors"]
    own = (torch.nn.functional.normalize(queries.view(3, 2, 8), dim=-1).view(3, 16) * vectors).sum(dim=1)
    assert torch.allclose(namespace["scores"][:, 0], own, atol=1e-5)
