"""Brute-force retrieval references for the metric and evaluation tests: one query at a time, NumPy only."""

from __future__ import annotations

import numpy as np


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
