"""`mecoq evaluate`: mAP@K of a model folder on its recorded splits, next to the PQ baseline."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.splits import SPLITS_FILE, SplitDefinition
from ..file_io import read_json, write_json
from .common import _accelerator, _data_options, _finish, _run_options, _say, _split_options, _subparser
from .settings import DATA_FLAGS, _given

if TYPE_CHECKING:
    from datasets import DatasetDict

    from ..models.mecoq.configuration_mecoq import MeCoQConfig
    from ..retrieval.evaluation import RetrievalResult


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..hub import load_model
    from ..retrieval.baselines import evaluate_pq_baseline
    from ..retrieval.evaluation import evaluate_model

    model = load_model(args.model)
    definition, record = _evaluation_splits(args)
    accelerator = _accelerator()
    with accelerator.main_process_first():
        splits = definition.build()
    if record is not None:
        fix = (
            f"Restore the recorded data (see {SPLITS_FILE}), or pass split options to evaluate on new splits."
        )
        definition.check_against(splits, record, fix)
    if args.baseline == "pq" and len(splits["train"]) < 256:
        raise ValueError(
            f"The PQ baseline learns K = 256 codewords per sub-space and needs >= 256 training images, got "
            f"{len(splits['train'])}. Use a larger training split (--train-size) with --baseline pq."
        )
    distance = args.distance or model.config.distance
    top_k = min(_evaluation_top_k(args), len(splits["database"]))
    options = {
        "top_k": top_k,
        "pr_curve": bool(args.pr_curve),
        "accelerator": accelerator,
        "batch_size": args.batch_size,
        "show_progress_bar": not args.no_progress,
        "feature_cache_dir": args.feature_cache,
    }
    queries, database = splits["query"], splits["database"]
    mecoq = evaluate_model(
        model, queries, database, distance=distance, num_workers=args.num_workers, **options
    )
    results = {"MeCoQ": mecoq}
    if args.baseline == "pq":
        if model.config.backbone_trainable != "frozen":
            _say(
                accelerator,
                f"PQ baseline: loading the pretrained backbone ({model.config.backbone_weights}).",
            )
        results["faiss PQ"] = evaluate_pq_baseline(model, splits, **options)
    if accelerator.is_main_process:
        _report_evaluation(args, definition, splits, model.config, distance, top_k, results)
    _finish(accelerator)
    return 0


def _evaluation_splits(args: argparse.Namespace) -> tuple[SplitDefinition, dict[str, Any] | None]:
    """The recorded splits of the model folder, or new ones from the split options (then not checked)."""
    overrides = _given(args, DATA_FLAGS)
    recorded = Path(args.model) / SPLITS_FILE
    if recorded.is_file():
        definition, record = SplitDefinition.read(recorded)
        if not overrides:
            return definition, record
        print(f"Note: split options given; the splits differ from the ones recorded in {recorded}.")
        return SplitDefinition(**{**dataclasses.asdict(definition), **overrides}), None
    if "source" not in overrides:
        raise ValueError(
            f"{args.model} has no {SPLITS_FILE} (it was not trained with `mecoq train`): pass "
            "--dataset SOURCE and the split sizes (--num-query N)."
        )
    return SplitDefinition(**{"num_validation": 0, **overrides}), None


def _evaluation_top_k(args: argparse.Namespace) -> int:
    if args.top_k is not None:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}.")
        return args.top_k
    training_args = Path(args.model) / "training_args.json"
    recorded = (
        read_json(training_args, "Training arguments").get("top_k") if training_args.is_file() else None
    )
    return int(recorded or 1000)


def _report_evaluation(
    args: argparse.Namespace,
    definition: SplitDefinition,
    splits: DatasetDict,
    config: MeCoQConfig,
    distance: str,
    top_k: int,
    results: dict[str, RetrievalResult],
) -> None:
    """Print the mAP table; write the metrics JSON and the PR-curve PNG."""
    num_queries, num_database = len(splits["query"]), len(splits["database"])
    print(
        f"mAP@{top_k}: {num_queries} queries vs {num_database} database items of {definition.name}, "
        f"{distance}, {config.bits} bits (M={config.num_codebooks}, K={config.codebook_size})"
    )
    for method, result in results.items():
        print(f"  {method:<10} {result.map_at_k:.4f}")
    if args.output:
        dataset = {
            "name": definition.name,
            "source": definition.source,
            "protocol": definition.describe(splits),
            "query_split": "query",
            "database_split": "database",
            "num_queries": num_queries,
            "num_database": num_database,
            "distance": distance,
            "relevance": "same class" if "label" in splits["query"].column_names else "shares a label",
        }
        metric = f"map@{top_k}"
        payload = {"model": str(args.model), "dataset": dataset, "top_k": top_k, "distance": distance,
                   "bits": config.bits, "metrics": {metric: results["MeCoQ"].map_at_k}}  # fmt: skip
        if "faiss PQ" in results:
            payload["baselines"] = {
                "pq": {metric: results["faiss PQ"].map_at_k, **results["faiss PQ"].details}
            }
        write_json(args.output, payload)
        print(f"Metrics written to {args.output}")
    if args.pr_curve:
        from ..visualization import plot_pr_curve

        bits = {
            "MeCoQ": config.bits,
            "faiss PQ": 8 * config.num_codebooks,
        }  # PQ: K = 256, one byte a codebook
        curves = {f"{method} ({bits[method]} bits)": result.pr_curve for method, result in results.items()}
        plot_pr_curve(curves, args.pr_curve, title=f"Precision-recall, {definition.name}")
        print(f"Precision-recall curve written to {args.pr_curve}")


def _evaluate_parser(commands: Any) -> None:
    parser = _subparser(
        commands,
        "evaluate",
        cmd_evaluate,
        "mAP@K on the query split, PR curve, PQ baseline",
        (
            "mAP@K of the query split's embeddings against the database split's codes. The splits are rebuilt from\n"
            "MODEL_DIR/splits.json (checked against its fingerprints); split options build new ones instead."
        ),
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model folder written by mecoq train")
    parser.add_argument(
        "--top-k", type=int, metavar="K", help="K of mAP@K (default: the training's top_k, or 1000)"
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
