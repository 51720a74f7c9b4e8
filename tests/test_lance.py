"""The Lance export (lance_export.py, `mecoq index export-lance`): a Lance dataset whose IVF_PQ index, built
from our codebooks (metric dot), ranks as `CodeIndex` does. Skipped where pylance is not installed."""

from __future__ import annotations

import pytest
import torch

from mecoq_hf import cli
from mecoq_hf.models.mecoq.quantization import ProductQuantizer
from mecoq_hf.retrieval.image_index import ImageIndex
from mecoq_hf.retrieval.index import CodeIndex
from mecoq_hf.retrieval.lance_export import export_lance
from mecoq_hf.retrieval.scoring import SearchSettings, inner_product_queries
from mecoq_hf.retrieval.sidecar import IndexSidecar

lance = pytest.importorskip("lance")


def described_index(tmp_path, normalize: bool, **options):
    generator = torch.Generator().manual_seed(0)
    quantizer = ProductQuantizer(dim=64, num_codebooks=4, codebook_size=256)
    centers = torch.randn(30, 64, generator=generator)
    embeddings = centers[torch.randint(0, 30, (3000,), generator=generator)]
    embeddings = embeddings + 0.7 * torch.randn(3000, 64, generator=generator)
    settings = SearchSettings(normalize_query_subvectors=normalize)
    index = CodeIndex(quantizer.normalized_codebooks(), settings=settings, **options)
    index.add_embeddings(embeddings, ids=torch.arange(3000) * 2 + 10)
    names, paths = [f"c{i}" for i in range(7)], [f"/data/{i}.png" for i in range(3000)]
    labels = [i % 7 for i in range(3000)]
    sidecar = IndexSidecar.describe(model="org/model", data={"source": "synthetic"}, ids=index.ids.tolist(),
                                    labels=labels, class_names=names, paths=paths)  # fmt: skip
    path = ImageIndex(index, sidecar).save(tmp_path / "index.safetensors")
    queries = torch.randn(8, 64, generator=generator) + centers[:8]
    return index, path, queries


def lance_top_k(dataset, queries, k, nprobes):
    found = []
    for query in queries.numpy():
        table = dataset.to_table(nearest={"column": "vector", "q": query, "k": k, "nprobes": nprobes},
                                 columns=["id", "label", "path", "_distance"])  # fmt: skip
        found.append((table["id"].to_pylist(), table["_distance"].to_pylist(), table["label"].to_pylist(),
                      table["path"].to_pylist()))  # fmt: skip
    return found


def assert_same_ranking(ids, scores, expected_ids, expected_scores, tolerance=1e-4):
    """Lance's scores (1 - its dot "distance") equal ours; ids equal at every rank not tied with another,
    and as sets above the last score (Lance orders ties its own way)."""
    torch.testing.assert_close(scores, expected_scores, atol=tolerance, rtol=0)
    tied = (expected_scores[:, None] - expected_scores[None, :]).abs().lt(tolerance).sum(1) > 1
    assert [item for item, t in zip(ids, tied) if not t] == expected_ids[~tied].tolist()
    inside = expected_scores > expected_scores[-1] + tolerance
    assert {item for item, keep in zip(ids, inside) if keep} == set(expected_ids[inside].tolist())


@pytest.mark.parametrize("normalize", [False, True])
def test_the_lance_export_ranks_as_the_code_index(tmp_path, normalize):
    index, path, queries = described_index(tmp_path, normalize)
    dataset = export_lance(path, tmp_path / "index.lance")
    assert dataset.count_rows() == 3000
    assert dataset.schema.metadata[b"mecoq.normalize_query_subvectors"] == str(normalize).lower().encode()
    expected = index.search(queries, 50)
    lookup = inner_product_queries(queries, 4, index.settings)
    for row, (ids, distances, labels, paths) in enumerate(lance_top_k(dataset, lookup, 50, 1)):
        assert_same_ranking(ids, 1 - torch.tensor(distances), expected.ids[row], expected.scores[row])
        assert labels == [(item - 10) // 2 % 7 for item in ids]
        assert paths == [f"/data/{(item - 10) // 2}.png" for item in ids]
    with pytest.raises(ValueError, match="--overwrite"):
        export_lance(path, tmp_path / "index.lance")


def test_an_ivf_index_exports_its_own_partitions(tmp_path, capsys):
    index, path, queries = described_index(tmp_path, True, backend="ivf", nlist=8, nprobe=8)
    status = cli.main(["index", "export-lance", str(path), "--output", str(tmp_path / "ivf.lance")])
    assert status == 0 and "3000 rows with an IVF_PQ index (metric dot)" in capsys.readouterr().out
    dataset = lance.dataset(str(tmp_path / "ivf.lance"))
    stats = dataset.stats.index_stats(dataset.list_indices()[0]["name"])
    assert stats["indices"][0]["num_partitions"] == 8
    expected = index.search(queries, 20)  # every list probed: the exhaustive result
    lookup = inner_product_queries(queries, 4, index.settings)
    for row, (ids, distances, _, _) in enumerate(lance_top_k(dataset, lookup, 20, 8)):
        assert_same_ranking(ids, 1 - torch.tensor(distances), expected.ids[row], expected.scores[row])
    assert cli.main(["index", "export-lance", str(path), "--output", str(tmp_path / "ivf.lance")]) == 2
    assert "--overwrite" in capsys.readouterr().err
