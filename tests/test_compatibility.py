"""Model folders saved by earlier releases keep loading, with the package and through `trust_remote_code`.

`tests/fixtures/model_saved_by_0.1.0/` was written by `MeCoQModel.save_pretrained` of mecoq-hf 0.1.0 (the flat
layout before `models/mecoq/`): a tiny random model (timm's `test_efficientnet` at 32 px, M = 2, K = 16) with
its remote-code files (only their comments were edited since, to cite `docs/method.md` instead of a document
outside the repository). `model_saved_by_0.1.0_outputs.safetensors` holds what that release computed for a
fixed input: embeddings (2, 16) and codes (2, 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel

from mecoq_hf import MeCoQModel

FIXTURES = Path(__file__).parent / "fixtures"
OLD_MODEL = FIXTURES / "model_saved_by_0.1.0"
OLD_OUTPUTS = FIXTURES / "model_saved_by_0.1.0_outputs.safetensors"


def fixed_input() -> torch.Tensor:
    return torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)


def test_model_saved_by_0_1_0_loads_with_the_package():
    expected = load_file(OLD_OUTPUTS)
    for model in (MeCoQModel.from_pretrained(OLD_MODEL), AutoModel.from_pretrained(OLD_MODEL)):
        assert isinstance(model, MeCoQModel)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.embed(fixed_input()), expected["embeddings"], rtol=0, atol=1e-6)
            assert torch.equal(model.encode(fixed_input()).long(), expected["codes"])


def test_model_saved_by_0_1_0_loads_through_remote_code_without_the_package(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(OLD_MODEL, folder)
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class BlockMecoq(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "mecoq_hf":
                    raise ImportError("mecoq_hf is hidden in this process")
        sys.meta_path.insert(0, BlockMecoq())
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        expected = load_file({str(OLD_OUTPUTS)!r})
        images = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(model.embed(images), expected["embeddings"], rtol=0, atol=1e-6)
            assert torch.equal(model.encode(images).long(), expected["codes"])
        print("OLD-REMOTE-CODE-OK", type(model).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OLD-REMOTE-CODE-OK transformers_modules." in result.stdout
