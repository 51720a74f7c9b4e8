"""`mecoq evaluate`: mAP@K of a model folder on its recorded splits, next to the PQ baseline."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .common import (
    DATA_FLAGS,
    _accelerator,
    _data_options,
    _finish,
    _given,
    _run_options,
    _say,
    _split_options,
    _subparser,
)

if TYPE_CHECKING:
    from ..models.mecoq.configuration_mecoq import MeCoQConfig
    from ..training import EvaluationReport


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..models.loading import load_model
    from ..training import RunFolder, evaluate_run

    model = load_model(args.model)
    run = RunFolder(args.model)
    accelerator = _accelerator()
    overrides = _given(args, DATA_FLAGS)
    if overrides and run.recorded_splits() is not None:
        _say(
            accelerator, "Note: split options given; the splits differ from the ones recorded with the model."
        )
    definition, splits = run.evaluation_splits(overrides, accelerator)
    if args.baseline == "pq" and model.config.backbone_trainable != "frozen":
        _say(accelerator, f"PQ baseline: loading the pretrained backbone ({model.config.backbone_weights}).")
    report = evaluate_run(
        model,
        definition,
        splits,
        top_k=args.map_k if args.map_k is not None else run.map_k(),
        distance=args.distance,
        baseline=args.baseline,
        pr_curve=bool(args.pr_curve),
        accelerator=accelerator,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        show_progress_bar=not args.no_progress,
        feature_cache_dir=args.feature_cache,
        model_name=str(args.model),
    )
    if accelerator.is_main_process:
        _print_report(report, model.config)
        if args.output:
            print(f"Metrics written to {run.write_metrics(report, args.output)}")
        if args.pr_curve:
            from ..visualization import plot_pr_curve

            plot_pr_curve(report.curves, args.pr_curve, title=f"Precision-recall, {report.dataset['name']}")
            print(f"Precision-recall curve written to {args.pr_curve}")
    _finish(accelerator)
    return 0


def _print_report(report: EvaluationReport, config: MeCoQConfig) -> None:
    data = report.dataset
    print(
        f"mAP@{report.top_k}: {data['num_queries']} queries vs {data['num_database']} database items of "
        f"{data['name']}, {report.distance}, {config.bits} bits (M={config.num_codebooks}, "
        f"K={config.codebook_size})"
    )
    for method, score in report.scores().items():
        print(f"  {method:<10} {score:.4f}")


def _evaluate_parser(commands: Any) -> None:
    parser = _subparser(
        commands,
        "evaluate",
        cmd_evaluate,
        "mAP@K on the query split, PR curve, PQ baseline",
        (
            "mAP@K of the query split's embeddings against the database split's codes. The splits are\n"
            "rebuilt from MODEL_DIR/splits.json (checked against its fingerprints); split options build\n"
            "new ones instead."
        ),
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model folder written by mecoq train")
    parser.add_argument(
        "--map-k",
        type=int,
        metavar="K",
        help="K of mAP@K (default: the K the training selected its model by, training.top_k)",
    )
    parser.add_argument("--distance", choices=("asymmetric", "symmetric"), help="default: the model's config")
    parser.add_argument("--output", metavar="metrics.json", help="write the metrics as JSON")
    parser.add_argument("--pr-curve", metavar="pr.png", help="write a precision-recall curve PNG")
    parser.add_argument(
        "--baseline",
        choices=("pq",),
        help="also evaluate faiss PQ (same M, K = 256) on the frozen backbone features of the train split",
    )
    parser.add_argument(
        "--feature-cache",
        metavar="DIR",
        help="keep the backbone features in DIR and reuse them (e.g. the training run's "
        "training.feature_cache_dir): the model and the PQ baseline then share one backbone pass",
    )
    _data_options(parser, required=False)
    _split_options(parser)
    _run_options(parser)


__all__ = ["cmd_evaluate"]
