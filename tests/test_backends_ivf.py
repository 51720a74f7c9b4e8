"""Tests of the faiss IVF backend (ivf.py, backends.FaissIVF), the sharded faiss exhaustive backend, on-disk
inverted lists, and the index file (index_file.py): one unit under one checksum, streamed writes."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from mecoq_hf.models.mecoq.quantization import ProductQuantizer
from mecoq_hf.retrieval import ivf
from mecoq_hf.retrieval.index import CodeIndex, IndexFormatError
from mecoq_hf.retrieval.index_file import TensorPlan, read_index_file, write_index_file
from mecoq_hf.retrieval.scoring import SearchSettings
from mecoq_hf.retrieval.sharded_build import write_ondisk_lists_of
from mecoq_hf.retrieval.sidecar import IndexSidecar


def clustered_index(count=6000, num_codebooks=4, seed=0, **options) -> tuple[CodeIndex, torch.Tensor]:
    """An index of codes of clustered embeddings (as real data is), and queries near the clusters."""
    generator = torch.Generator().manual_seed(seed)
    quantizer = ProductQuantizer(dim=16 * num_codebooks, num_codebooks=num_codebooks, codebook_size=256)
    centers = torch.randn(40, 16 * num_codebooks, generator=generator)
    members = torch.randint(0, 40, (count,), generator=generator)
    embeddings = centers[members] + 0.5 * torch.randn(count, 16 * num_codebooks, generator=generator)
    index = CodeIndex(quantizer.normalized_codebooks(), **options)
    index.add_embeddings(embeddings, ids=torch.arange(count) * 5 + 1)
    queries = centers[torch.randint(0, 40, (25,), generator=generator)]
    queries = queries + 0.5 * torch.randn(queries.shape, generator=generator)
    return index, queries


def recall_at(reference: torch.Tensor, found: torch.Tensor) -> float:
    return float((reference[:, :, None] == found[:, None, :]).any(-1).float().mean())


@pytest.mark.parametrize("normalize", [False, True])
def test_ivf_with_every_list_probed_is_the_exhaustive_search(normalize):
    settings = SearchSettings(normalize_query_subvectors=normalize)
    index, queries = clustered_index(settings=settings)
    ivf_index = CodeIndex(index.codewords, settings=settings, backend="ivf", nlist=32, nprobe=32)
    ivf_index.add(index.codes, index.ids)
    exhaustive = index.search(queries, 100)  # the native scan: ties to the earlier item
    full = ivf_index.search(queries, 100)
    assert torch.equal(full.ids, exhaustive.ids)  # ties to the earlier item too
    torch.testing.assert_close(full.scores, exhaustive.scores, atol=1e-5, rtol=0)
    searcher = ivf_index._backend("ivf")
    searcher.set_nprobe(1)  # one list: only its items are scanned, each with its exact score
    partial = ivf_index.search(queries, 10)
    lookup = scored(queries, settings)
    nearest_list = (lookup @ searcher.centroids.T).argmax(dim=1)  # (Q,)
    positions = (partial.ids - 1) // 5  # ids are 5 * position + 1
    found = partial.ids >= 0
    assert (
        searcher.state()["lists"][positions[found]] == nearest_list[:, None].expand_as(positions)[found]
    ).all()
    expected = (index.reconstruct(partial.ids[0][found[0]]) @ lookup[0]).float()
    torch.testing.assert_close(partial.scores[0][found[0]], expected, atol=1e-5, rtol=0)
    assert 0.3 < recall_at(exhaustive.ids[:, :10], partial.ids) <= 1.0


def scored(queries, settings):
    from mecoq_hf.retrieval.scoring import inner_product_queries

    return inner_product_queries(queries, 4, settings)


def test_ivf_lists_are_saved_and_reused_and_follow_additions(tmp_path):
    index, queries = clustered_index(backend="ivf", nlist=16, nprobe=3)
    before = index.search(queries, 10)
    path = index.save(tmp_path / "ivf.safetensors")
    with safe_open(path, framework="pt") as file:
        assert {"ivf.centroids", "ivf.lists"} <= set(file.keys())
        lists = file.get_tensor("ivf.lists")
    assert lists.shape == (6000,) and lists.dtype == torch.int32 and int(lists.max()) < 16
    loaded = CodeIndex.load(path, backend="ivf", nprobe=3)
    assert torch.equal(loaded.search(queries, 10).ids, before.ids)  # no k-means again: the same lists
    torch.testing.assert_close(loaded.stored_state("ivf")["centroids"], index.stored_state("ivf").get(
        "centroids", index._backend("ivf").centroids))  # fmt: skip
    loaded.add(index.codes[:5], torch.tensor([2, 3, 4, 7, 8]))  # assigned with the saved centroids
    assert loaded.search(queries[:1], 1).ids.numel() == 1
    again = CodeIndex.load(loaded.save(tmp_path / "more.safetensors"), backend="ivf", nprobe=16)
    assert again.ntotal == 6005 and again.stored_state("ivf")["lists"].shape == (6005,)
    exhaustive = CodeIndex.load(tmp_path / "more.safetensors").search(queries, 20)
    assert torch.equal(again.search(queries, 20).ids, exhaustive.ids)
    with pytest.raises(ValueError, match="built with nlist=16 lists, got nlist=8"):
        CodeIndex.load(path, backend="ivf", nlist=8)
    with pytest.raises(ValueError, match="nprobe must be an integer from 1 to nlist=16, got 17"):
        CodeIndex.load(path, backend="ivf", nprobe=17)
    plain = CodeIndex(index.codewords)
    plain.add(index.codes)
    with pytest.raises(ValueError, match="built without IVF lists .* --backend ivf --nlist N"):
        CodeIndex.load(plain.save(tmp_path / "plain.safetensors"), backend="ivf")


def test_ivf_centroids_can_come_from_embeddings():
    index, queries = clustered_index()
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(2000, 64, generator=generator)
    centroids = ivf.train_coarse_centroids(embeddings, 8, seed=1)
    assert centroids.shape == (8, 64)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    given = CodeIndex(index.codewords, backend="ivf", centroids=centroids, nprobe=8)
    given.add(index.codes, index.ids)
    assert torch.equal(given.search(queries, 10).ids, index.search(queries, 10).ids)
    with pytest.raises(ValueError, match="at least 8 training vectors"):
        ivf.train_coarse_centroids(embeddings[:5], 8)


def test_the_ivf_and_faiss_backends_refuse_what_they_cannot_score():
    with pytest.raises(ValueError, match="K=256"):
        CodeIndex(F.normalize(torch.randn(2, 16, 4), dim=-1), backend="ivf")
    with pytest.raises(ValueError, match="ivf backend scores asymmetrically only"):
        CodeIndex(
            F.normalize(torch.randn(2, 256, 4), dim=-1), settings=SearchSettings("symmetric"), backend="ivf"
        )
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        index, queries = clustered_index(count=300, backend="faiss", shards=0)
        index.search(queries, 3)


def test_faiss_shards_search_in_parallel_and_equal_one_index():
    index, queries = clustered_index()
    sharded = CodeIndex(index.codewords, backend="faiss", shards=3)
    sharded.add(index.codes[:4000], index.ids[:4000])
    sharded.search(queries[:1], 1)  # builds the shards
    sharded.add(index.codes[4000:], index.ids[4000:])  # appended to the last shard
    expected = index.search(queries, 50, backend="faiss")
    result = sharded.search(queries, 50)
    torch.testing.assert_close(result.scores, expected.scores, atol=1e-6, rtol=0)
    for scores, wanted, found in zip(expected.scores, expected.ids, result.ids):
        above = scores > scores[-1] + 1e-5  # items tied with the 50th may be cut differently
        assert set(wanted[above].tolist()) == set(found[above].tolist())


def test_on_disk_lists_are_bound_to_their_index_file(tmp_path):
    index, queries = clustered_index(backend="ivf", nlist=16, nprobe=5)
    expected = index.search(queries, 10)
    path = index.save(tmp_path / "big.safetensors")
    folder = write_ondisk_lists_of(read_index_file(path), show_progress_bar=False)
    assert folder == ivf.ondisk_folder(path) and (folder / "lists.ivfdata").stat().st_size == 6000 * (4 + 8)
    on_disk = CodeIndex.load(path, backend="ivf", nprobe=5)
    searcher = on_disk._backend("ivf")
    lists = faiss.downcast_InvertedLists(searcher.faiss_index.invlists)
    assert searcher.on_disk and type(lists).__name__ == "OnDiskInvertedLists"
    result = on_disk.search(queries, 10)
    assert torch.equal(result.ids, expected.ids)
    torch.testing.assert_close(result.scores, expected.scores)
    with pytest.raises(ValueError, match="read-only"):
        on_disk.add(index.codes[:1], torch.tensor([0]))
    in_memory = CodeIndex.load(path, backend="ivf", nprobe=5, on_disk=False)
    assert torch.equal(in_memory.search(queries, 10).ids, expected.ids)
    index.add(index.codes[:1], torch.tensor([0]))
    index.save(path)  # another file now: the lists of the old one must not be used with it
    with pytest.raises(ValueError, match="inverted lists of another index file"):
        CodeIndex.load(path, backend="ivf").search(queries, 1)
    (folder / "lists.ivfdata").unlink()
    with pytest.raises(FileNotFoundError, match="lists.ivfdata is missing"):
        CodeIndex.load(path, backend="ivf").search(queries, 1)


# the file: one unit


def test_a_streamed_write_equals_the_in_memory_one(tmp_path):
    codes = torch.randint(0, 256, (1000, 4), dtype=torch.uint8)
    whole = {"codes": TensorPlan.of(codes), "ids": TensorPlan.of(torch.arange(1000))}
    chunked = {
        "codes": TensorPlan(torch.uint8, (1000, 4), lambda: codes.split(300)),
        "ids": TensorPlan(torch.int64, (1000,), lambda: torch.arange(1000).split(7)),
    }
    first = write_index_file(tmp_path / "a.safetensors", whole, {"x": "1"})
    second = write_index_file(tmp_path / "b.safetensors", chunked, {"x": "1"})
    assert first.read_bytes() == second.read_bytes()
    file = read_index_file(second)
    assert (
        torch.equal(file.tensors["codes"], codes) and file.version == 2 and len(file.metadata["sha256"]) == 64
    )


def test_labels_paths_and_ids_are_inside_the_checksummed_file(tmp_path):
    index, _ = clustered_index(count=300)
    paths = [f"/images/{i}.png" if i % 2 else None for i in range(300)]
    sidecar = IndexSidecar.describe(model="org/model", data={"source": "x"}, ids=index.ids.tolist(),
                                    labels=[i % 3 for i in range(300)], class_names=["a", "b", "c"],
                                    paths=paths)  # fmt: skip
    path = index.save(tmp_path / "index.safetensors", sidecar=sidecar)
    assert [p.name for p in tmp_path.iterdir()] == ["index.safetensors"]  # one file
    loaded, description = CodeIndex.load_with_sidecar(path)
    assert description == sidecar and description.paths_of([6]) == ["/images/1.png"]
    with safe_open(path, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        header = file.metadata()
    edits = {
        "labels": lambda t: t["labels"].index_fill_(0, torch.tensor([0]), 2),
        "ids": lambda t: t["ids"].index_fill_(0, torch.tensor([0]), 99999),
        "paths.bytes": lambda t: t["paths.bytes"].index_fill_(0, torch.tensor([0]), ord("X")),
    }
    for name, edit in edits.items():
        changed = {key: value.clone() for key, value in tensors.items()}
        edit(changed)
        save_file(changed, tmp_path / f"edited-{name}.safetensors", metadata=header)
        with pytest.raises(IndexFormatError, match="fails its sha256 checksum"):
            CodeIndex.load(tmp_path / f"edited-{name}.safetensors")
    save_file(
        tensors, tmp_path / "renamed.safetensors", metadata={**header, "class_names": '["x", "b", "c"]'}
    )
    with pytest.raises(IndexFormatError, match="checksum"):
        CodeIndex.load(tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match="sidecar's ids are not this index's ids"):
        index.save(tmp_path / "other.safetensors", sidecar=IndexSidecar(model="m", data={}, ids=[1, 2]))
    assert json.loads(header["data"]) == {"source": "x"}


def test_an_unsupported_format_version_is_named(tmp_path):
    index, _ = clustered_index(count=10)
    path = index.save(tmp_path / "index.safetensors")
    with safe_open(path, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        header = file.metadata()
    save_file(tensors, tmp_path / "future.safetensors", metadata={**header, "format_version": "9"})
    with pytest.raises(IndexFormatError, match="format version 9, this mecoq-hf reads versions 1, 2"):
        CodeIndex.load(tmp_path / "future.safetensors")
    assert np.array_equal(CodeIndex.load(path).codes.numpy(), index.codes.numpy())


def test_search_defaults_to_ivf_for_ivf_files_and_else_the_faster_exhaustive_backend(tmp_path, monkeypatch):
    from mecoq_hf.retrieval.backends import exhaustive_backend
    from mecoq_hf.retrieval.image_index import ImageIndex

    index, queries = clustered_index(count=2000)
    flat = index.save(tmp_path / "flat.safetensors")
    lists = CodeIndex(index.codewords, backend="ivf", nlist=8)
    lists.add(index.codes, index.ids)
    with_lists = lists.save(tmp_path / "lists.safetensors")
    assert ImageIndex.load(with_lists).index.backend == "ivf"
    for threads, expected in ((1, "native"), (2, "faiss")):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert exhaustive_backend(index.codewords, index.settings) == expected
        assert ImageIndex.load(flat).index.backend == expected
    assert exhaustive_backend(index.codewords, SearchSettings("symmetric"), threads=2) == "native"
    small = F.normalize(torch.randn(4, 16, 16), dim=-1)
    assert exhaustive_backend(small, index.settings, threads=2) == "native"  # faiss needs K = 256
    loaded = ImageIndex.load(flat)
    torch.testing.assert_close(loaded.index.search(queries, 5).scores, index.search(queries, 5).scores)
