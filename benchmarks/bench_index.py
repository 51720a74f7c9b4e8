"""Benchmark of retrieval speed: `CodeIndex` search (native torch vs faiss `IndexPQ`) and mAP (ours vs NumPy).

Everything runs in one process, side by side, on the same random data:

1. search: 1,000 queries against 1,000,000 random codes, M = 4 and 8, K = 256, D = 16, k = 100; native backend
   vs faiss `IndexPQ` holding the same codebooks and codes (`CodeIndex.to_faiss`). Also checks they agree.
2. mAP: `mean_average_precision` vs a plain per-query NumPy loop (stable argsort, then AP@K), on a size the
   loop handles in reasonable time; checks the values are equal.
3. scale: `evaluate_codes` for 10,000 queries against 1,000,000 codes (mAP@1000), to show bounded memory.
4. scale curve (`--curve-sizes`, off by default; `bench_speed.py` runs it): search time and peak memory against
   database size (e.g. 10^4 ... 10^7 random codes), native backend vs faiss `IndexPQ` on the same codes.

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
import json
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
        rows.append({
            "threads": torch.get_num_threads(), "M": num_codebooks, "database": size, "queries": num_queries, "k": k,
            "native_s": native_s, "faiss_s": faiss_s, "native_ms_per_query": 1000 * native_s / num_queries,
            "faiss_ms_per_query": 1000 * faiss_s / num_queries, "native_peak_mib": native_mib,
            "faiss_peak_mib": faiss_mib, "index_mib": size * num_codebooks / 2**20,
        })  # fmt: skip
        del index, faiss_index, codes  # free this size's codes before building the next, larger one
    return rows


def scale_curve_markdown(rows: list[dict]) -> str:
    lines = [("| codes (M=4, 4 bytes each) | queries, k | native (s) | faiss IndexPQ (s) | native / faiss | "
              "ms per query native / faiss | peak RSS growth native / faiss (MiB) | codes (MiB) |"),
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['database']:,} | {row['queries']}, {row['k']} | {row['native_s']:.3f} | {row['faiss_s']:.3f} | "
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
            "| search, k=100 | threads | queries x database | native (s) | faiss IndexPQ (s) | native / faiss | "
            "peak RSS native / faiss (MiB) | max abs score diff | same ids |"
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
    args = parser.parse_args()

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
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
