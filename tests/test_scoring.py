"""Tests of scoring.py: search settings, score tables, the embedding_bag kernel, stable top-k, the scan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mecoq_hf import MeCoQConfig
from mecoq_hf.models.mecoq.quantization import ProductQuantizer, decode_codes
from mecoq_hf.retrieval.scoring import (
    SearchSettings,
    lookup_tables,
    query_tables,
    scan_topk,
    stable_topk,
    symmetric_tables,
    table_scores,
)

RAW = SearchSettings("asymmetric", normalize_query_subvectors=False)
UNIT = SearchSettings("asymmetric", normalize_query_subvectors=True)
SYMMETRIC = SearchSettings("symmetric")


def make_case(num_db=3000, num_queries=24, num_codebooks=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codebooks = F.normalize(torch.randn(num_codebooks, 256, 8, generator=generator), dim=-1)
    codes = torch.randint(0, 256, (num_db, num_codebooks), generator=generator).to(torch.uint8)
    codes[num_db // 2 : num_db // 2 + 200] = codes[:200]  # duplicated codes: exact ties across blocks
    return codebooks, codes, torch.randn(num_queries, num_codebooks * 8, generator=generator)


def reference_topk(scores: torch.Tensor, k: int):
    values, columns = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], columns[:, :k]


@pytest.fixture
def quantizer() -> ProductQuantizer:
    torch.manual_seed(0)
    return ProductQuantizer(dim=12, num_codebooks=3, codebook_size=8, softmax_scale=10.0)


# settings


@pytest.mark.parametrize("preset", [None, "official", "paper"])
def test_search_settings_default_to_the_config_defaults(preset):
    config = MeCoQConfig() if preset is None else MeCoQConfig.from_preset(preset)
    settings = SearchSettings.from_config(config)
    assert (settings.distance, settings.normalize_query_subvectors) == (
        config.distance,
        config.normalize_query_subvectors,
    )
    assert SearchSettings() == SearchSettings.from_config(MeCoQConfig())  # one source of the defaults
    assert SearchSettings.from_config(config, distance="symmetric").distance == "symmetric"


def test_search_settings_refuse_unknown_values():
    with pytest.raises(ValueError, match=r"distance must be one of \('asymmetric', 'symmetric'\)"):
        SearchSettings("cosine")
    with pytest.raises(TypeError, match="True or False"):
        SearchSettings("asymmetric", normalize_query_subvectors="yes")


def test_query_tables_without_settings_score_as_the_default_config():
    codebooks, _, queries = make_case(num_db=400)
    settings = SearchSettings.from_config(MeCoQConfig())
    assert torch.equal(query_tables(queries, codebooks), query_tables(queries, codebooks, settings))


# tables and the kernel


def test_asymmetric_scores_equal_dot_with_decoded(quantizer):
    queries, database = torch.randn(6, 12), torch.randn(20, 12)
    codes, codebooks = quantizer.encode(database), quantizer.normalized_codebooks()
    scores = table_scores(query_tables(queries, codebooks, RAW), codes)
    assert torch.allclose(scores, queries @ quantizer.decode(codes).T, atol=1e-5)
    normalized = table_scores(query_tables(queries, codebooks, UNIT), codes)
    unit_queries = F.normalize(queries.reshape(6, 3, 4), dim=-1).reshape(6, 12)
    assert torch.allclose(normalized, unit_queries @ quantizer.decode(codes).T, atol=1e-5)


def test_symmetric_scores_equal_dot_of_decoded(quantizer):
    queries = torch.randn(5, 12)
    codes, codebooks = quantizer.encode(torch.randn(9, 12)), quantizer.normalized_codebooks()
    expected = decode_codes(quantizer.encode(queries), codebooks) @ decode_codes(codes, codebooks).T
    assert torch.allclose(
        table_scores(query_tables(queries, codebooks, SYMMETRIC), codes), expected, atol=1e-5
    )
    tables = symmetric_tables(quantizer.encode(queries), codebooks)
    assert torch.equal(tables, query_tables(queries, codebooks, SYMMETRIC))


def test_table_scores_equal_an_explicit_gather():
    torch.manual_seed(6)
    tables = torch.randn(5, 3, 8)
    codes = torch.randint(0, 8, (11, 3), dtype=torch.uint8)
    expected = torch.tensor(
        [[sum(float(tables[q, m, int(codes[n, m])]) for m in range(3)) for n in range(11)] for q in range(5)]
    )
    assert torch.allclose(table_scores(tables, codes), expected, atol=1e-6)
    assert table_scores(tables, codes[:0]).shape == (5, 0)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        table_scores(tables, codes[:, :2])


@pytest.mark.parametrize("settings", [RAW, UNIT, SYMMETRIC])
def test_score_tables_ignore_bf16_autocast(quantizer, settings):
    queries, codebooks = torch.randn(32, 12), quantizer.normalized_codebooks().detach()
    reference = query_tables(queries, codebooks, settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tables = query_tables(queries, codebooks, settings)
    assert tables.dtype == torch.float32 and torch.equal(tables, reference)


def test_bad_query_width_is_named(quantizer):
    with pytest.raises(ValueError, match=r"\(Q, 12\)"):
        lookup_tables(torch.randn(2, 8), quantizer.normalized_codebooks(), normalize_query_subvectors=False)


# ranking


@pytest.mark.parametrize("k", [1, 3, 20, 100, 1000])
def test_stable_topk_equals_a_stable_sort(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 3, (40, 999), generator=generator).float()  # massive ties
    scores[::3] = torch.randn(14, 999, generator=generator)  # and rows without ties
    values, columns = stable_topk(scores, k)
    expected_values, expected_columns = reference_topk(scores, k)
    assert torch.equal(columns, expected_columns) and torch.equal(values, expected_values)


@pytest.mark.parametrize("settings", [RAW, UNIT, SYMMETRIC])
@pytest.mark.parametrize(
    ("k", "block_size"), [(1, 64), (10, 100), (50, 1024), (700, 256), (5000, 512), (10, 5000)]
)
def test_scan_topk_equals_ranking_the_full_matrix(settings, k, block_size):
    codebooks, codes, queries = make_case()
    tables = query_tables(queries, codebooks, settings)
    expected_values, expected_positions = reference_topk(table_scores(tables, codes), k)
    values, positions = scan_topk(tables, codes, k, block_size)
    assert torch.equal(positions, expected_positions) and torch.equal(values, expected_values)


def test_scan_topk_prefers_earlier_items_among_equal_scores():
    codebooks, _, queries = make_case()
    codes = torch.zeros(1000, 4, dtype=torch.uint8)  # every item scores the same
    values, positions = scan_topk(query_tables(queries, codebooks), codes, 5, block_size=64)
    assert torch.equal(positions, torch.arange(5).expand(24, 5))
    assert torch.equal(values, values[:, :1].expand(24, 5))
