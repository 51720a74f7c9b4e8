"""Benchmark of retrieval speed: `CodeIndex` search (native torch vs faiss `IndexPQ`) and mAP (ours vs NumPy).

Everything runs in one process, side by side, on the same random data:

1. search: 1,000 queries against 1,000,000 random codes, M = 4 and 8, K = 256, D = 16, k = 100; native backend
   vs faiss `IndexPQ` holding the same codebooks and codes (`CodeIndex.to_faiss`). Also checks they agree.
2. mAP: `mean_average_precision` vs a plain per-query NumPy loop (stable argsort, then AP@K), on a size the
   loop handles in reasonable time; checks the values are equal.
3. scale: `evaluate_codes` for 10,000 queries against 1,000,000 codes (mAP@1000), to show bounded memory.
4. scale curve (`--curve-sizes`, off by default; `bench_speed.py` runs it): search time and peak memory
   against database size (e.g. 10^4 ... 10^7 random codes), native backend vs faiss `IndexPQ` on the same
   codes.
5. index scale (`--scale`, a run of its own; see `bench_index_scale`): 10^6 and 10^7 codes of clustered data,
   M = 4 and 8, the exhaustive backends (native, faiss IndexPQ) and faiss IVF at several nprobe: recall@10
   against the exhaustive top-10, ms per query (1,000 queries, 1 and 2 threads), peak memory, build time;
   and IVF against exhaustive on real encoded Fashion-MNIST (recall@10, mAP@1000). Writes
   benchmarks/results/index_scale.json and .md.

Parts 1 and 2 run once per thread count in `--threads` (torch and faiss get the same count); part 3 uses the
first. On a machine shared with other jobs torch's per-operation OpenMP regions stall when a thread is
descheduled, so one thread can be faster than two there.

Peak memory is the process's resident set size sampled every 5 ms, minus the value when the phase started
(after `malloc_trim`, so memory freed by an earlier phase does not hide a later phase's allocations).
Not a test. Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_index.py

Writes benchmarks/results/index.json and benchmarks/results/index.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import torch
import torch.nn.functional as F

from mecoq_hf import file_io
from mecoq_hf.retrieval.evaluation import evaluate_codes
from mecoq_hf.retrieval.index import CodeIndex
from mecoq_hf.retrieval.metrics import mean_average_precision
from mecoq_hf.retrieval.scoring import SearchSettings

RESULTS = Path(__file__).parent / "results"
# Raw-query ADC, what a faiss IndexPQ exported by `CodeIndex.to_faiss` computes for the same queries.
RAW_ADC = SearchSettings("asymmetric", normalize_query_subvectors=False)


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc), so the RSS baseline of the next phase is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: baselines may include memory freed by earlier phases
        pass


def timed(function, repeats: int) -> tuple[float, object, float]:
    """Best wall time over `repeats` runs, the last result, and the peak RSS growth (MiB) over all runs.

    A thread samples this process's RSS every 5 ms while `function` runs.
    """
    process, stop = psutil.Process(), threading.Event()
    release_free_memory()
    start_rss = peak_rss = process.memory_info().rss

    def sample() -> None:
        nonlocal peak_rss
        while not stop.is_set():
            peak_rss = max(peak_rss, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    best, result = float("inf"), None
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            result = function()
            best = min(best, time.perf_counter() - start)
    finally:
        stop.set()
        sampler.join()
    peak_rss = max(peak_rss, process.memory_info().rss)
    return best, result, (peak_rss - start_rss) / 2**20


def random_index_data(num_codebooks: int, num_db: int, num_queries: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codebooks = F.normalize(torch.randn(num_codebooks, 256, 16, generator=generator), dim=-1)
    codes = torch.randint(0, 256, (num_db, num_codebooks), generator=generator).to(torch.uint8)
    queries = torch.randn(num_queries, num_codebooks * 16, generator=generator)
    return codebooks, codes, queries


def set_threads(count: int) -> None:
    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)


def bench_search(num_codebooks: int, threads: int, args: argparse.Namespace) -> dict:
    codebooks, codes, queries = random_index_data(
        num_codebooks, args.database, args.queries, seed=num_codebooks
    )
    index = CodeIndex(codebooks, settings=RAW_ADC)
    index.add(codes)
    start = time.perf_counter()
    faiss_index = index.to_faiss()
    export_s = time.perf_counter() - start
    index.search(queries[:8], args.k), faiss_index.search(queries[:8].numpy(), args.k)  # warm-up
    native_s, native, native_mib = timed(lambda: index.search(queries, args.k), args.repeats)
    faiss_s, (faiss_scores, positions), faiss_mib = timed(
        lambda: faiss_index.search(queries.numpy(), args.k), args.repeats
    )
    return {
        "threads": threads,
        "M": num_codebooks,
        "K": 256,
        "D": 16,
        "database": args.database,
        "queries": args.queries,
        "k": args.k,
        "native_s": native_s,
        "faiss_s": faiss_s,
        "native_over_faiss": native_s / faiss_s,
        "native_peak_mib": native_mib,
        "faiss_peak_mib": faiss_mib,
        "faiss_export_s": export_s,
        "max_abs_score_difference": float(np.abs(native.scores.numpy() - faiss_scores).max()),
        "same_id_fraction": float((native.ids.numpy() == positions).mean()),
    }


def bench_scale_curve(
    sizes: list[int], num_queries: int, k: int, num_codebooks: int = 4, repeats: int = 2
) -> list[dict]:
    """Search time and peak RSS growth against database size, native vs faiss, on the same random codes.

    `index_mib` is the memory the codes themselves take (M bytes per item; faiss holds its own copy).
    """
    rows = []
    for size in sizes:
        codebooks, codes, queries = random_index_data(num_codebooks, size, num_queries, seed=num_codebooks)
        index = CodeIndex(codebooks, settings=RAW_ADC)
        index.add(codes)
        faiss_index = index.to_faiss()
        index.search(queries[:4], k), faiss_index.search(queries[:4].numpy(), k)  # warm-up
        native_s, _, native_mib = timed(
            lambda index=index, queries=queries: index.search(queries, k), repeats
        )
        faiss_s, _, faiss_mib = timed(
            lambda faiss_index=faiss_index, queries=queries: faiss_index.search(queries.numpy(), k), repeats
        )
        rows.append(
            {
                "threads": torch.get_num_threads(),
                "M": num_codebooks,
                "database": size,
                "queries": num_queries,
                "k": k,
                "native_s": native_s,
                "faiss_s": faiss_s,
                "native_ms_per_query": 1000 * native_s / num_queries,
                "faiss_ms_per_query": 1000 * faiss_s / num_queries,
                "native_peak_mib": native_mib,
                "faiss_peak_mib": faiss_mib,
                "index_mib": size * num_codebooks / 2**20,
            }
        )
        del index, faiss_index, codes  # free this size's codes before building the next, larger one
    return rows


def scale_curve_markdown(rows: list[dict]) -> str:
    lines = [
        (
            "| codes (M=4, 4 bytes each) | queries, k | native (s) | faiss IndexPQ (s) | native / faiss | "
            "ms per query native / faiss | peak RSS growth native / faiss (MiB) | codes (MiB) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['database']:,} | {row['queries']}, {row['k']} | {row['native_s']:.3f} | "
            f"{row['faiss_s']:.3f} | "
            f"{row['native_s'] / row['faiss_s']:.2f} | {row['native_ms_per_query']:.2f} / "
            f"{row['faiss_ms_per_query']:.2f} | {row['native_peak_mib']:.0f} / {row['faiss_peak_mib']:.0f} | "
            f"{row['index_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def numpy_map(scores: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, top_k: int) -> float:
    """The obvious loop: per query, stable argsort of -scores, relevance of the top K, AP@K (§8.1)."""
    aps = np.zeros(scores.shape[0])
    for q in range(scores.shape[0]):
        ranked = np.argsort(-scores[q], kind="stable")[:top_k]
        relevant = db_labels[ranked] == query_labels[q]
        found = relevant.sum()
        if found:
            hits = np.cumsum(relevant)
            aps[q] = (hits / np.arange(1, top_k + 1))[relevant].sum() / found
    return float(aps.mean())


def bench_map(threads: int, args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    num_queries, num_db = args.map_queries, args.map_database
    scores = torch.randn(num_queries, num_db, generator=generator)
    query_labels = torch.randint(0, 10, (num_queries,), generator=generator)
    db_labels = torch.randint(0, 10, (num_db,), generator=generator)
    rows = []
    for top_k in (args.map_top_k, None):
        depth = top_k or num_db
        ours_s, ours, ours_mib = timed(
            lambda top_k=top_k: mean_average_precision(scores, query_labels, db_labels, top_k), 2
        )
        loop_s, loop, loop_mib = timed(
            lambda depth=depth: numpy_map(scores.numpy(), query_labels.numpy(), db_labels.numpy(), depth), 1
        )
        rows.append(
            {
                "threads": threads,
                "queries": num_queries,
                "database": num_db,
                "top_k": top_k,
                "ours_s": ours_s,
                "numpy_loop_s": loop_s,
                "speedup": loop_s / ours_s,
                "ours_peak_mib": ours_mib,
                "numpy_peak_mib": loop_mib,
                "map": ours,
                "abs_difference": abs(ours - loop),
            }
        )
    return rows


def bench_scale(args: argparse.Namespace) -> dict:
    codebooks, codes, queries = random_index_data(4, args.database, args.scale_queries, seed=4)
    db_labels = torch.arange(args.database) % 10
    query_labels = torch.arange(args.scale_queries) % 10
    seconds, value, peak = timed(
        lambda: evaluate_codes(queries, codes, codebooks, query_labels, db_labels, 1000, settings=RAW_ADC), 1
    )
    return {
        "threads": torch.get_num_threads(),
        "M": 4,
        "queries": args.scale_queries,
        "database": args.database,
        "top_k": 1000,
        "seconds": seconds,
        "peak_mib": peak,
        "map": value,
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "load_average_at_start": os.getloadavg(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def markdown(results: dict) -> str:
    lines = [
        (
            "| search, k=100 | threads | queries x database | native (s) | faiss IndexPQ (s) | "
            "native / faiss | peak RSS native / faiss (MiB) | max abs score diff | same ids |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["search"]:
        lines.append(
            f"| M={row['M']}, K=256, D=16 | {row['threads']} | {row['queries']:,} x {row['database']:,} | "
            f"{row['native_s']:.2f} | {row['faiss_s']:.2f} | "
            f"{row['native_over_faiss']:.2f} | {row['native_peak_mib']:.0f} / {row['faiss_peak_mib']:.0f} | "
            f"{row['max_abs_score_difference']:.1e} | {row['same_id_fraction']:.4f} |"
        )
    lines += [
        "",
        (
            "| mAP | threads | queries x database | ours (s) | NumPy loop (s) | speed-up | "
            "peak RSS ours / loop (MiB) | abs diff |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["map"]:
        lines.append(
            f"| mAP@{row['top_k'] or 'all'} | {row['threads']} | {row['queries']:,} x {row['database']:,} | "
            f"{row['ours_s']:.2f} | "
            f"{row['numpy_loop_s']:.2f} | {row['speedup']:.1f}x | {row['ours_peak_mib']:.0f} / "
            f"{row['numpy_peak_mib']:.0f} | {row['abs_difference']:.1e} |"
        )
    if results.get("scale"):
        row = results["scale"]
        lines += [
            "",
            "| evaluate_codes (asymmetric, M=4) | threads | seconds | peak RSS (MiB) | mAP |",
            "|---|---|---|---|---|",
            (
                f"| mAP@1000, {row['queries']:,} queries x {row['database']:,} codes | {row['threads']} | "
                f"{row['seconds']:.0f} | {row['peak_mib']:.0f} | {row['map']:.4f} |"
            ),
        ]
    if results.get("scale_curve"):
        lines += ["", scale_curve_markdown(results["scale_curve"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


# part 5: index scale


SCALE_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CLUSTER_SPREAD = 0.8  # per-dimension std of an item around its cluster centre (centres ~ N(0, 1))


class ClusteredData:
    """Codes of synthetic clustered embeddings, as a model's database looks: N / 1,000 Gaussian clusters in
    d = 16 M dimensions, each item its centre plus N(0, 0.8^2) noise per dimension, hard-coded (argmax inner
    product, as `ProductQuantizer.encode`) with unit-norm codebooks trained by faiss PQ on 65,536 items.
    Queries are fresh draws from the same mixture (never in the database). Generated in chunks: only the
    codes are kept (N x M bytes)."""

    def __init__(self, num_codes: int, num_codebooks: int, seed: int, num_queries: int = 1000) -> None:
        from mecoq_hf.models.mecoq.quantization import hard_codes
        from mecoq_hf.retrieval.faiss_interop import pq_centroids

        dim = 16 * num_codebooks
        self.generator = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(max(1000, num_codes // 1000), dim, generator=self.generator)
        product_quantizer = faiss.ProductQuantizer(dim, num_codebooks, 8)
        product_quantizer.train(np.ascontiguousarray(self.draw(65536).numpy()))
        self.codebooks = F.normalize(pq_centroids(product_quantizer), dim=-1)  # (M, 256, 16)
        parts = []
        for start in range(0, num_codes, 1 << 16):  # (65,536, M, 256) float scores at a time
            parts.append(hard_codes(self.draw(min(1 << 16, num_codes - start)), self.codebooks))
        self.codes = torch.cat(parts)  # (N, M) uint8
        self.queries = self.draw(num_queries)  # (Q, d)

    def draw(self, count: int) -> torch.Tensor:
        members = torch.randint(0, self.centers.shape[0], (count,), generator=self.generator)
        noise = torch.randn(count, self.centers.shape[1], generator=self.generator)
        return self.centers[members] + CLUSTER_SPREAD * noise


def recall_at_10(reference, found, tolerance: float = 1e-5) -> float:
    """Tie-aware recall@10 of `found` against the exhaustive `reference` (both `SearchResult`s): the mean
    fraction of the 10 returned items that belong to *a* true top-10, i.e. score at least the true 10th
    score. With many equal codes (M = 4) dozens of items tie for 10th place; any of them is correct, while
    id overlap would count the exhaustive scan's tie choice (`id_recall_at_10`)."""
    threshold = reference.scores[:, 9:10] - tolerance  # (Q, 1)
    correct = (found.scores[:, :10] >= threshold) & (found.ids[:, :10] >= 0)
    return float(correct.float().mean())


