"""Tests of ranking.py: the stable top-k, and the blocked scan used by search and evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mecoq_hf.models.mecoq.quantization import asymmetric_scores
from mecoq_hf.retrieval.scoring import query_tables, scan_topk, stable_topk


def make_case(num_db=3000, num_queries=24, num_codebooks=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codebooks = F.normalize(torch.randn(num_codebooks, 256, 8, generator=generator), dim=-1)
    codes = torch.randint(0, 256, (num_db, num_codebooks), generator=generator).to(torch.uint8)
    codes[num_db // 2 : num_db // 2 + 200] = codes[:200]  # duplicated codes: exact ties across blocks
    return codebooks, codes, torch.randn(num_queries, num_codebooks * 8, generator=generator)


def reference_topk(scores: torch.Tensor, k: int):
    values, columns = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], columns[:, :k]


@pytest.mark.parametrize("k", [1, 3, 20, 100, 1000])
def test_stable_topk_equals_a_stable_sort(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 3, (40, 999), generator=generator).float()  # massive ties
    scores[::3] = torch.randn(14, 999, generator=generator)  # and rows without ties
    values, columns = stable_topk(scores, k)
    expected_values, expected_columns = reference_topk(scores, k)
    assert torch.equal(columns, expected_columns) and torch.equal(values, expected_values)


@pytest.mark.parametrize("distance", ["asymmetric", "symmetric"])
@pytest.mark.parametrize(
    ("k", "block_size"), [(1, 64), (10, 100), (50, 1024), (700, 256), (5000, 512), (10, 5000)]
)
def test_scan_topk_equals_ranking_the_full_matrix(distance, k, block_size):
    codebooks, codes, queries = make_case()
    tables = query_tables(queries, codebooks, distance)
    expected_values, expected_positions = reference_topk(asymmetric_scores(tables, codes), k)
    values, positions = scan_topk(tables, codes, k, block_size)
    assert torch.equal(positions, expected_positions) and torch.equal(values, expected_values)


def test_scan_topk_prefers_earlier_items_among_equal_scores():
    codebooks, _, queries = make_case()
    codes = torch.zeros(1000, 4, dtype=torch.uint8)  # every item scores the same
    values, positions = scan_topk(query_tables(queries, codebooks), codes, 5, block_size=64)
    assert torch.equal(positions, torch.arange(5).expand(24, 5))
    assert torch.equal(values, values[:, :1].expand(24, 5))
