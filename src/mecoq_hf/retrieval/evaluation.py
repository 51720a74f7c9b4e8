"""Retrieval evaluation of MeCoQ codes: scores from codes, and the one evaluator of the package.

`CodeScores` is the lazy (Q, N) score matrix of query embeddings against database codes, accepted by every
metric of `metrics.py` (mAP@K, precision-recall, precision@N); `evaluate_codes` is its mAP@K.

`RetrievalEvaluator` scores a model on labelled query and database image splits: it extracts their backbone
features once per evaluation (or once for good with a frozen backbone, `keep_features`), then re-runs only the
projection and the quantizer. Training's model selection (`training.validation`), `evaluate_model` (`mecoq
evaluate`) and the PQ baseline (`baselines.evaluate_pq_baseline`) all go through it, and all get their
`RetrievalResult` from `retrieval_result`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..encoding import EncodedDataset, embed_features, module_mode, quantize_embeddings
from ..feature_cache import compute_eval_features
from ..file_io import read_json, write_json
from ..models.mecoq.quantization import check_codebooks, check_codes
from .metrics import ScoreMatrix, check_top_k, mean_average_precision, precision_recall_curve
from .scoring import (
    SearchSettings,
    check_query_embeddings,
    query_tables,
    scan_topk,
    stable_topk,
    table_scores,
)

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator
    from torch import nn


# scores from codes


class CodeScores:
    """Lazy (Q, N) scores of query embeddings against database codes; `scores[i:j]` computes rows i..j only.

    Args:
        query_embeddings: (Q, d) continuous query embeddings (`model.embed`).
        db_codes: (N, M) hard database codes (`model.encode`).
        codebooks: (M, K, D) codebooks the codes refer to (`model.normalized_codebooks()`).
        settings: the scoring (`SearchSettings`); None: `SearchSettings()`, `MeCoQConfig`'s defaults. For a
            model, `SearchSettings.from_config(model.config)`.
        block_size: database items scored at once by `stable_topk` (memory O(queries x block_size)).
    """

    def __init__(
        self,
        query_embeddings: torch.Tensor,
        db_codes: torch.Tensor,
        codebooks: torch.Tensor,
        settings: SearchSettings | None = None,
        block_size: int = 16384,
    ) -> None:
        num_codebooks, _, subvector_dim = check_codebooks(codebooks)
        check_query_embeddings(query_embeddings, num_codebooks * subvector_dim)
        check_codes(db_codes, codebooks)
        self.query_embeddings = query_embeddings.detach().cpu()
        self.db_codes = db_codes.cpu()
        self.codebooks = codebooks.detach().to("cpu", torch.float32)
        self.settings = settings or SearchSettings()
        self.shape = (query_embeddings.shape[0], db_codes.shape[0])
        self.block_size = block_size

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError(
                f"CodeScores rows are read with a slice (scores[i:j]), got {type(rows).__name__}."
            )
        return table_scores(self._tables(rows), self.db_codes)  # (Qc, N)

    def _tables(self, rows: slice) -> torch.Tensor:
        """(Qc, M, K) score tables of the queries in `rows`."""
        return query_tables(self.query_embeddings[rows], self.codebooks, self.settings)

    def stable_topk(self, rows: slice, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`scoring.stable_topk(self[rows], k)`, scanning the database in blocks when k is small."""
        tables = self._tables(rows)  # (Qc, M, K)
        if 4 * k >= self.shape[1]:
            return stable_topk(table_scores(tables, self.db_codes), k)
        return scan_topk(tables, self.db_codes, k, self.block_size)

    def to_tensor(self) -> torch.Tensor:
        """The whole (Q, N) matrix; only for small sets."""
        return self[:]


def evaluate_codes(
    query_embeddings: torch.Tensor,
    db_codes: torch.Tensor,
    codebooks: torch.Tensor,
    query_labels: Any,
    db_labels: Any,
    top_k: int | None = None,
    *,
    settings: SearchSettings | None = None,
    chunk_size: int | None = None,
) -> float:
    """mAP@top_k of query embeddings against database codes, one block of scores at a time.

    The arguments are those of `CodeScores` (embeddings, codes, codebooks, settings) and of
    `metrics.average_precision` (labels, top_k, chunk_size). With top_k set, memory is
    O(256 queries x 16,384).
    """
    scores = CodeScores(query_embeddings, db_codes, codebooks, settings)
    return mean_average_precision(scores, query_labels, db_labels, top_k, chunk_size=chunk_size)


