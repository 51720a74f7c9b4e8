"""Does the code memory's size have to grow with the number of processes? Validation mAP of 1 and 2 processes.

Under DDP the memory is filled with the soft codes of every process (docs/method.md §5): a step enqueues
world_size x batch codes per view, so the reference's 384 entries, three blocks of 128 on one process, hold
only 1.5 blocks of the gathered 256 on two. This runs the frozen-head MeCoQ of `bench_quality.py` (`paper`,
32 bits, cached views) on `bench_quality.Protocol.quick()`'s data (10,000-image database, 2,000 training
images, 4 views) with the same global batch of 256 images:

- 1 process x 256 images and 2 processes x 128 images (the real 2-process CPU run of `accelerate launch`);
- memory_size 384 (the reference's) and 768 (384 x world size: the reference's three gathered blocks);
- seeds 0, 1, 2; 30 epochs, patience 10, memory from epoch 3.

Only the validation split is scored (the best validation mAP@1000 of each run); nothing is chosen on queries.
Run from the repository root (about 30 minutes on 2 shared cores):

    PYTHONPATH=src .venv/bin/python benchmarks/memory_world_size.py

Writes benchmarks/results/memory_world_size.json and .md. Finished runs are kept in the results file and
skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_quality as bench

OUTPUT = bench.RESULTS / "memory_world_size.json"
GLOBAL_BATCH = 256
CONFIGS = [(1, 384), (1, 768), (2, 384), (2, 768)]  # (processes, memory_size)
SEEDS = (0, 1, 2)
EPOCHS = 30
logger = logging.getLogger("memory_world_size")


def protocol() -> bench.Protocol:
    small = bench.Protocol.quick()
    small.training = {**small.training, "num_epochs": EPOCHS, "patience": 10}
    return small


def run_worker(processes: int, memory_size: int, seed: int, output: Path) -> None:
    """One training run (inside `accelerate launch` when processes > 1); every rank writes its result."""
    from mecoq_hf.training import build_accelerator, train

    warnings.simplefilter("ignore")
    small = protocol()
    bench.set_threads(1)
    splits = bench.load_splits(small)
    config = bench.mecoq_config("paper", 32, small, {**small.mecoq["paper"], "memory_size": memory_size})
    folder = bench.CACHE / "runs" / f"world-{processes}-memory-{memory_size}-seed-{seed}"
    args = bench.training_arguments(folder, small, {"seed": seed, "batch_size": GLOBAL_BATCH // processes})
    accelerator = build_accelerator(args)
    started = time.perf_counter()
    result = train(config, args, splits["train"], splits["validation"], splits["database"], accelerator)
    record = {"processes": accelerator.num_processes, "memory_size": memory_size, "seed": seed,
              "batch_per_process": args.batch_size, "validation_map": round(result.best_metric, 5),
              "best_epoch": result.best_epoch, "epochs_run": len(result.history),
              "memory_filled": result.model.memory.num_filled,
              "train_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    if accelerator.is_main_process:
        output.write_text(json.dumps(record))
    shutil.rmtree(folder, ignore_errors=True)


def launch(processes: int, memory_size: int, seed: int) -> dict:
    """Run one configuration in a fresh process (two under `accelerate launch`) and read its record."""
    output = bench.CACHE / f"world-size-{processes}-{memory_size}-{seed}.json"
    output.unlink(missing_ok=True)
    worker = [
        str(Path(__file__).resolve()),
        "--worker",
        str(processes),
        str(memory_size),
        str(seed),
        str(output),
    ]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        command = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
                   "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                   *worker]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # build_accelerator joins CPU processes over gloo by itself
    subprocess.run(command, check=True, env=env)
    return json.loads(output.read_text())


def summary(runs: list[dict]) -> list[dict]:
    rows = []
    for processes, memory_size in CONFIGS:
        values = [
            r["validation_map"]
            for r in runs
            if (r["processes"], r["memory_size"]) == (processes, memory_size)
        ]
        if values:
            rows.append({"processes": processes, "memory_size": memory_size, "seeds": len(values),
                         "validation_mean": round(float(np.mean(values)), 5), "min": min(values),
                         "max": max(values)})  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| processes x batch | memory_size | seeds | validation mAP@1000 (mean) | range |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['processes']} x {GLOBAL_BATCH // r['processes']} | {r['memory_size']} | {r['seeds']} | "
              f"{r['validation_mean']:.4f} | {r['min']:.4f}-{r['max']:.4f} |" for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        processes, memory_size, seed, output = sys.argv[2:6]
        run_worker(int(processes), int(memory_size), int(seed), Path(output))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bench.quiet_libraries()
    small = protocol()
    bench.extract_features(bench.load_splits(small), small)  # the shared cache, before the runs read it
    runs = json.loads(OUTPUT.read_text())["runs"] if OUTPUT.is_file() else []
    done = {(r["processes"], r["memory_size"], r["seed"]) for r in runs}
    for seed in [int(s) for s in args.seeds.split(",")]:
        bench.extract_features(bench.load_splits(small), small, view_seeds=(seed,))
        for processes, memory_size in CONFIGS:
            if (processes, memory_size, seed) in done:
                continue
            record = launch(processes, memory_size, seed)
            logger.info("%d process(es), memory %d, seed %d: validation mAP %.4f (%s s)", processes,
                        memory_size, seed, record["validation_map"], record["train_seconds"])  # fmt: skip
            runs.append(record)
            described = f"Protocol.quick() data, paper, 32 bits, global batch {GLOBAL_BATCH}, {EPOCHS} epochs"
            bench.write_json({"protocol": described, "runs": runs, "summary": summary(runs)}, OUTPUT)
    table = markdown(summary(runs))
    bench.file_io.write_text(OUTPUT.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
