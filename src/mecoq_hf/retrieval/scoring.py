"""Scores of queries against PQ codes, and top-k ranking with a deterministic tie rule.

Shared by `evaluation.py` (mAP) and `index.py` (search) so both rank identically: by descending score, ties by
ascending database position (docs/method.md §7 leaves ties to an unstable argsort; we make them deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.mecoq.quantization import hard_codes, lookup_tables, symmetric_tables

DISTANCES = ("asymmetric", "symmetric")


# validation


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the accepted values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def check_query_embeddings(queries: torch.Tensor, dim: int) -> None:
    """Raise a ValueError unless `queries` is a finite floating (Q, dim) tensor."""
    if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != dim:
        got = tuple(queries.shape) if hasattr(queries, "shape") else type(queries).__name__
        raise ValueError(
            f"Query embeddings must have shape (Q, {dim}), got {got}. "
            "Embed queries with `model.embed(...)` of the model whose codebooks made the database codes."
        )
    if not queries.is_floating_point():
        raise ValueError(f"Query embeddings must be floating point, got dtype {queries.dtype}.")
    if not torch.isfinite(queries).all():
        raise ValueError("Query embeddings contain NaN or infinite values; check the model's outputs.")


# scoring


def query_tables(
    queries: torch.Tensor,
    codebooks: torch.Tensor,
    distance: str = "asymmetric",
    normalize_query_subvectors: bool = False,
) -> torch.Tensor:
    """(Q, d) queries -> (Q, M, K) per-query score tables; score(q, x) = sum_m table[q, m, x^m].

    asymmetric: <q^m, c_k^m> (the raw query, or its unit sub-vectors with `normalize_query_subvectors`,
    docs/method.md §10);
    symmetric: the query is hard-coded first and the table holds <c^m_{q^m}, c_k^m>.
    """
    check_choice("distance", distance, DISTANCES)
    if distance == "asymmetric":
        return lookup_tables(queries, codebooks, normalize_query_subvectors)
    return symmetric_tables(hard_codes(queries, codebooks), codebooks)


# ranking


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of (Q, N) scores, ordered by descending score and then ascending column.

    This is the first k entries of a stable descending sort, computed with `torch.topk` (whose choice and order
    among tied values are arbitrary): rows where a tie straddles the k-th place are re-selected exactly, and rows
    with ties inside the top k are re-ordered. Returns (values (Q, k'), columns (Q, k')), k' = min(k, N).
    """
    num_columns = scores.shape[1]
    k = min(k, num_columns)
    if k == 0:
        return scores[:, :0], torch.empty(scores.shape[0], 0, dtype=torch.int64)
    if 4 * k >= num_columns:  # a full stable sort is about as cheap
        values, columns = torch.sort(scores, dim=1, descending=True, stable=True)
        return values[:, :k], columns[:, :k]
    # One extra place tells whether items equal to the k-th value were left out: iff the (k+1)-th equals it.
    values, columns = torch.topk(scores, k + 1, dim=1)  # (Q, k + 1), sorted
    straddles = values[:, k] == values[:, k - 1]  # (Q,)
    values, columns = values[:, :k].contiguous(), columns[:, :k].contiguous()
    rows = straddles.nonzero().squeeze(1)
    if rows.numel():
        row_scores, kth = scores[rows], values[rows, -1:]  # (R, N), (R, 1)
        above, tied = row_scores > kth, row_scores == kth
        room = k - above.sum(dim=1, keepdim=True)  # (R, 1) slots left for tied items, lowest columns first
        keep = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))  # exactly k per row
        columns[rows] = keep.nonzero()[:, 1].reshape(rows.numel(), k)  # ascending columns
    rows = (straddles | (values[:, 1:] == values[:, :-1]).any(dim=1)).nonzero().squeeze(1)
    if rows.numel():  # order these rows by ascending column, then stably by descending score
        row_columns = columns[rows].sort(dim=1).values
        row_values, order = scores[rows].gather(1, row_columns).sort(dim=1, descending=True, stable=True)
        values[rows], columns[rows] = row_values, row_columns.gather(1, order)
    return values, columns


def scan_topk(
    tables: torch.Tensor, codes: torch.Tensor, k: int, block_size: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """`stable_topk` of `asymmetric_scores(tables, codes)` without building the (Q, N) matrix.

    The database is scored in blocks of `block_size` items, laid out (items, queries) as `embedding_bag`
    returns them. Once k results are held, a block only contributes items scoring strictly above each query's
    current k-th score (equal scores lose to the earlier item), which are usually few, so most blocks cost one
    scoring pass and one comparison. Memory is O(Q x block_size). Returns (values (Q, k'), positions (Q, k')).
    """
    num_queries, num_codebooks, codebook_size = tables.shape
    weight = tables.reshape(num_queries, num_codebooks * codebook_size).T.contiguous()  # (M*K, Q)
    offsets = torch.arange(num_codebooks, dtype=torch.int32) * codebook_size  # (M,)
    best = (tables.new_empty(num_queries, 0), torch.empty(num_queries, 0, dtype=torch.int64))
    for start in range(0, codes.shape[0], block_size):
        flat_codes = codes[start : start + block_size].to(torch.int32) + offsets  # (Nb, M)
        block = F.embedding_bag(flat_codes, weight, mode="sum")  # (Nb, Q)
        if best[0].shape[1] < k:
            new = stable_topk(block.T.contiguous(), k)
        else:
            new = _above_threshold(block, best[0][:, -1], k)
        if new[0].shape[1]:
            best = merge_ranked(best, (new[0], new[1] + start), k)
    return best


def _above_threshold(
    block: torch.Tensor, threshold: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, up to k best items of an (Nb, Q) block among those scoring above `threshold` (Q,).

    Returns (values (Q, w), block rows (Q, w)), w <= k; slots beyond a query's candidates hold -inf.
    """
    items, queries = (block > threshold).nonzero(as_tuple=True)  # candidate pairs, ordered by item
    if items.numel() * 8 > block.numel():  # many candidates: rank the whole block instead
        return stable_topk(block.T.contiguous(), k)
    order = torch.sort(queries, stable=True).indices  # group by query, keeping database order inside a group
    items, queries = items[order], queries[order]
    counts = torch.bincount(queries, minlength=block.shape[1])  # (Q,)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    slots = (
        torch.arange(queries.numel()) - (counts.cumsum(0) - counts)[queries]
    )  # place within the query's group
    values = block.new_full((block.shape[1], width), float("-inf"))  # (Q, width)
    rows = torch.zeros(block.shape[1], width, dtype=torch.int64)
    values[queries, slots], rows[queries, slots] = block[items, queries], items
    values, columns = stable_topk(values, k)
    return values, rows.gather(1, columns)


def merge_ranked(
    best: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two ranked candidate lists whose positions in `best` all precede those in `new`; keep k."""
    values = torch.cat([best[0], new[0]], dim=1)  # (Q, k1 + k2)
    positions = torch.cat([best[1], new[1]], dim=1)
    # A stable sort keeps `best` before `new` among equal scores, i.e. lower database position first.
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values[:, :k], positions.gather(1, order[:, :k])


__all__ = [
    "DISTANCES",
    "check_choice",
    "check_query_embeddings",
    "merge_ranked",
    "query_tables",
    "scan_topk",
    "stable_topk",
]