# results


@dataclass(frozen=True)
class RetrievalResult:
    """mAP@K of one retrieval method on a query / database split, optionally with its precision-recall curve.

    Args:
        map_at_k (`float`): mean average precision of the top K results (`mean_average_precision`).
        pr_curve (`tuple`, *optional*): (precision (N,), recall (N,)) float64 over the full ranking
            (`precision_recall_curve`), when it was asked for.
        details (`dict`, *optional*): facts a report records about how the codes were made (e.g. a baseline's
            training-set size and method), JSON-ready.
    """

    map_at_k: float
    pr_curve: tuple[torch.Tensor, torch.Tensor] | None = None
    details: dict[str, Any] = field(default_factory=dict)


def retrieval_result(
    scores: ScoreMatrix,
    query_labels: Any,
    db_labels: Any,
    *,
    top_k: int | None,
    pr_curve: bool = False,
    details: dict[str, Any] | None = None,
) -> RetrievalResult:
    """The `RetrievalResult` of any (Q, N) scores: mAP@top_k, and the PR curve when `pr_curve`."""
    return RetrievalResult(
        mean_average_precision(scores, query_labels, db_labels, top_k),
        precision_recall_curve(scores, query_labels, db_labels) if pr_curve else None,
        details or {},
    )


# the evaluator