def id_recall_at_10(reference: torch.Tensor, found: torch.Tensor) -> float:
    """Mean fraction of each query's reference top-10 ids found in its top-10 (ties count as misses)."""
    return float((reference[:, :10, None] == found[:, None, :10]).any(-1).float().mean())


def search_rows(backend_name, searcher, queries, reference, threads, repeats, base) -> list[dict]:
    """One row per thread count: recall@10 against `reference`, ms per query, absolute peak RSS."""
    rows = []
    for count in threads:
        set_threads(count)
        searcher(queries[:8])  # warm-up
        seconds, result, peak = rss_peak_during(lambda: searcher(queries), repeats)
        rows.append(
            {
                **base,
                "backend": backend_name,
                "threads": count,
                "recall_at_10": recall_at_10(reference, result),
                "id_recall_at_10": id_recall_at_10(reference.ids, result.ids),
                "ms_per_query": 1000 * seconds / queries.shape[0],
                "peak_rss_mib": peak,
            }
        )
    return rows


def rss_peak_during(function, repeats: int = 1) -> tuple[float, object, float]:
    """(best seconds, result, absolute peak RSS of the process in MiB) of `repeats` calls."""
    release_free_memory()
    before = psutil.Process().memory_info().rss / 2**20
    seconds, result, growth = timed(function, repeats)
    return seconds, result, before + growth


