"""Tests of baselines.py: LSH, ITQ, PQ / OPQ (real faiss) and exact cosine on synthetic and real features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mecoq_hf.retrieval.baselines import (
    ITQ,
    LSH,
    OPQ,
    PQ,
    ExactCosine,
    HammingScores,
    make_baseline,
    pack_bits,
    unpack_bits,
)
from mecoq_hf.retrieval.metrics import mean_average_precision


def clustered_features(seed: int, num_items: int = 1200, dim: int = 32, num_classes: int = 8):
    """Unit-ish class centres plus noise: (N, dim) features and (N,) labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(0, num_classes, (num_items,), generator=generator)
    return centres[labels] + 0.6 * torch.randn(num_items, dim, generator=generator), labels


@pytest.fixture(scope="module")
def digits():
    """Real data: scikit-learn's 8x8 digit images as 64-d pixel features; 300 queries, 1497 database items."""
    images, labels = load_digits(return_X_y=True)
    features, labels = torch.tensor(images, dtype=torch.float32), torch.tensor(labels)
    return features[:300], labels[:300], features[300:], labels[300:]


def retrieval_map(method, queries, query_labels, database, db_labels, top_k=100) -> float:
    method.fit(database)
    return mean_average_precision(
        method.scores(queries, method.encode(database)), query_labels, db_labels, top_k
    )


# binary codes


def test_pack_and_unpack_bits_round_trip_most_significant_bit_first():
    signs = torch.tensor([[True] + [False] * 7 + [False] * 7 + [True]])
    packed = pack_bits(signs)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[128, 1]]
    assert torch.equal(unpack_bits(packed, 16), signs)


def test_hamming_scores_count_equal_bits():
    query = pack_bits(torch.tensor([[True] * 8 + [False] * 8]))
    database = pack_bits(
        torch.tensor([[True] * 8 + [False] * 8, [False] * 8 + [True] * 8, [True] * 4 + [False] * 12])
    )
    scores = HammingScores(query, database, bits=16)
    assert scores.shape == (1, 3)
    assert scores[0:1].tolist() == [[16.0, 0.0, 12.0]]


@pytest.mark.parametrize("method_class", [LSH, ITQ])
def test_binary_codes_have_bits_over_8_bytes_and_match_themselves(method_class):
    features, _ = clustered_features(0)
    method = method_class(32).fit(features)
    codes = method.encode(features[:50])
    assert codes.shape == (50, 4) and codes.dtype == torch.uint8
    assert torch.equal(torch.diagonal(method.scores(features[:50], codes)[0:50]), torch.full((50,), 32.0))


def test_hamming_scores_refuse_codes_of_another_length():
    codes = pack_bits(torch.ones(3, 16, dtype=torch.bool))  # (3, 2) bytes: 16 bits
    with pytest.raises(ValueError, match=r"db_codes must be packed bits of shape \(N, 4\)"):
        HammingScores(pack_bits(torch.ones(1, 32, dtype=torch.bool)), codes, bits=32)


def test_lsh_is_deterministic_per_seed():
    features, _ = clustered_features(1)
    codes = [LSH(16, seed=seed).fit(features).encode(features) for seed in (3, 3, 4)]
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])


# ITQ


def test_itq_rotation_is_orthogonal_and_its_quantization_loss_decreases():
    features, _ = clustered_features(2, dim=48)
    itq = ITQ(16, iterations=50).fit(features)
    rotation = itq.rotation
    assert rotation.shape == (16, 16)
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(16, dtype=torch.float64), atol=1e-10, rtol=0)
    losses = np.asarray(itq.quantization_losses)
    assert losses.shape == (50,)
    assert np.all(np.diff(losses) <= 1e-9)  # alternating minimisation never increases the loss
    assert losses[-1] < losses[0] - 0.01 * abs(losses[0])


