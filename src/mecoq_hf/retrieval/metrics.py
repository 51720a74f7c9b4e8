"""Retrieval metrics: mAP@K, precision-recall and precision@N curves over a (Q, N) score matrix.

Definitions follow the reference code (docs/method.md §8): relevant = same class id (labels of shape (n,))
or at least one shared label (multi-hot labels of shape (n, C)); AP@K divides by the number of relevant items
*inside* the top K and is 0 when there are none; the ranking is by descending score with ties broken by
database position (lower first), which makes results deterministic where the reference relied on an unstable
argsort (docs/method.md §7).

Every metric reads its (Q, N) scores a block of query rows at a time, so 10,000 queries against 1,000,000
database items run in bounded memory. Scores may be a tensor or any lazy `ScoreMatrix`, such as
`evaluation.CodeScores` (query embeddings against database codes), which never holds more than one block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from .scoring import stable_topk

# Elements of a (queries x database) block processed at once. A full ranking (top_k=None, PR curves) peaks
# near 100 bytes per element (sort values and indices, gathered labels, float64 hits), about 400 MiB for 2**22
# (see BENCHMARKS.md); a top-k ranking of a score tensor needs ~12 bytes per element.
TOPK_BLOCK_ELEMENTS = 2**24
SORT_BLOCK_ELEMENTS = 2**22


class ScoreMatrix(Protocol):
    """What the metrics need from their scores: a (Q, N) shape and row blocks `scores[start:stop]`.

    A matrix may also offer `stable_topk(rows, k)` (as `CodeScores` does) to rank rows without building them.
    """

    shape: Sequence[int]

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


# relevance


class _Relevance:
    """Relevance of ranked database items to queries, for class ids (n,) or multi-hot labels (n, C)."""

    def __init__(self, query_labels: Any, db_labels: Any, num_queries: int, num_db: int) -> None:
        query_labels, db_labels = torch.as_tensor(query_labels).cpu(), torch.as_tensor(db_labels).cpu()
        if query_labels.ndim != db_labels.ndim or query_labels.ndim not in (1, 2):
            raise ValueError(
                "Labels must be class ids of shape (n,) or multi-hot of shape (n, C) on both sides, got "
                f"query labels {tuple(query_labels.shape)} and database labels {tuple(db_labels.shape)}."
            )
        if (query_labels.shape[0], db_labels.shape[0]) != (num_queries, num_db):
            raise ValueError(
                f"Scores are ({num_queries}, {num_db}) but there are {query_labels.shape[0]} query labels "
                f"and {db_labels.shape[0]} database labels; pass one label row per query and database item."
            )
        self.multi_label = query_labels.ndim == 2
        if self.multi_label:
            if query_labels.shape[1] != db_labels.shape[1]:
                raise ValueError(
                    f"Multi-hot widths differ: {query_labels.shape[1]} vs {db_labels.shape[1]} labels."
                )
            self.query, self.db = _pack_bits(query_labels != 0), _pack_bits(db_labels != 0)  # (n, W) int64
        else:
            if query_labels.is_floating_point() or db_labels.is_floating_point():
                raise ValueError(
                    "Class-id labels of shape (n,) must be integers; use (n, C) for multi-hot labels."
                )
            self.query, self.db = query_labels.long(), db_labels.long()

    def at(self, start: int, stop: int, columns: torch.Tensor) -> torch.Tensor:
        """(Qc, k) ranked database positions of queries start..stop -> (Qc, k) bool relevance."""
        ranked = self.db[columns]  # (Qc, k) or (Qc, k, W)
        if not self.multi_label:
            return ranked == self.query[start:stop, None]
        return ((ranked & self.query[start:stop, None, :]) != 0).any(dim=-1)


def _pack_bits(labels: torch.Tensor) -> torch.Tensor:
    """(n, C) bool -> (n, ceil(C/64)) int64 bit masks, so "shares a label" is one AND per 64 labels."""
    words = max(1, -(-labels.shape[1] // 64))
    padded = torch.zeros(labels.shape[0], words * 64, dtype=torch.int64)
    padded[:, : labels.shape[1]] = labels.long()
    shifts = torch.arange(64, dtype=torch.int64)
    return (padded.reshape(-1, words, 64) << shifts).sum(dim=-1)  # exact in two's complement, bit 63 included


# ranked relevance, one block of queries at a time


def _check_scores(scores: ScoreMatrix) -> tuple[int, int]:
    shape = tuple(getattr(scores, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"Scores must be a (n_query, n_db) matrix, got shape {shape}.")
    return int(shape[0]), int(shape[1])


def check_top_k(top_k: int | None, num_db: int) -> int:
    if top_k is None:
        return num_db
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None (whole database), got {top_k!r}.")
    return min(top_k, num_db)


def _ranked_relevance(
    scores: ScoreMatrix, query_labels: Any, db_labels: Any, depth: int | None, chunk_size: int | None
) -> Iterator[torch.Tensor]:
    """Yield (Qc, depth) bool relevance of each query block's ranking (score desc, then database position)."""
    num_queries, num_db = _check_scores(scores)
    depth = check_top_k(depth, num_db)
    relevance = _Relevance(query_labels, db_labels, num_queries, num_db)
    full_sort = 4 * depth >= num_db
    ranks_itself = callable(getattr(scores, "stable_topk", None))  # e.g. CodeScores: memory O(Qc x block)
    if chunk_size is None:
        budget = SORT_BLOCK_ELEMENTS if full_sort else TOPK_BLOCK_ELEMENTS
        chunk_size = 256 if ranks_itself and not full_sort else max(1, budget // max(num_db, 1))
    for start in range(0, num_queries, chunk_size):
        rows = slice(start, min(start + chunk_size, num_queries))
        if ranks_itself:
            _, columns = scores.stable_topk(rows, depth)  # (Qc, depth)
        else:
            block = scores[rows]  # (Qc, N)
            if not block.is_floating_point() or torch.isnan(block).any():
                raise ValueError("Scores must be floating point without NaN (higher = more similar).")
            _, columns = stable_topk(block, depth)
            del block
        yield relevance.at(rows.start, rows.stop, columns.cpu())


def _hits_and_ranks(relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Qc, k) bool -> cumulative hits (Qc, k) and ranks 1..k (k,), both float64."""
    hits = relevant.cumsum(dim=1, dtype=torch.float64)
    return hits, torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64)


# metrics


def average_precision(
    scores: ScoreMatrix,
    query_labels: Any,
    db_labels: Any,
    top_k: int | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-query AP@top_k (docs/method.md §8.1) as a (Q,) float64 tensor; `top_k=None`: the whole database.

    Args:
        scores: (Q, N) similarities (higher = more similar): a tensor or a `CodeScores`.
        query_labels, db_labels: class ids (Q,), (N,) or multi-hot (Q, C), (N, C).
        top_k: K in AP@K, or None for the whole database (K larger than N means the whole database).
        chunk_size: queries per block; default keeps a block near 2**24 (top-k) or 2**22 (full sort) scores.
    """
    parts = []
    for relevant in _ranked_relevance(scores, query_labels, db_labels, top_k, chunk_size):
        hits, ranks = _hits_and_ranks(relevant)
        found = hits[:, -1] if hits.shape[1] else hits.new_zeros(hits.shape[0])  # (Qc,) relevant in the top K
        precision_sum = (hits / ranks * relevant).sum(dim=1)
        parts.append(torch.where(found > 0, precision_sum / found.clamp(min=1), 0.0))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def mean_average_precision(
    scores: ScoreMatrix,
    query_labels: Any,
    db_labels: Any,
    top_k: int | None = None,
    *,
    chunk_size: int | None = None,
) -> float:
    """mAP@top_k of the reference code (docs/method.md §8.1); see `average_precision` for the arguments."""
    per_query = average_precision(scores, query_labels, db_labels, top_k, chunk_size=chunk_size)
    if per_query.numel() == 0:
        raise ValueError("mAP needs at least one query; got an empty score matrix.")
    return float(per_query.mean())


def precision_recall_curve(
    scores: ScoreMatrix, query_labels: Any, db_labels: Any, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall at every rank 1..N of the full ranking, averaged over queries (docs/method.md
    §8.2).

    Recall divides by the relevant items in the whole database; a query with none has recall 0 at every rank.
    Returns (precision (N,), recall (N,)) float64.
    """
    _, num_db = _check_scores(scores)
    precision_sum = torch.zeros(num_db, dtype=torch.float64)
    recall_sum = torch.zeros(num_db, dtype=torch.float64)
    count = 0
    for relevant in _ranked_relevance(scores, query_labels, db_labels, None, chunk_size):
        hits, ranks = _hits_and_ranks(relevant)
        precision_sum += (hits / ranks).sum(dim=0)
        recall_sum += (hits / hits[:, -1:].clamp(min=1)).sum(dim=0)
        count += relevant.shape[0]
    return precision_sum / max(count, 1), recall_sum / max(count, 1)


def precision_at_n_curve(
    scores: ScoreMatrix, query_labels: Any, db_labels: Any, max_n: int, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Mean precision of the top n results for n = 1..max_n (docs/method.md §8.2), shape (min(max_n, N),)."""
    _, num_db = _check_scores(scores)
    curve, count = torch.zeros(check_top_k(max_n, num_db), dtype=torch.float64), 0
    for relevant in _ranked_relevance(scores, query_labels, db_labels, max_n, chunk_size):
        hits, ranks = _hits_and_ranks(relevant)
        curve += (hits / ranks).sum(dim=0)
        count += relevant.shape[0]
    return curve / max(count, 1)


__all__ = [
    "ScoreMatrix",
    "average_precision",
    "mean_average_precision",
    "precision_at_n_curve",
    "precision_recall_curve",
]