def scale_nprobes(args: argparse.Namespace) -> list[int]:
    return [int(p) for p in args.scale_nprobes.split(",")] if args.scale_nprobes else list(SCALE_NPROBES)


def bench_index_scale(num_codes: int, num_codebooks: int, args: argparse.Namespace) -> list[dict]:
    """The rows of one database: native and faiss exhaustive, then IVF (default nlist) at every nprobe."""
    from mecoq_hf.retrieval.backends import FaissIVF
    from mecoq_hf.retrieval.ivf import default_nlist

    start = time.perf_counter()
    data = ClusteredData(num_codes, num_codebooks, seed=num_codebooks * 1000 + num_codes % 997)
    generated_s = time.perf_counter() - start
    threads = [int(count) for count in args.threads.split(",")]
    repeats = 1 if num_codes >= 5_000_000 else args.repeats
    index = CodeIndex(data.codebooks)  # scored as MeCoQConfig's defaults (unit query sub-vectors)
    index.add(data.codes)
    queries, k = data.queries, 10
    set_threads(max(threads))
    reference = index.search(queries, k)  # the exhaustive ADC top-10 (ties to the earlier item)
    base = {
        "num_codes": num_codes,
        "M": num_codebooks,
        "nlist": None,
        "nprobe": None,
        "k": k,
        "queries": queries.shape[0],
        "generate_s": generated_s,
        "rss_with_codes_mib": psutil.Process().memory_info().rss / 2**20,
    }
    rows = search_rows(
        "native", lambda q: index.search(q, k), queries, reference, threads, repeats, {**base, "build_s": 0.0}
    )
    release_free_memory()
    build_s, _, build_peak = rss_peak_during(lambda: index._backend("faiss"))
    pq_base = {**base, "build_s": build_s, "build_peak_rss_mib": build_peak}
    rows += search_rows(
        "faiss-pq",
        lambda q: index.search(q, k, backend="faiss"),
        queries,
        reference,
        threads,
        repeats,
        pq_base,
    )
    del index._backends["faiss"]
    release_free_memory()
    nlist = args.scale_nlist or default_nlist(num_codes)
    before = psutil.Process().memory_info().rss / 2**20
    build_s, searcher, build_peak = rss_peak_during(lambda: FaissIVF(index, nlist=nlist))
    index._backends["ivf"] = searcher
    for nprobe in [p for p in scale_nprobes(args) if p <= nlist]:
        searcher.set_nprobe(nprobe)
        ivf_base = {
            **base,
            "nlist": nlist,
            "nprobe": nprobe,
            "build_s": build_s,
            "build_threads": max(threads),
            "build_peak_rss_mib": build_peak,
            "build_rss_before_mib": before,
        }
        rows += search_rows(
            "faiss-ivf",
            lambda q: index.search(q, k, backend="ivf"),
            queries,
            reference,
            threads,
            repeats,
            ivf_base,
        )
    return rows