def test_itq_projection_spans_the_top_principal_subspace_and_gives_the_codes():
    features, _ = clustered_features(3)
    itq = ITQ(8).fit(features)
    unit = F.normalize(features, dim=1)
    centred = (unit - unit.mean(dim=0)).double()
    covariance = centred.T @ centred / len(centred)
    projection = itq.projection.double()  # (F, 8) = PCA directions times the rotation: orthonormal columns
    torch.testing.assert_close(
        projection.T @ projection, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0
    )
    captured = torch.trace(projection.T @ covariance @ projection)
    top_eigenvalues = torch.linalg.eigvalsh(covariance)[-8:].sum()
    torch.testing.assert_close(captured, top_eigenvalues, atol=1e-5, rtol=1e-4)
    assert torch.equal(itq.encode(features), pack_bits(centred.float() @ itq.projection >= 0))


def test_itq_beats_lsh_on_clustered_data():
    features, labels = clustered_features(4, num_items=1500)
    args = (features[:200], labels[:200], features[200:], labels[200:])
    assert retrieval_map(ITQ(16), *args) > retrieval_map(LSH(16), *args) + 0.05


# PQ / OPQ (real faiss)


def test_pq_scores_equal_faiss_index_pq_search():
    features, _ = clustered_features(5, num_items=2000, dim=32)
    pq = PQ(32).fit(features[300:])
    codes = pq.encode(features[300:])
    assert codes.shape == (1700, 4) and codes.dtype == torch.uint8
    assert pq.centroids.shape == (4, 256, 8)
    ours = pq.scores(features[:300], codes)[0:300]  # (300, 1700)
    faiss_scores, positions = pq.to_faiss(codes).search(pq.query_embeddings(features[:300]).numpy(), 10)
    torch.testing.assert_close(ours.gather(1, torch.from_numpy(positions)), torch.from_numpy(faiss_scores),
                               atol=1e-4, rtol=0)  # fmt: skip
    torch.testing.assert_close(ours.topk(10, dim=1).values, torch.from_numpy(faiss_scores), atol=1e-4, rtol=0)


def test_pq_on_clustered_data_beats_lsh():
    features, labels = clustered_features(6, num_items=1500)
    args = (features[:200], labels[:200], features[200:], labels[200:])
    assert retrieval_map(PQ(16), *args) > retrieval_map(LSH(16), *args) + 0.1


def test_opq_rotation_is_orthogonal_and_preserves_scores_geometry():
    features, _ = clustered_features(7, num_items=1500)
    opq = OPQ(32, iterations=5).fit(features)
    rotation = opq.rotation_matrix.double()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(32, dtype=torch.float64), atol=1e-4, rtol=0)
    rotated = opq.query_embeddings(features[:10])
    torch.testing.assert_close(rotated.norm(dim=1), torch.ones(10), atol=1e-5, rtol=0)  # still unit vectors


def test_opq_quantizes_correlated_features_better_than_pq():
    """Features whose variance sits in a few directions spread over all sub-spaces: OPQ's rotation helps."""
    generator = torch.Generator().manual_seed(8)
    latent = torch.randn(3000, 4, generator=generator) * torch.tensor([3.0, 2.0, 1.0, 0.5])
    features = latent @ torch.randn(4, 32, generator=generator) + 0.05 * torch.randn(
        3000, 32, generator=generator
    )
    unit = F.normalize(features, dim=1)
    errors = {}
    for method in (PQ(16), OPQ(16, iterations=10)):
        method.fit(features)
        queries = method.query_embeddings(features)  # rotated unit vectors (OPQ) or unit vectors (PQ)
        codes = method.encode(features).long()
        decoded = method.centroids[torch.arange(2), codes].reshape(len(features), -1)  # (N, d)
        errors[method.name] = float((queries - decoded).pow(2).sum(dim=1).mean())
    assert unit.shape == (3000, 32)
    assert errors["opq"] < errors["pq"]


# real data: scikit-learn digits


def test_methods_rank_as_expected_on_real_digits(digits):
    values = {
        name: retrieval_map(make_baseline(name, 32), *digits) for name in ("cosine", "lsh", "itq", "pq")
    }
    assert values["cosine"] > 0.8  # 8x8 digits are easy for cosine on pixels
    assert values["lsh"] < values["itq"] < values["cosine"] + 0.02
    assert values["pq"] > values["lsh"] + 0.05


