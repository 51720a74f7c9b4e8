"""Tests of encoding.py: encoding a dataloader or an image dataset, query images, and encoded files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.encoding import embed_images, encode_dataset, encode_images, quantize_embeddings, save_encoded
from mecoq_hf.models.mecoq.quantization import ProductQuantizer

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# a duck-typed model on raw Fashion-MNIST tensors (encode_dataset)


def read_idx(name: str, count: int) -> np.ndarray:
    with gzip.open(FASHION_MNIST / name) as file:
        data = np.frombuffer(file.read(), dtype=np.uint8)
    if "images" in name:
        return data[16:].reshape(-1, 28, 28)[:count]
    return data[8:][:count]


class TinyRetrievalModel(nn.Module):
    """Pooled pixels -> linear projection -> product quantizer; exposes embed / encode / codebooks."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Linear(49, 32)
        self.quantizer = ProductQuantizer(dim=32, num_codebooks=4, codebook_size=16)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(F.avg_pool2d(pixel_values, 4).flatten(1))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.embed(pixel_values))

    def codebooks(self) -> torch.Tensor:
        return self.quantizer.normalized_codebooks()


@pytest.fixture(scope="module")
def fashion_mnist():
    images = torch.from_numpy(read_idx("t10k-images-idx3-ubyte.gz", 260).copy()).float().div(255)[:, None]
    labels = torch.from_numpy(read_idx("t10k-labels-idx1-ubyte.gz", 260).astype(np.int64))
    torch.manual_seed(0)
    return images, labels, TinyRetrievalModel()


def test_encode_dataset_keeps_order_labels_and_ids(fashion_mnist):
    images, labels, model = fashion_mnist
    batches = [
        {
            "pixel_values": images[i : i + 64],
            "label": labels[i : i + 64],
            "idx": torch.arange(260)[i : i + 64],
        }
        for i in range(0, 260, 64)
    ]
    encoded = encode_dataset(model, batches, show_progress_bar=False)
    assert torch.equal(encoded.outputs, model.encode(images))
    assert torch.equal(encoded.labels, labels) and torch.equal(encoded.ids, torch.arange(260))
    embedded = encode_dataset(
        model, [(images[:100], labels[:100]), (images[100:], labels[100:])], method="embed"
    )
    with torch.no_grad():
        torch.testing.assert_close(embedded.outputs, model.embed(images))
    assert encoded.outputs.dtype == torch.uint8 and embedded.ids is None


def test_encode_dataset_with_a_single_process_accelerator(fashion_mnist):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    images, labels, model = fashion_mnist
    loader = DataLoader(list(zip(images, labels)), batch_size=50)  # 260 = 5 full batches + 10
    try:
        encoded = encode_dataset(model, loader, Accelerator(cpu=True), show_progress_bar=False)
    finally:  # leave no process-wide accelerate state behind for other tests
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert torch.equal(encoded.outputs, model.encode(images)) and torch.equal(encoded.labels, labels)


# a real MeCoQModel on normal-form image datasets (encode_images, embed_images, save_encoded)


@pytest.fixture(scope="module")
def tiny_mecoq() -> MeCoQModel:
    """A real MeCoQModel with timm's tiny test_efficientnet backbone (random weights), 32 px, in eval mode."""
    torch.manual_seed(0)
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=16)  # fmt: skip
    return MeCoQModel(config).eval()


def eval_pixels(model: MeCoQModel, images) -> torch.Tensor:
    transform = build_eval_transform(model.backbone.data_config)
    return torch.stack([transform(image) for image in images["image"]])  # (N, 3, 32, 32)


def test_embed_images_equals_model_embed_in_eval_mode(tiny_mecoq):
    images = load_fashion_mnist("test", limit=3)
    with torch.no_grad():
        expected = tiny_mecoq.embed(eval_pixels(tiny_mecoq, images))
    tiny_mecoq.train()
    try:
        embedded = embed_images(tiny_mecoq, images["image"])
        assert tiny_mecoq.training  # mode restored
    finally:
        tiny_mecoq.eval()
    assert torch.equal(embedded, expected) and embedded.shape == (3, 16)


def test_encode_images_quantize_embeddings_and_save_encoded(tiny_mecoq, tmp_path):
    images = load_fashion_mnist("test", limit=20)
    codes = encode_images(tiny_mecoq, images, method="encode", batch_size=8, show_progress_bar=False)
    embedded = encode_images(tiny_mecoq, images, method="embed", batch_size=8, show_progress_bar=False)
    with torch.no_grad():
        assert torch.equal(codes.outputs, tiny_mecoq.encode(eval_pixels(tiny_mecoq, images)))
    assert torch.equal(codes.ids, torch.arange(20)) and codes.labels.tolist() == images["label"][:]
    assert torch.equal(quantize_embeddings(tiny_mecoq, embedded.outputs, chunk_size=7), codes.outputs)
    path = save_encoded(tmp_path / "new" / "codes.safetensors", codes.outputs, codes.ids, labels=codes.labels,
                        embeddings=embedded.outputs.double(), metadata={"model": "tiny"})  # fmt: skip
    with safe_open(path, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        assert file.metadata() == {"format": "mecoq-hf/encoded", "model": "tiny"}
    assert sorted(tensors) == ["codes", "embeddings", "ids", "labels"]
    assert [p.name for p in path.parent.iterdir()] == ["codes.safetensors"]  # no temp file left behind
    assert torch.equal(tensors["codes"], codes.outputs) and torch.equal(tensors["labels"], codes.labels)
    assert tensors["embeddings"].dtype == torch.float32 and torch.equal(
        tensors["embeddings"], embedded.outputs
    )
    unlabelled = save_encoded(tmp_path / "bare.safetensors", codes.outputs, codes.ids)
    with safe_open(unlabelled, framework="pt") as file:
        assert sorted(file.keys()) == ["codes", "ids"] and file.metadata() == {"format": "mecoq-hf/encoded"}
