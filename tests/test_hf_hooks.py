"""The Hugging Face hooks of the README: transformers' image-feature-extraction pipeline on a saved model
folder (trust_remote_code, offline), and `datasets`' faiss search over an exported `CodeIndex`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.sources import DataSource
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.models.mecoq.quantization import decode_codes
from mecoq_hf.retrieval.index import CodeIndex
from mecoq_hf.retrieval.scoring import inner_product_queries


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=32,
                         num_codebooks=2, codebook_size=256)  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    MeCoQModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images():
    return DataSource("fashion-mnist", "test", 300).load()


PIPELINE_SCRIPT = """
import importlib.abc, sys
class BlockMecoq(importlib.abc.MetaPathFinder):  # the folder's own code must serve, not the package
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mecoq_hf":
            raise ImportError("mecoq_hf is hidden in this process")
sys.meta_path.insert(0, BlockMecoq())
import torch
from PIL import Image
from transformers import pipeline
folder, pictures, output = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
images = [Image.open(path) for path in pictures]
pooled = extractor(images, pool=True, return_tensors=True)  # failed before: no `pooler_output`
unpooled = extractor(images, return_tensors=True)
as_lists = extractor(images[0], pool=True)
torch.save({"pooled": torch.cat(pooled), "unpooled": torch.cat(unpooled), "lists": torch.tensor(as_lists),
            "module": type(extractor.model).__module__}, output)
"""


def test_image_feature_extraction_pipeline_returns_the_embeddings_pooled_or_not(
    saved_model, images, tmp_path
):
    pictures = []
    for row in range(4):
        pictures.append(tmp_path / f"image_{row}.png")
        images[row]["image"].save(pictures[-1])  # PNG: lossless
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    command = [
        sys.executable,
        "-c",
        PIPELINE_SCRIPT,
        str(saved_model),
        *map(str, pictures),
        str(tmp_path / "out.pt"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert outputs["module"].startswith("transformers_modules")
    model = MeCoQModel.from_pretrained(saved_model).eval()
    transform = build_eval_transform(model.backbone.data_config)
    with torch.no_grad():
        expected = model.embed(torch.stack([transform(images[row]["image"]) for row in range(4)]))  # (4, 32)
    torch.testing.assert_close(outputs["pooled"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["unpooled"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["lists"], expected[:1], atol=1e-5, rtol=1e-5)


def test_datasets_faiss_index_from_an_exported_code_index(saved_model, images, tmp_path):
    import faiss

    model = MeCoQModel.from_pretrained(saved_model).eval()
    transform = build_eval_transform(model.backbone.data_config)
    with torch.no_grad():
        pixels = torch.stack([transform(image) for image in images["image"]])
        codes, queries = model.encode(pixels), model.embed(pixels[:10])
    index = CodeIndex.from_model(model)
    index.add(codes)
    expected = index.search(queries, k=10, backend="faiss")
    # A dataset with the decoded codes as vectors: `add_faiss_index(custom_index=...)` re-encodes them, and
    # a decoded sub-vector is a unit codeword, so faiss gives back exactly the same codes.
    vectors = decode_codes(codes, index.codewords).numpy()
    dataset = images.add_column("vector", list(vectors))
    empty = CodeIndex(index.codewords, settings=index.settings).to_faiss()
    dataset.add_faiss_index("vector", custom_index=empty)
    np.testing.assert_array_equal(faiss.vector_to_array(empty.codes).reshape(-1, 2), codes.numpy())
    lookup = inner_product_queries(queries, index.num_codebooks, index.settings).numpy()
    scores, rows = dataset.search_batch("vector", lookup, k=10)
    # datasets searches faiss directly, so ties come in faiss' own order: the same as our exported
    # IndexPQ's, and the same scores as our index (which orders ties by position).
    _, raw_rows = index.to_faiss().search(lookup, 10)
    np.testing.assert_array_equal(np.asarray(rows), raw_rows)
    np.testing.assert_allclose(np.asarray(scores), expected.scores.numpy(), atol=1e-5)
    # The exported index written to a file loads with `load_faiss_index`, codes verbatim, no re-encoding.
    faiss.write_index(index.to_faiss(), str(tmp_path / "codes.faiss"))
    reloaded = images.select_columns(["index", "label"])
    reloaded.load_faiss_index("codes", tmp_path / "codes.faiss")
    found = reloaded.get_nearest_examples("codes", lookup[0], k=10)
    assert found.examples["index"] == raw_rows[0].tolist()
    np.testing.assert_allclose(found.scores, expected.scores[0].numpy(), atol=1e-5)


def test_the_readme_hooks_example_runs(saved_model, images, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    pytest.importorskip("lance")
    from mecoq_hf.hub import load_model
    from mecoq_hf.retrieval.image_index import ImageIndex
    from mecoq_hf.retrieval.lance_export import export_lance

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "pipeline(" in b)
    monkeypatch.chdir(tmp_path)
    source = DataSource("fashion-mnist", "test", 300)
    built = ImageIndex.build(load_model(saved_model), source.load(), model_source=saved_model,
                             data=source.to_dict(), show_progress_bar=False)  # fmt: skip
    built.save("fmnist.safetensors")
    export_lance("fmnist.safetensors", "fmnist.lance")
    namespace: dict = {}
    exec(block.replace("runs/fashion-mnist-demo", str(saved_model)), namespace)
    model = MeCoQModel.from_pretrained(saved_model).eval()
    transform = build_eval_transform(model.backbone.data_config)
    with torch.no_grad():
        expected = built.index.search(model.embed(transform(images[0]["image"])[None]), k=10)
    np.testing.assert_allclose(namespace["scores"], expected.scores[0].numpy(), atol=1e-5)
    above = expected.scores[0] > expected.scores[0][-1] + 1e-5  # faiss orders tied items its own way
    found = torch.tensor(namespace["hits"]["index"])
    assert set(found[above].tolist()) == set(expected.ids[0][above].tolist())
    lance_scores = 1 - np.asarray(namespace["table"]["_distance"].to_pylist())
    np.testing.assert_allclose(np.sort(lance_scores)[::-1], expected.scores[0].numpy(), atol=1e-4)