class RetrievalEvaluator:
    """mAP@K of a MeCoQ model's database codes against its query embeddings, on labelled image splits.

    The query embeddings and database codes are those of `model.embed` / `model.encode` on the images,
    computed from the backbone features of both splits (`feature_cache.compute_eval_features`) by the model's
    projection and quantizer; the scoring follows the model's config (`SearchSettings.from_config`).
    With a frozen backbone the features never change: `keep_features` extracts them once, and every later
    evaluation re-runs only the head.

    Follows the sentence-transformers evaluator contract too: `evaluator(model, output_path=None, epoch=-1,
    steps=-1)` returns `{primary_metric: mAP}` (e.g. `{"fashion-mnist_map@1000": 0.71}`), appending the record
    to a JSON file in `output_path` when given; `greater_is_better` drives best-checkpoint selection.

    Args:
        queries, database: normal-form datasets with an `image` column and a `label` or `labels` column.
        top_k: K of mAP@K (1000 for CIFAR-10, 5000 for Flickr25K/NUS-WIDE); None for the whole database.
        name: prefix of the metric key and of the results file name.
        batch_size, num_workers, show_progress_bar: of the feature extraction.

    Example:
        >>> evaluator = RetrievalEvaluator(splits["query"], splits["database"], top_k=1000)  # doctest: +SKIP
        >>> evaluator.evaluate(model).map_at_k  # doctest: +SKIP
        0.7312
    """

    greater_is_better = True

    def __init__(
        self,
        queries: datasets.Dataset,
        database: datasets.Dataset,
        *,
        top_k: int | None,
        name: str = "",
        batch_size: int = 128,
        num_workers: int = 0,
        show_progress_bar: bool = True,
    ) -> None:
        check_top_k(top_k, 1)
        for images, side in ((queries, "query"), (database, "database")):
            if not {"label", "labels"} & set(images.column_names):
                raise ValueError(
                    f"The {side} split has no labels (columns {images.column_names}): mAP needs a label "
                    "column."
                )
        self.queries, self.database, self.top_k, self.name = queries, database, top_k, name
        self.batch_size, self.num_workers, self.show_progress_bar = batch_size, num_workers, show_progress_bar
        self.primary_metric = f"{name + '_' if name else ''}map@{top_k if top_k is not None else 'all'}"
        self._kept: tuple[EncodedDataset, EncodedDataset] | None = None

    def features(
        self,
        backbone: nn.Module,
        accelerator: Accelerator | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        trunk: bool = False,
        storage_dtype: str = "float32",
    ) -> tuple[EncodedDataset, EncodedDataset]:
        """Labelled backbone features (query, database) of the two splits; the kept ones if `keep_features`
        was called (whatever `backbone` is then: keep them only for the frozen backbone of every model).

        Args:
            backbone: the backbone to run (`model.backbone`, or a pretrained one for a baseline).
            accelerator: split the extraction over its processes (every process gets the full result).
            cache_dir: keep and reuse the features on disk (`feature_cache.compute_features`).
            trunk, storage_dtype: the outputs of the backbone's frozen trunk instead of pooled features, and
                their storage precision (`feature_cache.compute_features`).
        """
        if self._kept is not None:
            return self._kept
        queries, database = compute_eval_features(
            backbone, (self.queries, self.database), batch_size=self.batch_size, num_workers=self.num_workers,
            accelerator=accelerator, trunk=trunk, storage_dtype=storage_dtype,
            show_progress_bar=self.show_progress_bar, cache_dir=cache_dir,
        )  # fmt: skip
        return queries, database

    def keep_features(
        self,
        backbone: nn.Module,
        accelerator: Accelerator | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """Extract the features once (see `features`) and use them in every later evaluation."""
        self._kept = None
        self._kept = self.features(backbone, accelerator, cache_dir=cache_dir)

    def evaluate(
        self,
        model: Any,
        accelerator: Accelerator | None = None,
        *,
        distance: str | None = None,
        pr_curve: bool = False,
        feature_cache_dir: str | os.PathLike | None = None,
    ) -> RetrievalResult:
        """mAP@top_k of `model` (a `MeCoQModel`, unwrapped) and optionally its precision-recall curve.

        Args:
            model: anything with `config`, `backbone`, `projection`, `quantizer` and `codebooks()`.
            accelerator: split the feature extraction over its processes.
            distance: "asymmetric" or "symmetric"; None: the model config's.
            pr_curve: also compute the precision-recall curve over the full ranking.
            feature_cache_dir: keep and reuse the backbone features on disk.
        """
        queries, database = self.features(model.backbone, accelerator, cache_dir=feature_cache_dir)
        settings = SearchSettings.from_config(model.config, distance=distance)
        scores = _model_scores(model, queries.outputs, database.outputs, settings)
        return retrieval_result(scores, queries.labels, database.labels, top_k=self.top_k, pr_curve=pr_curve)

    def __call__(
        self, model: Any, output_path: str | os.PathLike | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        metrics = {self.primary_metric: self.evaluate(model).map_at_k}
        if output_path is not None:
            path = Path(output_path) / f"{self.name or 'retrieval'}_evaluation_results.json"
            records = read_json(path, "Evaluation results") if path.exists() else []
            write_json(path, [*records, {"epoch": epoch, "steps": steps, **metrics}])
        return metrics


@torch.no_grad()
def _model_scores(
    model: Any, query_features: torch.Tensor, database_features: torch.Tensor, settings: SearchSettings
) -> CodeScores:
    """Scores of the model's query embeddings against its database codes, from backbone features (N, F);
    the model runs in eval mode (its mode is restored afterwards)."""
    with module_mode(model, training=False):
        query_embeddings = embed_features(model, query_features)  # (Q, d)
        database_codes = quantize_embeddings(model, embed_features(model, database_features))  # (N, M)
    return CodeScores(query_embeddings, database_codes, model.normalized_codebooks().detach().cpu(), settings)


def evaluate_model(
    model: Any,
    queries: datasets.Dataset,
    database: datasets.Dataset,
    *,
    top_k: int | None,
    distance: str | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    pr_curve: bool = False,
    show_progress_bar: bool = True,
    feature_cache_dir: str | os.PathLike | None = None,
) -> RetrievalResult:
    """mAP@top_k of a MeCoQ model on labelled query and database splits: `RetrievalEvaluator.evaluate`.

    Args:
        model: a `MeCoQModel`.
        queries, database: datasets with an `image` column and a `label` or `labels` column.
        top_k: K of mAP@K; None for the whole database.
        distance: "asymmetric" or "symmetric"; None: the model config's.
        accelerator: split the feature extraction over its processes (every process gets the full result).
        batch_size, num_workers, show_progress_bar: of the feature extraction.
        pr_curve: also compute the precision-recall curve over the full ranking.
        feature_cache_dir: keep and reuse the backbone features on disk, where the training run and the PQ
            baseline find them too.
    """
    evaluator = RetrievalEvaluator(queries, database, top_k=top_k, batch_size=batch_size,
                                   num_workers=num_workers, show_progress_bar=show_progress_bar)  # fmt: skip
    return evaluator.evaluate(
        model, accelerator, distance=distance, pr_curve=pr_curve, feature_cache_dir=feature_cache_dir
    )


__all__ = [
    "CodeScores",
    "RetrievalEvaluator",
    "RetrievalResult",
    "evaluate_codes",
    "evaluate_model",
    "retrieval_result",
]