def fashion_mnist_ivf(args: argparse.Namespace) -> dict:
    """IVF against exhaustive on real codes: 60,000 Fashion-MNIST train images indexed, the 10,000 test
    images as queries (recall@10 against the exhaustive top-10, mAP@1000 by class)."""
    from safetensors.torch import load_file

    from mecoq_hf.hub import load_model
    from mecoq_hf.retrieval.ivf import default_nlist

    model = load_model(args.fmnist_model)
    database, queries = load_file(args.fmnist_database), load_file(args.fmnist_queries)
    index = CodeIndex.from_model(model)
    index.add(database["codes"], database["ids"])
    assert torch.equal(database["ids"], torch.arange(database["ids"].numel()))  # positions are ids
    query_embeddings, query_labels, db_labels = queries["embeddings"], queries["labels"], database["labels"]
    set_threads(1)
    top_k = 1000
    start = time.perf_counter()
    exhaustive = index.search(query_embeddings, top_k)
    exhaustive_s = time.perf_counter() - start
    reference_map = evaluate_codes(
        query_embeddings,
        database["codes"],
        model.normalized_codebooks(),
        query_labels,
        db_labels,
        top_k,
        settings=index.settings,
    )
    rows = [
        {
            "backend": "native",
            "nprobe": None,
            "recall_at_10": 1.0,
            "map_at_1000": ranked_map(exhaustive.ids, query_labels, db_labels),
            "ms_per_query": 1000 * exhaustive_s / query_embeddings.shape[0],
        }
    ]
    nlist = default_nlist(index.ntotal)
    build_s, searcher, _ = timed(lambda: _ivf(index, nlist), 1)
    for nprobe in [p for p in SCALE_NPROBES if p <= nlist]:
        searcher.set_nprobe(nprobe)
        start = time.perf_counter()
        found = index.search(query_embeddings, top_k, backend="ivf")
        seconds = time.perf_counter() - start
        rows.append(
            {
                "backend": "faiss-ivf",
                "nlist": nlist,
                "nprobe": nprobe,
                "recall_at_10": recall_at_10(exhaustive, found),
                "id_recall_at_10": id_recall_at_10(exhaustive.ids, found.ids),
                "map_at_1000": ranked_map(found.ids, query_labels, db_labels),
                "ms_per_query": 1000 * seconds / query_embeddings.shape[0],
            }
        )
    return {
        "num_codes": index.ntotal,
        "queries": query_embeddings.shape[0],
        "M": index.num_codebooks,
        "threads": 1,
        "ivf_build_s": build_s,
        "evaluate_codes_map_at_1000": reference_map,
        "rows": rows,
        "model": str(args.fmnist_model),
    }


