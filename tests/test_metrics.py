"""Tests of metrics.py: mAP@K, precision-recall and precision@N against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from retrieval_references import reference_curves, reference_map
from sklearn.metrics import average_precision_score

from mecoq_hf.retrieval.metrics import (
    average_precision,
    mean_average_precision,
    precision_at_n_curve,
    precision_recall_curve,
)


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
