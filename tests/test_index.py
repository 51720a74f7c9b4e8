"""Tests of index.py and backends.py: CodeIndex add / search / reconstruct / save / load, the backend registry
(native scan, faiss IndexPQ, a backend added in a test), and the faiss export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.models.mecoq.quantization import ProductQuantizer, decode_codes
from mecoq_hf.retrieval.backends import BACKENDS, IndexBackend
from mecoq_hf.retrieval.index import CodeIndex, IndexFormatError, SearchResult
from mecoq_hf.retrieval.scoring import SearchSettings, query_tables, table_scores

FIXTURES = Path(__file__).parent / "fixtures"
RAW = SearchSettings("asymmetric", normalize_query_subvectors=False)


def make_codebooks(num_codebooks=4, codebook_size=256, subvector_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_codebooks, codebook_size, subvector_dim, generator=generator), dim=-1)


def random_codes(count, num_codebooks=4, codebook_size=256, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, codebook_size, (count, num_codebooks), generator=generator).to(torch.uint8)


def reference_search(scores: torch.Tensor, ids: torch.Tensor, k: int):
    """Brute force: stable descending sort of the full (Q, N) scores, then map positions to ids."""
    values, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], ids[order[:, :k]]


@pytest.fixture
def filled_index():
    codebooks = make_codebooks()
    codes = random_codes(500)
    codes[250:300] = codes[:50]  # duplicated codes: exact ties, broken by insertion position
    ids = torch.randperm(500, generator=torch.Generator().manual_seed(2)) * 7 + 3
    index = CodeIndex(codebooks, block_size=64, query_batch_size=5)
    index.add(codes[:200], ids[:200])
    index.add(codes[200:], ids[200:])
    return index, codebooks, codes, ids


def test_native_search_matches_brute_force_across_chunks(filled_index):
    index, codebooks, codes, ids = filled_index
    queries = torch.randn(12, 32)
    scores, found = index.search(queries, k=60)
    expected_scores, expected_ids = reference_search(
        table_scores(query_tables(queries, codebooks), codes), ids, 60
    )
    assert torch.equal(found, expected_ids)
    torch.testing.assert_close(scores, expected_scores)
    assert scores.dtype == torch.float32 and found.dtype == torch.int64 and index.ntotal == 500
    # One database chunk and one query batch give the same answer.
    single = CodeIndex(codebooks, block_size=10_000, query_batch_size=1000)
    single.add(codes, ids)
    assert torch.equal(single.search(queries, k=60).ids, found)


def test_symmetric_raw_and_normalized_query_search(filled_index):
    _, codebooks, codes, ids = filled_index
    queries = torch.randn(6, 32)
    quantizer = ProductQuantizer(dim=32, num_codebooks=4, codebook_size=256)
    quantizer.codebooks.data.copy_(codebooks)
    decoded = decode_codes(codes, codebooks)  # (N, 32)
    symmetric = CodeIndex(codebooks, settings=SearchSettings("symmetric"))
    symmetric.add(codes, ids)
    expected = reference_search(decode_codes(quantizer.encode(queries), codebooks) @ decoded.T, ids, 40)
    assert_equal_up_to_ties(SearchResult(*expected), symmetric.search(queries, 40))
    normalized = CodeIndex(codebooks, settings=SearchSettings(normalize_query_subvectors=True))
    normalized.add(codes, ids)
    unit_queries = F.normalize(queries.reshape(6, 4, 8), dim=-1).reshape(6, 32)
    expected = reference_search(unit_queries @ decoded.T, ids, 40)
    torch.testing.assert_close(normalized.search(queries, 40).scores, expected[0])
    raw = CodeIndex(codebooks, settings=RAW)
    raw.add(codes, ids)
    torch.testing.assert_close(
        raw.search(queries, 40).scores, reference_search(queries @ decoded.T, ids, 40)[0]
    )


def tiny_model(preset: str | None = None) -> MeCoQModel:
    torch.manual_seed(0)
    settings = {"backbone": "test_efficientnet", "backbone_weights": None, "image_size": 32,
                "embedding_dim": 16, "num_codebooks": 2}  # fmt: skip
    return MeCoQModel(
        MeCoQConfig.from_preset(preset, **settings) if preset else MeCoQConfig(**settings)
    ).eval()


def test_a_default_index_scores_as_the_models_config():
    """`CodeIndex(model.normalized_codebooks())` follows `MeCoQConfig`'s defaults (the paper's unit query
    sub-vectors), as `evaluate_model` does; `CodeIndex.from_model` follows the model's own config (raw queries
    for an "official" model)."""
    queries, database = torch.randn(5, 16), torch.randn(200, 16)
    unit_queries = F.normalize(queries.reshape(5, 2, 8), dim=-1).reshape(5, 16)
    for preset, scored in ((None, unit_queries), ("official", queries)):
        model = tiny_model(preset)
        codes = model.quantizer.encode(database)
        expected = reference_search(scored @ model.decode(codes).T, torch.arange(200), 10)
        from_model = CodeIndex.from_model(model)
        from_model.add(codes)
        torch.testing.assert_close(from_model.search(queries, 10).scores, expected[0])
        assert from_model.settings == SearchSettings.from_config(model.config)
    model = tiny_model()
    index = CodeIndex(model.normalized_codebooks())  # no settings: the config's defaults
    index.add(model.quantizer.encode(database))
    expected = reference_search(unit_queries @ model.decode(index.codes).T, torch.arange(200), 10)
    torch.testing.assert_close(index.search(queries, 10).scores, expected[0])


def test_missing_results_are_padded():
    index = CodeIndex(make_codebooks())
    scores, ids = index.search(torch.randn(2, 32), k=3)
    assert torch.equal(ids, torch.full((2, 3), -1)) and torch.isinf(scores).all() and (scores < 0).all()
    index.add(random_codes(2), torch.tensor([10, 11]))
    scores, ids = index.search(torch.randn(2, 32), k=5)
    assert set(ids[:, :2].flatten().tolist()) == {10, 11} and (ids[:, 2:] == -1).all()
    assert torch.isfinite(scores[:, :2]).all() and torch.isneginf(scores[:, 2:]).all()


def test_add_embeddings_uses_the_quantizer_assignment():
    quantizer = ProductQuantizer(dim=32, num_codebooks=4, codebook_size=64)
    embeddings = torch.randn(300, 32)
    index = CodeIndex(quantizer.normalized_codebooks())
    codes = index.add_embeddings(embeddings, batch_size=64)
    assert torch.equal(codes, quantizer.encode(embeddings)) and torch.equal(index.codes, codes)
    assert torch.equal(index.ids, torch.arange(300))


def test_reconstruct_and_id_validation(filled_index):
    index, codebooks, codes, ids = filled_index
    torch.testing.assert_close(
        index.reconstruct(ids[[7, 3, 499]]), decode_codes(codes[[7, 3, 499]], codebooks)
    )
    with pytest.raises(ValueError, match="not in the index"):
        index.reconstruct(torch.tensor([1]))  # ids are 3 + 7n
    with pytest.raises(ValueError, match="unique"):
        index.add(random_codes(1), ids[:1])
    with pytest.raises(ValueError, match="non-negative"):
        index.add(random_codes(1), torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"shape \(N, M=4\)"):
        index.add(random_codes(3, num_codebooks=8))


def test_wrong_queries_and_k_are_refused_before_faiss(filled_index):
    index = filled_index[0]
    for backend in ("native", "faiss"):
        with pytest.raises(ValueError, match=r"shape \(Q, 32\)"):
            index.search(torch.randn(3, 31), k=5, backend=backend)
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(torch.randn(3, 32), k=0, backend=backend)
        with pytest.raises(ValueError, match="NaN"):
            index.search(torch.full((1, 32), float("nan")), k=5, backend=backend)


# persistence


def test_save_load_round_trip(filled_index, tmp_path):
    _, codebooks, codes, ids = filled_index
    index = CodeIndex(codebooks, settings=SearchSettings("symmetric"))
    index.add(codes, ids)
    path = index.save(tmp_path / "codes.safetensors")
    loaded = CodeIndex.load(path)
    assert [p.name for p in tmp_path.iterdir()] == ["codes.safetensors"]  # no temp file left behind
    assert torch.equal(loaded.codes, index.codes) and torch.equal(loaded.ids, index.ids)
    assert torch.equal(loaded.codewords, index.codewords) and loaded.settings == SearchSettings("symmetric")
    queries = torch.randn(4, 32)
    assert torch.equal(loaded.search(queries, 20).ids, index.search(queries, 20).ids)
    loaded.add(random_codes(3, seed=9), torch.tensor([1, 2, 4]))  # a loaded index stays writable
    assert loaded.ntotal == 503 and CodeIndex.load(path).ntotal == 500


def test_an_index_written_by_0_1_0_loads_and_searches_as_then():
    """tests/fixtures/index_saved_by_0.1.0: an index (M=2, K=256, unit query sub-vectors) and its sidecar,
    written by mecoq-hf 0.1.0, with the search results that version returned."""
    folder = FIXTURES / "index_saved_by_0.1.0"
    expected = json.loads((folder / "expected_search.json").read_text())
    queries = torch.tensor(expected["queries"])
    scores = torch.tensor(expected["scores"], dtype=torch.float32)
    for backend, key in (("native", "ids"), ("faiss", "faiss_ids")):
        index = CodeIndex.load(folder / "index.safetensors", backend=backend)
        result = index.search(queries, expected["k"])
        assert result.ids.tolist() == expected[key]
        if backend == "native":  # the same arithmetic as then; faiss sums in its own order
            assert torch.equal(result.scores, scores)
        torch.testing.assert_close(result.scores, scores, atol=1e-5, rtol=0)
    assert index.settings == SearchSettings("asymmetric", True) and index.ntotal == 24


def test_damaged_or_foreign_files_are_refused(filled_index, tmp_path):
    path = filled_index[0].save(tmp_path / "index.safetensors")
    data = path.read_bytes()
    cases = {
        "truncated": (data[: len(data) - 100], "truncated"),
        "header_only": (data[:40], "truncated"),
        "edited_code": (data[:-600] + bytes([data[-600] ^ 1]) + data[-599:], "checksum"),
        "edited_setting": (data.replace(b'"distance":"asymmetric"', b'"distance":"symmetric" '), "checksum"),
    }
    assert cases["edited_setting"][0] != data
    for name, (content, message) in cases.items():
        damaged = tmp_path / f"{name}.safetensors"
        damaged.write_bytes(content)
        with pytest.raises(IndexFormatError, match=message):
            CodeIndex.load(damaged)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(IndexFormatError, match="not a CodeIndex file"):
        CodeIndex.load(tmp_path / "model.safetensors")
    with pytest.raises(ValueError):  # IndexFormatError is a ValueError
        CodeIndex.load(tmp_path / "model.safetensors")


# faiss


def assert_equal_up_to_ties(native, other, tolerance=1e-5):
    """Same scores; the same ids at every rank whose score is not tied (within tolerance) with another rank,
    and the same set of ids above the last returned score (ties at the cut may pick different items)."""
    torch.testing.assert_close(other.scores, native.scores, atol=tolerance, rtol=0)
    for scores, native_ids, other_ids in zip(native.scores, native.ids, other.ids):
        inside = scores > scores[-1] + tolerance  # the last score may be tied with items left out
        isolated = inside & ((scores[:, None] - scores[None, :]).abs().lt(tolerance).sum(dim=1) == 1)
        assert torch.equal(native_ids[isolated], other_ids[isolated])
        assert set(native_ids[inside].tolist()) == set(other_ids[inside].tolist())


@pytest.mark.parametrize("num_codebooks", [4, 8])
@pytest.mark.parametrize("normalize", [False, True])
def test_faiss_backend_equals_native_up_to_ties(num_codebooks, normalize):
    codebooks = make_codebooks(num_codebooks, 256, 16)
    codes = random_codes(3000, num_codebooks)
    codes[1500:1600] = codes[:100]  # exact ties
    index = CodeIndex(
        codebooks, settings=SearchSettings(normalize_query_subvectors=normalize), block_size=1024
    )
    index.add(codes, torch.arange(3000) + 100)
    queries = torch.randn(16, num_codebooks * 16)
    assert_equal_up_to_ties(index.search(queries, 50), index.search(queries, 50, backend="faiss"))
    scores, ids = index.search(queries, 4000, backend="faiss")  # k > ntotal pads like the native backend
    assert (ids[:, 3000:] == -1).all() and torch.isneginf(scores[:, 3000:]).all()


@pytest.mark.parametrize("shards", [1, 3])
def test_faiss_backend_breaks_ties_by_position_like_native(shards):
    """Every code is one of 12, so each query's top 40 is made of long runs of exactly equal scores: faiss
    (one index or threaded shards) must return the same ids in the same order as the native scan."""
    codebooks = make_codebooks(4, 256, 16)
    pool = random_codes(12, 4)
    codes = pool[torch.randint(0, 12, (2000,), generator=torch.Generator().manual_seed(3))]
    index = CodeIndex(codebooks, block_size=256)
    index.add(codes, torch.arange(2000) * 7)
    queries = torch.randn(10, 64)
    native = index.search(queries, 40)
    faiss_result = CodeIndex.search(index, queries, 40, backend="faiss") if shards == 1 else None
    if shards > 1:
        sharded = CodeIndex(codebooks, backend="faiss", shards=shards)
        sharded.add(codes, torch.arange(2000) * 7)
        faiss_result = sharded.search(queries, 40)
    assert torch.equal(faiss_result.ids, native.ids)
    torch.testing.assert_close(faiss_result.scores, native.scores, atol=1e-5, rtol=0)


def test_to_faiss_holds_our_codebooks_codes_and_ids(filled_index):
    index, codebooks, codes, ids = filled_index
    faiss_index = index.to_faiss()
    assert faiss_index.ntotal == 500 and faiss_index.pq.M == 4 and faiss_index.pq.nbits == 8
    decoded = faiss_index.reconstruct_n(0, 500)
    np.testing.assert_allclose(decoded, decode_codes(codes, codebooks).numpy(), atol=1e-6)
    queries = torch.randn(3, 32)
    _, positions = faiss_index.search(queries.numpy(), 5)
    _, mapped = index.to_faiss(with_ids=True).search(queries.numpy(), 5)
    np.testing.assert_array_equal(mapped, ids.numpy()[positions])


def test_faiss_needs_256_codewords_and_asymmetric_distance(tmp_path):
    index = CodeIndex(make_codebooks(codebook_size=16))
    index.add(random_codes(10, codebook_size=16))
    with pytest.raises(ValueError, match="K=256"):
        index.to_faiss()
    with pytest.raises(ValueError, match="K=256"):
        index.search(torch.randn(1, 32), 3, backend="faiss")
    with pytest.raises(ValueError, match="K=256"):  # refused when chosen, before any search
        CodeIndex(make_codebooks(codebook_size=16), backend="faiss")
    symmetric = CodeIndex(make_codebooks(), settings=SearchSettings("symmetric"))
    with pytest.raises(ValueError, match="asymmetrically only"):
        symmetric.search(torch.randn(1, 32), 3, backend="faiss")
    path = symmetric.save(tmp_path / "symmetric.safetensors")
    with pytest.raises(ValueError, match="asymmetrically only"):
        CodeIndex.load(path, backend="faiss")


def test_the_faiss_backend_follows_later_additions(filled_index):
    _, codebooks, codes, ids = filled_index
    index = CodeIndex(codebooks, backend="faiss")
    index.add(codes[:100], ids[:100])
    queries = torch.randn(8, 32)
    assert torch.isin(index.search(queries, 5).ids, ids[:100]).all()  # builds the faiss index
    index.add(codes[100:], ids[100:])  # appended to the built faiss index
    native = CodeIndex(codebooks)
    native.add(codes, ids)
    assert_equal_up_to_ties(native.search(queries, 30), index.search(queries, 30))


# the backend registry


class DecodedDotBackend(IndexBackend):
    """A backend added by a test: decode every code and rank by a dense matrix product (exact, tiny)."""

    name = "decoded-dot"
    description = "decode and multiply (test)"

    def __init__(self, index, *, scale: float = 1.0) -> None:
        super().__init__(index)
        self.scale = scale

    @classmethod
    def check(cls, codewords, settings):
        if settings.distance != "asymmetric":
            raise ValueError("decoded-dot scores asymmetrically only.")

    def add(self, codes):
        pass  # reads index.codes at search time

    def search(self, queries, k):
        if self.index.settings.normalize_query_subvectors:
            queries = F.normalize(queries.reshape(len(queries), self.index.num_codebooks, -1), dim=-1)
        scores = queries.reshape(len(queries), -1) @ decode_codes(self.index.codes, self.index.codewords).T
        values, positions = torch.sort(self.scale * scores, dim=1, descending=True, stable=True)
        return values[:, :k], positions[:, :k]


def test_a_backend_is_one_class_and_one_registry_entry(filled_index, monkeypatch, tmp_path):
    _, codebooks, codes, ids = filled_index
    monkeypatch.setitem(BACKENDS, DecodedDotBackend.name, DecodedDotBackend)
    index = CodeIndex(codebooks, backend="decoded-dot", scale=2.0)
    index.add(codes, ids)
    native = CodeIndex(codebooks)
    native.add(codes, ids)
    queries = torch.randn(7, 32)
    result, expected = index.search(queries, 25), native.search(queries, 25)
    assert torch.equal(result.ids, expected.ids)  # ties by position in both
    torch.testing.assert_close(result.scores, 2 * expected.scores, atol=1e-5, rtol=0)
    path = index.save(tmp_path / "index.safetensors")  # the file does not depend on the backend
    loaded = CodeIndex.load(path, backend="decoded-dot")
    assert torch.equal(loaded.search(queries, 25).ids, expected.ids)
    with pytest.raises(ValueError, match="decoded-dot scores asymmetrically only"):
        CodeIndex(codebooks, settings=SearchSettings("symmetric"), backend="decoded-dot")
    from mecoq_hf.cli import build_parser

    search = build_parser().parse_args(
        ["search", "x.safetensors", "--image", "q.png", "--backend", "decoded-dot"]
    )
    assert search.backend == "decoded-dot"  # the CLI's choices read the registry


def test_unknown_backends_and_options_are_named():
    codebooks = make_codebooks()
    with pytest.raises(ValueError, match=r"backend must be one of \('native', 'faiss', 'ivf'\), got 'hnsw'"):
        CodeIndex(codebooks, backend="hnsw")
    with pytest.raises(
        ValueError, match=r"'native' backend takes the options \('query_batch_size', 'block_size'\)"
    ):
        CodeIndex(codebooks, nprobe=8)
    with pytest.raises(ValueError, match=r"'faiss' backend takes the options \('shards',\)"):
        CodeIndex(codebooks, backend="faiss", block_size=64)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        CodeIndex(codebooks, block_size=0).search(torch.randn(1, 32), 3)
    index = CodeIndex(codebooks, block_size=64)
    index.add(random_codes(10))
    with pytest.raises(ValueError, match="backend must be one of"):
        index.search(torch.randn(1, 32), 3, backend="hnsw")
