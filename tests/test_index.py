"""Tests of index.py: CodeIndex add / search / reconstruct / save / load, and the faiss export and backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mecoq_hf.models.mecoq.quantization import (
    ProductQuantizer,
    asymmetric_scores,
    decode_codes,
    lookup_tables,
    symmetric_scores,
)
from mecoq_hf.retrieval.index import CodeIndex, IndexFormatError, load_sidecar, save_sidecar, sidecar_path


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
    index = CodeIndex(codebooks, database_batch_size=64, query_batch_size=5)
    index.add(codes[:200], ids[:200])
    index.add(codes[200:], ids[200:])
    return index, codebooks, codes, ids


def test_native_search_matches_brute_force_across_chunks(filled_index):
    index, codebooks, codes, ids = filled_index
    queries = torch.randn(12, 32)
    scores, found = index.search(queries, k=60)
    expected_scores, expected_ids = reference_search(
        asymmetric_scores(lookup_tables(queries, codebooks), codes), ids, 60
    )
    assert torch.equal(found, expected_ids)
    torch.testing.assert_close(scores, expected_scores)
    assert scores.dtype == torch.float32 and found.dtype == torch.int64 and index.ntotal == 500
    # One database chunk and one query batch give the same answer.
    single = CodeIndex(codebooks, database_batch_size=10_000, query_batch_size=1000)
    single.add(codes, ids)
    assert torch.equal(single.search(queries, k=60).ids, found)


def test_symmetric_and_normalized_query_search(filled_index):
    _, codebooks, codes, ids = filled_index
    queries = torch.randn(6, 32)
    quantizer = ProductQuantizer(dim=32, num_codebooks=4, codebook_size=256)
    quantizer.codebooks.data.copy_(codebooks)
    symmetric = CodeIndex(codebooks, distance="symmetric")
    symmetric.add(codes, ids)
    expected = reference_search(symmetric_scores(quantizer.encode(queries), codes, codebooks), ids, 40)
    assert torch.equal(symmetric.search(queries, 40).ids, expected[1])
    normalized = CodeIndex(codebooks, normalize_query_subvectors=True)
    normalized.add(codes, ids)
    unit_queries = F.normalize(queries.reshape(6, 4, 8), dim=-1).reshape(6, 32)
    expected = reference_search(unit_queries @ decode_codes(codes, codebooks).T, ids, 40)
    torch.testing.assert_close(normalized.search(queries, 40).scores, expected[0])


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
    index = filled_index[0]
    index.distance = "symmetric"
    path = index.save(tmp_path / "codes.safetensors")
    loaded = CodeIndex.load(path)
    assert [p.name for p in tmp_path.iterdir()] == ["codes.safetensors"]  # no temp file left behind
    assert torch.equal(loaded.codes, index.codes) and torch.equal(loaded.ids, index.ids)
    assert torch.equal(loaded.codebooks, index.codebooks) and loaded.distance == "symmetric"
    queries = torch.randn(4, 32)
    assert torch.equal(loaded.search(queries, 20).ids, index.search(queries, 20).ids)
    loaded.add(random_codes(3, seed=9), torch.tensor([1, 2, 4]))  # a loaded index stays writable
    assert loaded.ntotal == 503 and CodeIndex.load(path).ntotal == 500


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
    index = CodeIndex(codebooks, normalize_query_subvectors=normalize, database_batch_size=1024)
    index.add(codes, torch.arange(3000) + 100)
    queries = torch.randn(16, num_codebooks * 16)
    assert_equal_up_to_ties(index.search(queries, 50), index.search(queries, 50, backend="faiss"))
    scores, ids = index.search(queries, 4000, backend="faiss")  # k > ntotal pads like the native backend
    assert (ids[:, 3000:] == -1).all() and torch.isneginf(scores[:, 3000:]).all()


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


def test_faiss_needs_256_codewords_and_asymmetric_distance():
    index = CodeIndex(make_codebooks(codebook_size=16))
    index.add(random_codes(10, codebook_size=16))
    with pytest.raises(ValueError, match="K=256"):
        index.to_faiss()
    with pytest.raises(ValueError, match="K=256"):
        index.search(torch.randn(1, 32), 3, backend="faiss")
    symmetric = CodeIndex(make_codebooks(), distance="symmetric")
    with pytest.raises(ValueError, match="asymmetrically only"):
        symmetric.search(torch.randn(1, 32), 3, backend="faiss")


def test_sidecar_describes_the_ids_next_to_the_index(filled_index, tmp_path):
    index = filled_index[0]
    path = index.save(tmp_path / "new" / "folder" / "index.safetensors")  # missing folders are created
    assert path.is_file() and load_sidecar(path) is None  # an index without a sidecar
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    labels = [[1, 0], [0, 1]] + [[0, 0]] * 498  # multi-hot
    written = save_sidecar(path, model=model_folder, data={"source": "fashion-mnist", "limit": 500},
                           ids=index.ids.tolist(), labels=labels, class_names=["cat", "dog"], paths=[None] * 500)  # fmt: skip
    assert written == tmp_path / "new" / "folder" / "index.meta.json" == sidecar_path(path)
    assert sorted(p.name for p in written.parent.iterdir()) == ["index.meta.json", "index.safetensors"]
    sidecar = load_sidecar(path)
    assert sidecar["model"] == str(model_folder.resolve()) and sidecar["data"]["limit"] == 500
    assert sidecar["ids"] == index.ids.tolist() and sidecar["labels"][:3] == [[1, 0], [0, 1], [0, 0]]
    assert sidecar["class_names"] == ["cat", "dog"] and sidecar["paths"] is None  # no image has a file
    save_sidecar(path, model="org/model", data={}, ids=[3, 10], paths=["/a.png", None])
    assert load_sidecar(path)["model"] == "org/model" and load_sidecar(path)["paths"] == ["/a.png", None]
    assert load_sidecar(path)["labels"] is None

    sidecar_path(path).write_text('{"format": "mecoq-hf/splits"}')
    with pytest.raises(ValueError, match="is not a mecoq index sidecar"):
        load_sidecar(path)
    sidecar_path(path).write_text('{"format": "mecoq-hf/index-side')
    with pytest.raises(ValueError, match="Index sidecar .* is not valid JSON"):
        load_sidecar(path)
