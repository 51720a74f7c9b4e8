"""The final test of a trained model: mAP@K of the query split against the database split, next to a baseline.

`evaluate_run` scores a model on splits (usually `RunFolder.evaluation_splits()`, the ones it was trained and
selected on) with `retrieval.evaluation.evaluate_model`, optionally next to faiss PQ on the same frozen
backbone features (`retrieval.baselines.evaluate_pq_baseline`), and returns an `EvaluationReport`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .run_folder import EvaluationReport

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import DatasetDict

    from ..data.splits import SplitDefinition
    from ..models.mecoq.modeling_mecoq import MeCoQModel

BASELINES = ("pq",)
PQ_CODEWORDS = 256  # faiss PQ with one byte per codebook


def evaluate_run(
    model: MeCoQModel,
    definition: SplitDefinition,
    splits: DatasetDict,
    *,
    top_k: int,
    distance: str | None = None,
    baseline: str | None = None,
    pr_curve: bool = False,
    accelerator: Accelerator | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    show_progress_bar: bool = True,
    feature_cache_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> EvaluationReport:
    """mAP@top_k of `model` on `splits` ("query" against "database"), optionally next to a baseline.

    Args:
        model: the trained `MeCoQModel`.
        definition: where `splits` came from (named in the report).
        splits: labelled "query" and "database" splits, and "train" (>= 256 images) for `baseline="pq"`.
        top_k: K of mAP@K (at most the database size is used).
        distance: "asymmetric" or "symmetric"; None: the model config's.
        baseline: None, or "pq": faiss PQ with the model's M and K = 256 on the pretrained backbone features.
        pr_curve: also compute precision-recall curves (in `report.curves`).
        accelerator, batch_size, num_workers, show_progress_bar, feature_cache_dir: of the feature extraction.
        model_name: the model's folder or Hub id, for the report.

    Returns:
        An `EvaluationReport` (save it with `RunFolder.write_metrics`).

    Raises:
        ValueError: `top_k` < 1, an unknown baseline, or too few training images for PQ.
    """
    from ..retrieval.evaluation import evaluate_model

    _check_request(top_k, baseline, splits)
    distance = distance or model.config.distance
    top_k = min(top_k, len(splits["database"]))
    options: dict[str, Any] = {"top_k": top_k, "pr_curve": pr_curve, "accelerator": accelerator,
                               "batch_size": batch_size, "show_progress_bar": show_progress_bar,
                               "feature_cache_dir": feature_cache_dir}  # fmt: skip
    queries, database = splits["query"], splits["database"]
    mecoq = evaluate_model(model, queries, database, distance=distance, num_workers=num_workers, **options)
    results = {"MeCoQ": (mecoq, model.config.bits)}
    report = EvaluationReport(
        metrics={f"map@{top_k}": mecoq.map_at_k},
        top_k=top_k,
        distance=distance,
        bits=model.config.bits,
        model=model_name,
        dataset=_dataset_description(definition, splits, distance),
    )
    if baseline == "pq":
        from ..retrieval.baselines import evaluate_pq_baseline

        pq = evaluate_pq_baseline(model, splits, **options)
        report.baselines["pq"] = {
            report.metric: pq.map_at_k,
            "bits": 8 * model.config.num_codebooks,
            **pq.details,
        }
        results["faiss PQ"] = (pq, report.baselines["pq"]["bits"])
    if pr_curve:
        report.curves = {f"{name} ({bits} bits)": result.pr_curve for name, (result, bits) in results.items()}
    return report


def _check_request(top_k: int, baseline: str | None, splits: DatasetDict) -> None:
    if top_k < 1:
        raise ValueError(f"K of mAP@K must be >= 1, got {top_k} (mecoq evaluate --map-k K).")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES} or None, got {baseline!r}.")
    if baseline == "pq" and len(splits["train"]) < PQ_CODEWORDS:
        raise ValueError(
            f"The PQ baseline learns K = {PQ_CODEWORDS} codewords per sub-space and needs >= {PQ_CODEWORDS} "
            f"training images, got {len(splits['train'])}. Use a larger training split (mecoq evaluate "
            "--train-size N) with the PQ baseline."
        )


def _dataset_description(definition: SplitDefinition, splits: DatasetDict, distance: str) -> dict[str, Any]:
    """The evaluation data as model cards read it (`model_card.MeCoQModelCardData`)."""
    queries = splits["query"]
    return {
        "name": definition.name,
        "source": definition.source,
        "protocol": definition.describe(splits),
        "query_split": "query",
        "database_split": "database",
        "num_queries": len(queries),
        "num_database": len(splits["database"]),
        "distance": distance,
        "relevance": "same class" if "label" in queries.column_names else "shares a label",
    }


__all__ = ["evaluate_run"]