def test_exact_cosine_scores_are_cosines():
    features, _ = clustered_features(9, num_items=40)
    cosine = ExactCosine().fit(features)
    scores = cosine.scores(features[:5], cosine.encode(features))[0:5]
    expected = F.normalize(features[:5], dim=1) @ F.normalize(features, dim=1).T
    torch.testing.assert_close(scores, expected)


# errors


@pytest.mark.parametrize("bits", [0, 12, 7, True, 16.0])
def test_bits_must_be_whole_bytes(bits):
    with pytest.raises(ValueError, match="multiple of 8"):
        LSH(bits)


def test_encoding_before_fit_names_the_fix():
    with pytest.raises(ValueError, match="call fit"):
        ITQ(16).encode(torch.randn(3, 32))
    with pytest.raises(ValueError, match="call fit"):
        PQ(16).encode(torch.randn(3, 32))


def test_wrong_feature_width_is_reported_with_shapes():
    method = LSH(16).fit(torch.randn(100, 32))
    with pytest.raises(ValueError, match=r"\(N, 32\).*\(3, 31\)"):
        method.encode(torch.randn(3, 31))


def test_pq_needs_divisible_width_and_enough_training_vectors():
    with pytest.raises(ValueError, match="divide the feature width 30"):
        PQ(32).fit(torch.randn(500, 30))
    with pytest.raises(ValueError, match="at least 256 training vectors"):
        PQ(16).fit(torch.randn(100, 32))


def test_itq_needs_bits_within_the_feature_width():
    with pytest.raises(ValueError, match="bits <= feature width"):
        ITQ(64).fit(torch.randn(500, 32))


def test_non_finite_features_are_refused():
    features = torch.randn(300, 16)
    features[3, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        LSH(8).fit(features)


def test_unknown_baseline_lists_the_names():
    with pytest.raises(ValueError, match="cosine.*itq.*lsh.*opq.*pq"):
        make_baseline("sh", 16)


def test_evaluate_pq_baseline_on_a_models_frozen_backbone_features():
    # Imported here, so that this file's other tests need neither datasets nor a model.
    from mecoq_hf import MeCoQConfig, MeCoQModel
    from mecoq_hf.data.sources import load_fashion_mnist
    from mecoq_hf.data.splits import retrieval_splits
    from mecoq_hf.data.transforms import build_eval_transform
    from mecoq_hf.feature_cache import compute_features
    from mecoq_hf.retrieval.baselines import evaluate_pq_baseline
    from mecoq_hf.retrieval.metrics import precision_recall_curve

    torch.manual_seed(0)
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=16)  # fmt: skip
    model = MeCoQModel(config).eval()  # frozen backbone: the baseline uses the model's own
    images = load_fashion_mnist("test", limit=340)
    splits = retrieval_splits(images, num_query=20, num_validation=0, num_train=256, seed=0)
    result = evaluate_pq_baseline(
        model, splits, top_k=50, batch_size=64, pr_curve=True, show_progress_bar=False
    )

    transform = build_eval_transform(model.backbone.data_config)
    features = {name: compute_features(model.backbone, splits[name], transform, show_progress_bar=False)
                for name in ("train", "query", "database")}  # fmt: skip
    pq = PQ(bits=16).fit(features["train"].outputs)  # M = 2 codebooks of 256 codewords, as the model's M
    scores = pq.scores(features["query"].outputs, pq.encode(features["database"].outputs))
    labels = features["query"].labels, features["database"].labels
    assert labels[0].tolist() == splits["query"]["label"][:]
    assert result.map_at_k == pytest.approx(mean_average_precision(scores, *labels, 50), abs=1e-12)
    assert 0.1 < result.map_at_k <= 1.0  # real features of real images: above chance (0.1)
    precision, recall = precision_recall_curve(scores, *labels)
    assert torch.equal(result.pr_curve[0], precision) and torch.equal(result.pr_curve[1], recall)
    assert result.details["num_train"] == 256 and "IndexPQ(M=2, 8 bits" in result.details["method"]
    assert result.details["feature_dim"] == features["train"].outputs.shape[1] == model.backbone.num_features
