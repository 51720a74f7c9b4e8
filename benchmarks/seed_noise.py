"""Run-to-run spread of the Fashion-MNIST benchmark at 32 bits: the same protocol with other training seeds.

The splits stay those of the protocol (seed 0). Only the training seed changes: for MeCoQ the head's
initialisation, the cached augmented views (drawn with the seed; computed once per seed into the feature
cache) and the order and pairing of views; for the baselines the hyperplanes (LSH), the initial rotation
(ITQ) and the k-means seeds (PQ, OPQ). Nothing is selected here: the spread tells which differences in
BENCHMARKS.md are larger than the noise. Run from the repository root after bench_quality.py:

    PYTHONPATH=src .venv/bin/python benchmarks/seed_noise.py [--seeds 1,2]

Writes benchmarks/results/seed_noise.json (seed 0 rows are copied from fashion_mnist.json). The protocol's
own decision rows (`bench_quality.py`) now run with seeds 0, 1 and 2 at 32 bits as well; this script remains
for the baselines' spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import bench_quality as bench

from mecoq_hf.retrieval.baselines import make_baseline
from mecoq_hf.retrieval.evaluation import mean_average_precision

BITS = 32
RUNS = [  # (label, preset, overrides)
    ("mecoq-paper", "paper", {}),
    ("mecoq-paper no-memory", "paper", {"memory_start_epoch": None}),
    ("mecoq-official", "official", {}),
]
OUTPUT = bench.RESULTS / "seed_noise.json"
logger = logging.getLogger("seed_noise")


def baseline_rows(features: dict, seed: int, protocol: bench.Protocol) -> list[dict]:
    query, database = features["query"], features["database"]
    rows = []
    for name in bench.BASELINE_NAMES:
        method = make_baseline(name, BITS, seed=seed).fit(features["train"])
        scores = method.scores(query.outputs, method.encode(database.outputs))
        value = mean_average_precision(scores, query.labels, database.labels, protocol.top_k)
        rows.append({"method": name, "bits": BITS, "seed": seed, "map_at_1000": round(value, 5)})
    return rows


def mecoq_rows(splits: dict, features: dict, seed: int, protocol: bench.Protocol) -> list[dict]:
    rows = []
    for label, preset, overrides in RUNS:
        model, info = bench.train_mecoq(
            f"noise-{preset}-{seed}", preset, BITS, splits, protocol, {**overrides, "seed": seed}
        )
        scores, _ = bench.mecoq_scores(model, features)
        value = mean_average_precision(
            scores, features["query"].labels, features["database"].labels, protocol.top_k
        )
        rows.append(
            {
                "method": label,
                "bits": BITS,
                "seed": seed,
                "map_at_1000": round(value, 5),
                "validation_map": info["validation_map"],
                "best_epoch": info["best_epoch"],
            }
        )
        logger.info("%s seed %d: mAP %.4f (validation %.4f)", label, seed, value, info["validation_map"])
    return rows


def seed_zero_rows() -> list[dict]:
    """The main run's rows (seed 0) for the same methods at 32 bits."""
    names = set(bench.BASELINE_NAMES) | {label for label, _, _ in RUNS}
    report = json.loads((bench.RESULTS / "fashion_mnist.json").read_text())
    return [
        {k: r[k] for k in ("method", "bits", "seed", "map_at_1000") if k in r}
        | ({"validation_map": r["validation_map"]} if "validation_map" in r else {})
        for r in report["results"]
        if r["bits"] == BITS and r["method"] in names
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bench.quiet_libraries()
    protocol = bench.Protocol()
    bench.set_threads(protocol.threads)
    started = time.perf_counter()
    splits = bench.load_splits(protocol)
    features, _ = bench.extract_features(splits, protocol)
    rows = seed_zero_rows()
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows += baseline_rows(features, seed, protocol) + mecoq_rows(splits, features, seed, protocol)
        bench.write_json({"bits": BITS, "rows": rows}, OUTPUT)
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        values = [r["map_at_1000"] for r in rows if r["method"] == method]
        summary[method] = {
            "mean": round(sum(values) / len(values), 5),
            "min": min(values),
            "max": max(values),
            "seeds": len(values),
        }
        print(
            f"{method:24s} mean {summary[method]['mean']:.4f}  "
            f"range {min(values):.4f}-{max(values):.4f}  ({len(values)} seeds)"
        )
    bench.write_json(
        {"bits": BITS, "rows": rows, "summary": summary, "seconds": round(time.perf_counter() - started)},
        OUTPUT,
    )


if __name__ == "__main__":
    main()