def _ivf(index: CodeIndex, nlist: int):
    from mecoq_hf.retrieval.backends import FaissIVF

    index._backends["ivf"] = FaissIVF(index, nlist=nlist)
    return index._backends["ivf"]


def ranked_map(ids: torch.Tensor, query_labels: torch.Tensor, db_labels: torch.Tensor) -> float:
    """mAP@K of ranked (Q, K) result ids (positions; -1 = none), as `metrics.mean_average_precision` defines
    it: AP@K divides by the relevant items inside the top K, 0 when there are none."""
    found = ids >= 0
    relevant = (db_labels[ids.clamp(min=0)] == query_labels[:, None]) & found  # (Q, K)
    hits = relevant.cumsum(dim=1, dtype=torch.float64)
    ranks = torch.arange(1, ids.shape[1] + 1, dtype=torch.float64)
    precision_sum = ((hits / ranks) * relevant).sum(dim=1)
    count = relevant.sum(dim=1)
    return float(torch.where(count > 0, precision_sum / count.clamp(min=1), 0.0).mean())


def scale_markdown(results: dict) -> str:
    lines = [
        "| codes | M | backend | nlist | nprobe | threads | recall@10 | ms / query | "
        "vs fastest exhaustive | peak RSS (MiB) | build (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = results["results"]
    for row in rows:
        same = [
            r
            for r in rows
            if r["num_codes"] == row["num_codes"]
            and r["M"] == row["M"]
            and r["threads"] == row["threads"]
            and r["nprobe"] is None
        ]
        fastest = min(r["ms_per_query"] for r in same)
        lines.append(
            f"| {row['num_codes']:,} | {row['M']} | {row['backend']} | {row['nlist'] or '-'} | "
            f"{row['nprobe'] or '-'} | {row['threads']} | {row['recall_at_10']:.4f} | "
            f"{row['ms_per_query']:.3f} | "
            f"{fastest / row['ms_per_query']:.1f}x | {row['peak_rss_mib']:.0f} | {row['build_s']:.1f} |"
        )
    fmnist = results.get("fashion_mnist")
    if fmnist:
        title = (
            f"Fashion-MNIST: {fmnist['num_codes']:,} codes (M = {fmnist['M']}), {fmnist['queries']:,} "
            f"test queries, 1 thread; IVF build {fmnist['ivf_build_s']:.1f} s"
        )
        header = "| backend | nlist | nprobe | recall@10 | mAP@1000 | ms / query |"
        lines += ["", title, "", header, "|---|---|---|---|---|---|"]
        for row in fmnist["rows"]:
            lines.append(
                f"| {row['backend']} | {row.get('nlist') or '-'} | {row['nprobe'] or '-'} | "
                f"{row['recall_at_10']:.4f} | {row['map_at_1000']:.4f} | "
                f"{row['ms_per_query']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main_scale(args: argparse.Namespace) -> None:
    import subprocess

    def uptime() -> str:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    command = "OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_index.py --scale ..."
    results = {
        "machine": machine(),
        "uptime_at_start": uptime(),
        "command": command,
        "process_rss_at_start_mib": psutil.Process().memory_info().rss / 2**20,
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "data": ClusteredData.__doc__.split(".")[0],
        "results": [],
    }
    sizes = [int(float(size)) for size in args.scale_sizes.split(",")]
    for num_codes in sizes:
        for num_codebooks in [int(m) for m in args.scale_codebooks.split(",")]:
            results["results"] += bench_index_scale(num_codes, num_codebooks, args)
            print(scale_markdown(results), flush=True)
            release_free_memory()
    if args.fmnist_model:
        results["fashion_mnist"] = fashion_mnist_ivf(args)
    results["uptime_at_end"] = uptime()
    results["machine"]["load_average_at_end"] = os.getloadavg()
    output = args.scale_output
    output.parent.mkdir(parents=True, exist_ok=True)
    file_io.write_json(output, results)
    table = scale_markdown(results)
    file_io.write_text(output.with_suffix(".md"), table)
    print(scale_markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--map-queries", type=int, default=1_000)
    parser.add_argument("--map-database", type=int, default=20_000)
    parser.add_argument("--map-top-k", type=int, default=1_000)
    parser.add_argument("--scale-queries", type=int, default=10_000, help="0 skips the scale run")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts for parts 1 and 2")
    parser.add_argument(
        "--curve-sizes",
        default="",
        help="comma-separated database sizes for part 4, e.g. 10000,100000,1000000,10000000 (empty: skip)",
    )
    parser.add_argument("--curve-queries", type=int, default=100)
    parser.add_argument("--output", type=Path, default=RESULTS / "index.json")
    parser.add_argument("--scale", action="store_true", help="run part 5 (index scale) only")
    parser.add_argument("--scale-sizes", default="1e6,1e7", help="database sizes of part 5")
    parser.add_argument("--scale-codebooks", default="4,8", help="part 5: the M values (codebooks)")
    parser.add_argument("--scale-nprobes", default="", help="part 5: nprobe values (default 1, 2, ..., 256)")
    parser.add_argument("--scale-nlist", type=int, default=None, help="part 5: nlist (default sqrt(N))")
    parser.add_argument("--scale-output", type=Path, default=RESULTS / "index_scale.json")
    parser.add_argument(
        "--fmnist-model", type=Path, help="part 5: a model folder (mecoq train) for Fashion-MNIST"
    )
    parser.add_argument(
        "--fmnist-database", type=Path, help="part 5: `mecoq encode` of the 60,000 train images"
    )
    parser.add_argument(
        "--fmnist-queries", type=Path, help="part 5: `mecoq encode --embeddings` of the test images"
    )
    args = parser.parse_args()
    if args.scale:
        main_scale(args)
        return

    thread_counts = [int(count) for count in args.threads.split(",")]
    results = {
        "machine": machine(),
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/bench_index.py",
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "search": [],
        "map": [],
    }
    for threads in thread_counts:
        set_threads(threads)
        results["search"] += [bench_search(m, threads, args) for m in (4, 8)]
        results["map"] += bench_map(threads, args)
    set_threads(thread_counts[0])
    results["scale"] = bench_scale(args) if args.scale_queries else None
    if args.curve_sizes:
        sizes = [int(float(size)) for size in args.curve_sizes.split(",")]
        results["scale_curve"] = bench_scale_curve(sizes, args.curve_queries, args.k)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    table = markdown(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    file_io.write_json(args.output, results)
    file_io.write_text(args.output.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
