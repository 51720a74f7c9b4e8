"""Tests of evaluation.py (metrics, code scoring, evaluator, `evaluate_model`) and encoding.py (dataset encoding,
encoded files)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sklearn.metrics import average_precision_score
from torch import nn
from torch.utils.data import DataLoader

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.encoding import encode_dataset, encode_images, quantize_embeddings, save_encoded
from mecoq_hf.models.mecoq.quantization import ProductQuantizer, decode_codes, symmetric_scores
from mecoq_hf.retrieval.evaluation import (
    RetrievalEvaluator,
    average_precision,
    evaluate_codes,
    evaluate_model,
    mean_average_precision,
    precision_at_n_curve,
    precision_recall_curve,
    score_codes,
)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# brute-force references: one query at a time, NumPy only


def reference_ranking(row: np.ndarray) -> np.ndarray:
    """Database positions by descending score, ties by ascending position."""
    return np.lexsort((np.arange(row.size), -row))


def reference_relevance(query_label: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    if db_labels.ndim == 1:
        return db_labels == query_label
    return (db_labels.astype(bool) & query_label.astype(bool)).any(axis=1)


def reference_map(scores, query_labels, db_labels, top_k) -> float:
    scores, query_labels, db_labels = (np.asarray(x) for x in (scores, query_labels, db_labels))
    aps = []
    for q in range(scores.shape[0]):
        ranked = reference_ranking(scores[q])[: top_k or scores.shape[1]]
        relevant = reference_relevance(query_labels[q], db_labels)[ranked]
        total, precision_sum, hits = 0, 0.0, 0
        for rank, is_relevant in enumerate(relevant, start=1):
            if is_relevant:
                hits += 1
                precision_sum += hits / rank
                total += 1
        aps.append(precision_sum / total if total else 0.0)
    return float(np.mean(aps))


def reference_curves(scores, query_labels, db_labels):
    scores, query_labels, db_labels = (np.asarray(x) for x in (scores, query_labels, db_labels))
    precisions, recalls = [], []
    for q in range(scores.shape[0]):
        relevant_all = reference_relevance(query_labels[q], db_labels)
        hits = np.cumsum(relevant_all[reference_ranking(scores[q])])
        precisions.append(hits / np.arange(1, hits.size + 1))
        recalls.append(hits / relevant_all.sum() if relevant_all.sum() else np.zeros(hits.size))
    return np.mean(precisions, axis=0), np.mean(recalls, axis=0)


def random_case(seed: int, num_queries=23, num_db=157, tie_levels: int | None = None, num_labels=None):
    generator = torch.Generator().manual_seed(seed)
    if tie_levels is None:
        scores = torch.randn(num_queries, num_db, generator=generator)
    else:
        scores = torch.randint(0, tie_levels, (num_queries, num_db), generator=generator).float()
    if num_labels is None:
        query_labels = torch.randint(0, 5, (num_queries,), generator=generator)
        db_labels = torch.randint(0, 5, (num_db,), generator=generator)
    else:
        query_labels = torch.rand(num_queries, num_labels, generator=generator) < 3 / num_labels
        db_labels = torch.rand(num_db, num_labels, generator=generator) < 3 / num_labels
    return scores, query_labels, db_labels


# mAP


@pytest.mark.parametrize("top_k", [None, 1, 10, 39, 156, 500])
@pytest.mark.parametrize("tie_levels", [None, 4, 2])  # 2 levels: symmetric-distance style massive ties
@pytest.mark.parametrize("num_labels", [None, 24, 70])  # class ids; multi-hot in one and two 64-bit words
def test_map_matches_brute_force(top_k, tie_levels, num_labels):
    scores, query_labels, db_labels = random_case(7, tie_levels=tie_levels, num_labels=num_labels)
    expected = reference_map(scores, query_labels, db_labels, top_k)
    assert mean_average_precision(scores, query_labels, db_labels, top_k) == pytest.approx(
        expected, abs=1e-12
    )


def test_map_matches_sklearn_without_ties():
    scores, query_labels, db_labels = random_case(3, num_queries=15, num_db=400)
    relevant = (query_labels[:, None] == db_labels[None, :]).numpy()
    assert relevant.any(axis=1).all()
    expected = np.mean([average_precision_score(relevant[q], scores[q].numpy()) for q in range(15)])
    assert mean_average_precision(scores, query_labels, db_labels) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("top_k", [None, 25])
def test_chunking_does_not_change_results(top_k):
    scores, query_labels, db_labels = random_case(11, num_queries=37, tie_levels=3, num_labels=12)
    whole = average_precision(scores, query_labels, db_labels, top_k, chunk_size=37)
    for chunk_size in (1, 5, 36):
        assert torch.equal(
            average_precision(scores, query_labels, db_labels, top_k, chunk_size=chunk_size), whole
        )


def test_map_reference_definition_on_a_hand_example():
    # Ranking: positions 2 (rel), 0 (not), 1 (rel) -> AP@3 = (1/1 + 2/3) / 2; AP@2 = 1 (R counts the top K).
    scores = torch.tensor([[0.5, 0.2, 0.9]])
    query_labels, db_labels = torch.tensor([1]), torch.tensor([0, 1, 1])
    assert mean_average_precision(scores, query_labels, db_labels) == pytest.approx((1 + 2 / 3) / 2)
    assert mean_average_precision(scores, query_labels, db_labels, top_k=2) == pytest.approx(1.0)
    # Ties go to the lower database position: position 0 (not relevant) ranks before position 1.
    tied = torch.tensor([[0.5, 0.5, 0.1]])
    assert mean_average_precision(tied, query_labels, db_labels, top_k=1) == 0.0
    # An unlabeled multi-hot query has no relevant items: AP = 0 (Flickr25K's 419 unlabeled images).
    assert mean_average_precision(scores, torch.zeros(1, 3), torch.eye(3)) == 0.0


def test_metric_inputs_are_validated():
    scores, query_labels, db_labels = random_case(0)
    with pytest.raises(ValueError, match="top_k"):
        mean_average_precision(scores, query_labels, db_labels, top_k=0)
    with pytest.raises(ValueError, match="query labels"):
        mean_average_precision(scores, query_labels[:-1], db_labels)
    with pytest.raises(ValueError, match="multi-hot"):
        mean_average_precision(scores, query_labels, db_labels[:, None].repeat(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(scores.index_fill(1, torch.tensor([3]), float("nan")), query_labels, db_labels)


# curves


@pytest.mark.parametrize("num_labels", [None, 20])
def test_precision_recall_and_precision_at_n_match_brute_force(num_labels):
    scores, query_labels, db_labels = random_case(9, tie_levels=6, num_labels=num_labels)
    db_labels[:3] = 0 if num_labels else db_labels[:3]
    query_labels[0] = 0 if num_labels else 99  # a query with no relevant item: recall 0 throughout
    expected_precision, expected_recall = reference_curves(scores, query_labels, db_labels)
    precision, recall = precision_recall_curve(scores, query_labels, db_labels, chunk_size=4)
    np.testing.assert_allclose(precision.numpy(), expected_precision, atol=1e-12)
    np.testing.assert_allclose(recall.numpy(), expected_recall, atol=1e-12)
    assert recall[-1] == pytest.approx((scores.shape[0] - 1) / scores.shape[0])
    at_n = precision_at_n_curve(scores, query_labels, db_labels, max_n=30)
    np.testing.assert_allclose(at_n.numpy(), expected_precision[:30], atol=1e-12)


# scores from codes


@pytest.fixture(scope="module")
def code_case():
    torch.manual_seed(0)
    quantizer = ProductQuantizer(dim=32, num_codebooks=4, codebook_size=16)
    database = torch.randn(300, 32)
    return (
        quantizer.normalized_codebooks().detach(),
        quantizer.encode(database),
        torch.randn(20, 32),
        quantizer,
    )


def test_asymmetric_scores_equal_decode_and_dot(code_case):
    codebooks, codes, queries, _ = code_case
    decoded = decode_codes(codes, codebooks)  # (N, d)
    scores = score_codes(queries, codes, codebooks).to_tensor()
    torch.testing.assert_close(scores, queries @ decoded.T, atol=1e-5, rtol=1e-5)
    normalized = F.normalize(queries.reshape(20, 4, 8), dim=-1).reshape(20, 32)
    scores = score_codes(queries, codes, codebooks, normalize_query_subvectors=True)[0:20]
    torch.testing.assert_close(scores, normalized @ decoded.T, atol=1e-5, rtol=1e-5)


def test_symmetric_scores_use_hard_coded_queries(code_case):
    codebooks, codes, queries, quantizer = code_case
    expected = symmetric_scores(quantizer.encode(queries), codes, codebooks)
    torch.testing.assert_close(score_codes(queries, codes, codebooks, "symmetric").to_tensor(), expected)


@pytest.mark.parametrize("distance", ["asymmetric", "symmetric"])
def test_evaluate_codes_equals_map_of_full_scores(code_case, distance):
    codebooks, codes, queries, _ = code_case
    query_labels, db_labels = torch.arange(20) % 3, torch.arange(300) % 3
    full = score_codes(queries, codes, codebooks, distance).to_tensor()
    for top_k in (None, 50):
        expected = reference_map(full, query_labels, db_labels, top_k)
        got = evaluate_codes(
            queries, codes, codebooks, query_labels, db_labels, top_k, distance, chunk_size=3
        )
        assert got == pytest.approx(expected, abs=1e-12)


def test_score_codes_rejects_a_wrong_query_width(code_case):
    codebooks, codes, queries, _ = code_case
    with pytest.raises(ValueError, match=r"shape \(Q, 32\)"):
        score_codes(queries[:, :16], codes, codebooks)


# evaluator and dataset encoding on real Fashion-MNIST images


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


def test_retrieval_evaluator_contract(fashion_mnist, tmp_path):
    images, labels, model = fashion_mnist
    evaluator = RetrievalEvaluator(
        images[:40], images[40:], labels[:40], labels[40:], top_k=100, name="fashion-mnist", batch_size=32
    )
    model.train()
    metrics = evaluator(model, output_path=tmp_path, epoch=2, steps=10)
    assert model.training  # mode restored
    assert evaluator.primary_metric == "fashion-mnist_map@100" and evaluator.greater_is_better
    with torch.no_grad():
        expected = reference_map(
            score_codes(model.embed(images[:40]), model.encode(images[40:]), model.codebooks()).to_tensor(),
            labels[:40],
            labels[40:],
            100,
        )
    assert metrics == {"fashion-mnist_map@100": pytest.approx(expected, abs=1e-12)}
    assert expected > 0.3  # well above chance (0.1): pooled pixels carry class information
    evaluator(model, output_path=tmp_path, epoch=3, steps=20)
    records = json.loads((tmp_path / "fashion-mnist_evaluation_results.json").read_text())
    assert [(r["epoch"], r["steps"]) for r in records] == [(2, 10), (3, 20)]

    # The same data as dict batches carrying their labels gives the same score.
    def collate(items):
        return {
            "pixel_values": torch.stack([i for i, _ in items]),
            "labels": torch.tensor([l for _, l in items]),
        }

    pairs = list(zip(images, labels.tolist()))
    loaders = [DataLoader(part, batch_size=16, collate_fn=collate) for part in (pairs[:40], pairs[40:])]
    assert RetrievalEvaluator(*loaders, top_k=100, name="fashion-mnist")(model) == metrics


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


# a real MeCoQModel on normal-form image datasets (evaluate_model, encode_images, save_encoded)


@pytest.fixture(scope="module")
def tiny_mecoq() -> MeCoQModel:
    """A real MeCoQModel with timm's tiny test_efficientnet backbone (random weights) at 32 px, in eval mode."""
    torch.manual_seed(0)
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=16)  # fmt: skip
    return MeCoQModel(config).eval()


def eval_pixels(model: MeCoQModel, images) -> torch.Tensor:
    transform = build_eval_transform(model.backbone.data_config)
    return torch.stack([transform(image) for image in images["image"]])  # (N, 3, 32, 32)


def test_evaluate_model_on_labelled_image_splits(tiny_mecoq):
    images = load_fashion_mnist("test", limit=60)
    queries, database = images.select(range(12)), images.select(range(12, 60))
    result = evaluate_model(tiny_mecoq, queries, database, top_k=20, batch_size=16, pr_curve=True,
                            show_progress_bar=False)  # fmt: skip
    config = tiny_mecoq.config
    with torch.no_grad():
        scores = score_codes(tiny_mecoq.embed(eval_pixels(tiny_mecoq, queries)),
                             tiny_mecoq.encode(eval_pixels(tiny_mecoq, database)), tiny_mecoq.codebooks(),
                             config.distance, config.normalize_query_subvectors).to_tensor()  # fmt: skip
    labels = torch.tensor(queries["label"][:]), torch.tensor(database["label"][:])
    assert result.map_at_k == pytest.approx(reference_map(scores, *labels, 20), abs=1e-9)
    precision, recall = precision_recall_curve(scores, *labels)
    assert torch.equal(result.pr_curve[0], precision) and torch.equal(result.pr_curve[1], recall)
    assert precision.shape == (48,) and result.details == {}
    symmetric = evaluate_model(
        tiny_mecoq, queries, database, top_k=20, distance="symmetric", show_progress_bar=False
    )
    assert symmetric.pr_curve is None and 0.0 <= symmetric.map_at_k <= 1.0
    with pytest.raises(ValueError, match="The database split has no labels"):
        evaluate_model(tiny_mecoq, queries, database.remove_columns("label"), top_k=20)


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
