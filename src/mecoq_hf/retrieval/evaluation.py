"""Retrieval metrics for MeCoQ codes: mAP@K, precision-recall and precision@N curves, and an evaluator.

Definitions follow the reference code (docs/method.md §8): relevant = same class id (labels of shape (n,)) or at
least one shared label (multi-hot labels of shape (n, C)); AP@K divides by the number of relevant items
*inside* the top K and is 0 when there are none; the ranking is by descending score with ties broken by
database position (lower first), which makes results deterministic where the reference relied on an unstable
argsort (docs/method.md §7).

Every metric reads its (Q, N) scores a block of query rows at a time, so 10,000 queries against 1,000,000
database items run in bounded memory. Scores may be a tensor or a lazy `CodeScores` matrix computed from query
embeddings, database codes and codebooks, which never holds more than one block.

`evaluate_model` runs a model over labelled query and database image splits and returns a `RetrievalResult`
(mAP@K, optionally the PR curve); `RetrievalEvaluator` does the same for training loops.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils.data import DataLoader

from ..encoding import EncodedDataset, embed_features, encode_dataset, quantize_embeddings
from ..file_io import read_json, write_json
from ..models.mecoq.quantization import asymmetric_scores, check_codebooks, check_codes
from .scoring import DISTANCES, check_choice, check_query_embeddings, query_tables, scan_topk, stable_topk

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator
    from torch.utils.data import Dataset

# Elements of a (queries x database) block processed at once. A full ranking (top_k=None, PR curves) peaks
# near 100 bytes per element (sort values and indices, gathered labels, float64 hits), about 400 MiB for 2**22
# (see BENCHMARKS.md); a top-k ranking of a score tensor needs ~12 bytes per element.
TOPK_BLOCK_ELEMENTS = 2**24
SORT_BLOCK_ELEMENTS = 2**22


class ScoreMatrix(Protocol):
    """What the metrics need from their scores: a (Q, N) shape and row blocks `scores[start:stop]`.

    A matrix may also offer `stable_topk(rows, k)` (as `CodeScores` does) to rank rows without building them.
    """

    shape: Sequence[int]

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


# relevance


class _Relevance:
    """Relevance of ranked database items to queries, for class ids (n,) or multi-hot labels (n, C)."""

    def __init__(self, query_labels: Any, db_labels: Any, num_queries: int, num_db: int) -> None:
        query_labels, db_labels = torch.as_tensor(query_labels).cpu(), torch.as_tensor(db_labels).cpu()
        if query_labels.ndim != db_labels.ndim or query_labels.ndim not in (1, 2):
            raise ValueError(
                "Labels must be class ids of shape (n,) or multi-hot of shape (n, C) on both sides, got query "
                f"labels {tuple(query_labels.shape)} and database labels {tuple(db_labels.shape)}."
            )
        if (query_labels.shape[0], db_labels.shape[0]) != (num_queries, num_db):
            raise ValueError(
                f"Scores are ({num_queries}, {num_db}) but there are {query_labels.shape[0]} query labels "
                f"and {db_labels.shape[0]} database labels; pass one label row per query and database item."
            )
        self.multi_label = query_labels.ndim == 2
        if self.multi_label:
            if query_labels.shape[1] != db_labels.shape[1]:
                raise ValueError(
                    f"Multi-hot widths differ: {query_labels.shape[1]} vs {db_labels.shape[1]} labels."
                )
            self.query, self.db = _pack_bits(query_labels != 0), _pack_bits(db_labels != 0)  # (n, W) int64
        else:
            if query_labels.is_floating_point() or db_labels.is_floating_point():
                raise ValueError(
                    "Class-id labels of shape (n,) must be integers; use (n, C) for multi-hot labels."
                )
            self.query, self.db = query_labels.long(), db_labels.long()

    def at(self, start: int, stop: int, columns: torch.Tensor) -> torch.Tensor:
        """(Qc, k) ranked database positions of queries start..stop -> (Qc, k) bool relevance."""
        ranked = self.db[columns]  # (Qc, k) or (Qc, k, W)
        if not self.multi_label:
            return ranked == self.query[start:stop, None]
        return ((ranked & self.query[start:stop, None, :]) != 0).any(dim=-1)


def _pack_bits(labels: torch.Tensor) -> torch.Tensor:
    """(n, C) bool -> (n, ceil(C/64)) int64 bit masks, so "shares a label" is one AND per 64 labels."""
    words = max(1, -(-labels.shape[1] // 64))
    padded = torch.zeros(labels.shape[0], words * 64, dtype=torch.int64)
    padded[:, : labels.shape[1]] = labels.long()
    shifts = torch.arange(64, dtype=torch.int64)
    return (padded.reshape(-1, words, 64) << shifts).sum(dim=-1)  # exact in two's complement, bit 63 included


# ranked relevance, one block of queries at a time


def _check_scores(scores: ScoreMatrix) -> tuple[int, int]:
    shape = tuple(getattr(scores, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"Scores must be a (n_query, n_db) matrix, got shape {shape}.")
    return int(shape[0]), int(shape[1])


def _check_top_k(top_k: int | None, num_db: int) -> int:
    if top_k is None:
        return num_db
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None (whole database), got {top_k!r}.")
    return min(top_k, num_db)


def _ranked_relevance(
    scores: ScoreMatrix, query_labels: Any, db_labels: Any, depth: int | None, chunk_size: int | None
) -> Iterator[torch.Tensor]:
    """Yield (Qc, depth) bool relevance of each query block's ranking (score desc, then database position)."""
    num_queries, num_db = _check_scores(scores)
    depth = _check_top_k(depth, num_db)
    relevance = _Relevance(query_labels, db_labels, num_queries, num_db)
    full_sort = 4 * depth >= num_db
    ranks_itself = callable(getattr(scores, "stable_topk", None))  # e.g. CodeScores: memory O(Qc x block)
    if chunk_size is None:
        budget = SORT_BLOCK_ELEMENTS if full_sort else TOPK_BLOCK_ELEMENTS
        chunk_size = 256 if ranks_itself and not full_sort else max(1, budget // max(num_db, 1))
    for start in range(0, num_queries, chunk_size):
        rows = slice(start, min(start + chunk_size, num_queries))
        if ranks_itself:
            _, columns = scores.stable_topk(rows, depth)  # (Qc, depth)
        else:
            block = scores[rows]  # (Qc, N)
            if not block.is_floating_point() or torch.isnan(block).any():
                raise ValueError("Scores must be floating point without NaN (higher = more similar).")
            _, columns = stable_topk(block, depth)
            del block
        yield relevance.at(rows.start, rows.stop, columns.cpu())


def _hits_and_ranks(relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Qc, k) bool -> cumulative hits (Qc, k) and ranks 1..k (k,), both float64."""
    hits = relevant.cumsum(dim=1, dtype=torch.float64)
    return hits, torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64)


# metrics


def average_precision(
    scores: ScoreMatrix,
    query_labels: Any,
    db_labels: Any,
    top_k: int | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-query AP@top_k (docs/method.md §8.1) as a (Q,) float64 tensor; `top_k=None` ranks the whole database.

    Args:
        scores: (Q, N) similarities (higher = more similar): a tensor or a `CodeScores`.
        query_labels, db_labels: class ids (Q,), (N,) or multi-hot (Q, C), (N, C).
        top_k: K in AP@K, or None for the whole database (K larger than N means the whole database).
        chunk_size: queries per block; default keeps a block near 2**24 (top-k) or 2**22 (full sort) scores.
    """
    parts = []
    for relevant in _ranked_relevance(scores, query_labels, db_labels, top_k, chunk_size):
        hits, ranks = _hits_and_ranks(relevant)
        found = hits[:, -1] if hits.shape[1] else hits.new_zeros(hits.shape[0])  # (Qc,) relevant in the top K
        precision_sum = (hits / ranks * relevant).sum(dim=1)
        parts.append(torch.where(found > 0, precision_sum / found.clamp(min=1), 0.0))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def mean_average_precision(
    scores: ScoreMatrix,
    query_labels: Any,
    db_labels: Any,
    top_k: int | None = None,
    *,
    chunk_size: int | None = None,
) -> float:
    """mAP@top_k of the reference code (docs/method.md §8.1); see `average_precision` for the arguments."""
    per_query = average_precision(scores, query_labels, db_labels, top_k, chunk_size=chunk_size)
    if per_query.numel() == 0:
        raise ValueError("mAP needs at least one query; got an empty score matrix.")
    return float(per_query.mean())


def precision_recall_curve(
    scores: ScoreMatrix, query_labels: Any, db_labels: Any, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall at every rank 1..N of the full ranking, averaged over queries (docs/method.md §8.2).

    Recall divides by the relevant items in the whole database; a query with none has recall 0 at every rank.
    Returns (precision (N,), recall (N,)) float64.
    """
    _, num_db = _check_scores(scores)
    precision_sum = torch.zeros(num_db, dtype=torch.float64)
    recall_sum = torch.zeros(num_db, dtype=torch.float64)
    count = 0
    for relevant in _ranked_relevance(scores, query_labels, db_labels, None, chunk_size):
        hits, ranks = _hits_and_ranks(relevant)
        precision_sum += (hits / ranks).sum(dim=0)
        recall_sum += (hits / hits[:, -1:].clamp(min=1)).sum(dim=0)
        count += relevant.shape[0]
    return precision_sum / max(count, 1), recall_sum / max(count, 1)


def precision_at_n_curve(
    scores: ScoreMatrix, query_labels: Any, db_labels: Any, max_n: int, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Mean precision of the top n results for n = 1..max_n (docs/method.md §8.2), as a (min(max_n, N),) tensor."""
    _, num_db = _check_scores(scores)
    curve, count = torch.zeros(_check_top_k(max_n, num_db), dtype=torch.float64), 0
    for relevant in _ranked_relevance(scores, query_labels, db_labels, max_n, chunk_size):
        hits, ranks = _hits_and_ranks(relevant)
        curve += (hits / ranks).sum(dim=0)
        count += relevant.shape[0]
    return curve / max(count, 1)


# scores from codes


class CodeScores:
    """Lazy (Q, N) scores of query embeddings against database codes; `scores[i:j]` computes rows i..j only.

    Args:
        query_embeddings: (Q, d) continuous query embeddings (`model.embed`).
        db_codes: (N, M) hard database codes (`model.encode`).
        codebooks: (M, K, D) codebooks the codes refer to (`model.codebooks()`).
        distance: "asymmetric" (query vs. codewords via per-query lookup tables, the default) or "symmetric"
            (the query is hard-coded too and scored against the decoded database; many ties).
        normalize_query_subvectors: asymmetric only; the paper's unit query sub-vectors instead of the
            reference code's raw query (docs/method.md §10).
        block_size: database items scored at once by `stable_topk` (memory O(queries x block_size)).
    """

    def __init__(
        self,
        query_embeddings: torch.Tensor,
        db_codes: torch.Tensor,
        codebooks: torch.Tensor,
        distance: str = "asymmetric",
        normalize_query_subvectors: bool = False,
        block_size: int = 16384,
    ) -> None:
        num_codebooks, _, subvector_dim = check_codebooks(codebooks)
        check_choice("distance", distance, DISTANCES)
        check_query_embeddings(query_embeddings, num_codebooks * subvector_dim)
        check_codes(db_codes, codebooks)
        self.query_embeddings = query_embeddings.detach().cpu()
        self.db_codes = db_codes.cpu()
        self.codebooks = codebooks.detach().to("cpu", torch.float32)
        self.distance = distance
        self.normalize_query_subvectors = normalize_query_subvectors
        self.shape = (query_embeddings.shape[0], db_codes.shape[0])
        self.block_size = block_size

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError(
                f"CodeScores rows are read with a slice (scores[i:j]), got {type(rows).__name__}."
            )
        return asymmetric_scores(self._tables(rows), self.db_codes)  # (Qc, N)

    def _tables(self, rows: slice) -> torch.Tensor:
        """(Qc, M, K) score tables of the queries in `rows`."""
        return query_tables(
            self.query_embeddings[rows], self.codebooks, self.distance, self.normalize_query_subvectors
        )

    def stable_topk(self, rows: slice, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`ranking.stable_topk(self[rows], k)`, scanning the database in blocks when k is small."""
        tables = self._tables(rows)  # (Qc, M, K)
        if 4 * k >= self.shape[1]:
            return stable_topk(asymmetric_scores(tables, self.db_codes), k)
        return scan_topk(tables, self.db_codes, k, self.block_size)

    def to_tensor(self) -> torch.Tensor:
        """The whole (Q, N) matrix; only for small sets."""
        return self[:]


def score_codes(
    query_embeddings: torch.Tensor,
    db_codes: torch.Tensor,
    codebooks: torch.Tensor,
    distance: str = "asymmetric",
    normalize_query_subvectors: bool = False,
) -> CodeScores:
    """Scores of queries against codes as a lazy `CodeScores` matrix (pass it to any metric above)."""
    return CodeScores(query_embeddings, db_codes, codebooks, distance, normalize_query_subvectors)


def evaluate_codes(
    query_embeddings: torch.Tensor,
    db_codes: torch.Tensor,
    codebooks: torch.Tensor,
    query_labels: Any,
    db_labels: Any,
    top_k: int | None = None,
    distance: str = "asymmetric",
    normalize_query_subvectors: bool = False,
    *,
    chunk_size: int | None = None,
) -> float:
    """mAP@top_k of query embeddings against database codes, one block of scores at a time.

    The arguments are those of `CodeScores` (embeddings, codes, codebooks, distance, query normalisation) and
    of `average_precision` (labels, top_k, chunk_size). With top_k set, memory is O(256 queries x 16,384).
    """
    scores = CodeScores(query_embeddings, db_codes, codebooks, distance, normalize_query_subvectors)
    return mean_average_precision(scores, query_labels, db_labels, top_k, chunk_size=chunk_size)


# a model on labelled image splits


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
    """mAP@top_k of a MeCoQ model: query embeddings (`model.embed`) against database codes (`model.encode`).

    Both splits are labelled normal-form image datasets (`data.py`). Their backbone features are computed
    through the model's evaluation transform (optionally kept in `feature_cache_dir`, where the training run
    and the PQ baseline find them too), then projected and quantized: the same embeddings and codes as
    `model.embed` / `model.encode` on the images. The scoring follows the model's config (`distance`,
    `normalize_query_subvectors`).

    Args:
        model: a `MeCoQModel` (anything with `config`, `backbone`, `projection`, `quantizer`, `codebooks`).
        queries, database: datasets with an `image` column and a `label` or `labels` column.
        top_k: K of mAP@K; None for the whole database.
        distance: "asymmetric" or "symmetric"; None: the model config's.
        accelerator: split the feature extraction over its processes (every process gets the full result).
        batch_size, num_workers, show_progress_bar: of the feature extraction.
        pr_curve: also compute the precision-recall curve over the full ranking.
        feature_cache_dir: keep and reuse the backbone features on disk (`feature_cache.compute_features`).
    """
    from ..data.transforms import build_eval_transform
    from ..feature_cache import compute_features

    for images, side in ((queries, "query"), (database, "database")):
        if not {"label", "labels"} & set(images.column_names):
            raise ValueError(
                f"The {side} split has no labels (columns {images.column_names}): mAP needs a label column."
            )
    transform = build_eval_transform(model.backbone.data_config)
    query_features, database_features = (
        compute_features(
            model.backbone,
            split,
            transform,
            batch_size=batch_size,
            accelerator=accelerator,
            show_progress_bar=show_progress_bar,
            cache_dir=feature_cache_dir,
        )  # fmt: skip
        for split in (queries, database)
    )
    return evaluate_features(model, query_features, database_features, top_k=top_k, distance=distance,
                             pr_curve=pr_curve)  # fmt: skip


def evaluate_features(
    model: Any,
    queries: EncodedDataset,
    database: EncodedDataset,
    *,
    top_k: int | None,
    distance: str | None = None,
    pr_curve: bool = False,
) -> RetrievalResult:
    """`evaluate_model` from labelled backbone features (N, F) of the query and database splits."""
    for encoded, side in ((queries, "query"), (database, "database")):
        if encoded.labels is None:
            raise ValueError(f"The {side} features carry no labels: mAP needs the splits' label column.")
    was_training = model.training
    model.eval()
    try:
        query_embeddings = embed_features(model, queries.outputs)  # (Q, d)
        database_codes = quantize_embeddings(model, embed_features(model, database.outputs))  # (N, M)
    finally:
        model.train(was_training)
    config = model.config
    scores = score_codes(
        query_embeddings, database_codes, model.codebooks().detach().cpu(), distance or config.distance,
        config.normalize_query_subvectors,
    )  # fmt: skip
    labels = (queries.labels, database.labels)
    top_k = min(top_k, database_codes.shape[0]) if top_k is not None else None
    return RetrievalResult(
        mean_average_precision(scores, *labels, top_k),
        precision_recall_curve(scores, *labels) if pr_curve else None,
    )


# evaluator (sentence-transformers contract)


def _batches(images: Any, batch_size: int) -> Iterable:
    """Image tensors (N, C, H, W), a map-style dataset or an iterable of batches -> an iterable of batches."""
    if isinstance(images, torch.Tensor):
        if images.ndim < 2:
            raise ValueError(f"Image tensors must be (N, C, H, W), got shape {tuple(images.shape)}.")
        return [images[start : start + batch_size] for start in range(0, images.shape[0], batch_size)]
    if isinstance(images, DataLoader) or not (hasattr(images, "__getitem__") and hasattr(images, "__len__")):
        if not isinstance(images, Iterable):
            raise TypeError(
                f"Expected image tensors, a dataset or a dataloader, got {type(images).__name__}."
            )
        return images
    return DataLoader(images, batch_size=batch_size, shuffle=False)


def _model_codebooks(model: Any) -> torch.Tensor:
    """The (M, K, D) codebooks the model encodes with: `model.codebooks()` or its quantizer's."""
    codebooks = getattr(model, "codebooks", None)
    if callable(codebooks):
        codebooks = codebooks()
    if codebooks is None and hasattr(getattr(model, "quantizer", None), "normalized_codebooks"):
        codebooks = model.quantizer.normalized_codebooks()
    if not isinstance(codebooks, torch.Tensor):
        raise TypeError(
            f"Cannot read codebooks from {type(model).__name__}: give the model a `codebooks()` method "
            "returning the (M, K, D) codebooks used by `encode` (MeCoQModel has one)."
        )
    return codebooks.detach()


class RetrievalEvaluator:
    """mAP@K of a model's database codes against its query embeddings, for training loops and model cards.

    Follows the sentence-transformers evaluator contract: `evaluator(model, output_path=None, epoch=-1,
    steps=-1)` returns a dict of name-prefixed metrics (e.g. `{"fashion-mnist_map@1000": 0.71}`), with
    `primary_metric` and `greater_is_better` for best-checkpoint selection. The database is encoded with
    `model.encode` and the queries with `model.embed`, in eval mode without gradients (the model's train/eval
    mode is restored afterwards).

    Args:
        queries, database: image tensors (N, C, H, W), map-style datasets yielding `pixel_values` (plus
            labels), or dataloaders; never shuffled.
        query_labels, database_labels: class ids (n,) or multi-hot (n, C); when None they are read from the
            batches' "labels"/"label" entries.
        top_k: K of mAP@K (1000 for CIFAR-10, 5000 for Flickr25K/NUS-WIDE); None for the whole database.
        name: prefix of the metric keys and of the results file name.
        distance, normalize_query_subvectors: scoring, as in `CodeScores`.
        batch_size: images per forward pass when tensors or datasets are given.
        show_progress_bar: tqdm bars while encoding.

    Example:
        >>> evaluator = RetrievalEvaluator(
        ...     query_images, db_images, query_labels, db_labels, top_k=1000, name="fashion-mnist"
        ... )  # doctest: +SKIP
        >>> evaluator(model)  # doctest: +SKIP
        {'fashion-mnist_map@1000': 0.7312}
    """

    greater_is_better = True

    def __init__(
        self,
        queries: torch.Tensor | Dataset | Iterable,
        database: torch.Tensor | Dataset | Iterable,
        query_labels: Any = None,
        database_labels: Any = None,
        *,
        top_k: int | None = None,
        name: str = "",
        distance: str = "asymmetric",
        normalize_query_subvectors: bool = False,
        batch_size: int = 128,
        show_progress_bar: bool = False,
    ) -> None:
        check_choice("distance", distance, DISTANCES)
        _check_top_k(top_k, 1)
        for images, labels, side in (
            (queries, query_labels, "query"),
            (database, database_labels, "database"),
        ):
            if isinstance(images, torch.Tensor) and labels is None:
                raise ValueError(f"{side} images were given as a tensor, so {side} labels must be given too.")
        self.queries, self.database = _batches(queries, batch_size), _batches(database, batch_size)
        self.query_labels = None if query_labels is None else torch.as_tensor(query_labels)
        self.database_labels = None if database_labels is None else torch.as_tensor(database_labels)
        self.top_k, self.name, self.distance = top_k, name, distance
        self.normalize_query_subvectors = normalize_query_subvectors
        self.show_progress_bar = show_progress_bar
        self.primary_metric = self._prefixed(f"map@{top_k if top_k is not None else 'all'}")

    def _prefixed(self, metric: str) -> str:
        return f"{self.name}_{metric}" if self.name else metric

    def __call__(
        self, model: Any, output_path: str | os.PathLike | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        database = encode_dataset(
            model, self.database, method="encode", show_progress_bar=self.show_progress_bar
        )
        queries = encode_dataset(
            model, self.queries, method="embed", show_progress_bar=self.show_progress_bar
        )
        query_labels = _pick_labels(self.query_labels, queries.labels, "query")
        database_labels = _pick_labels(self.database_labels, database.labels, "database")
        score = evaluate_codes(
            queries.outputs,
            database.outputs,
            _model_codebooks(model),
            query_labels,
            database_labels,
            self.top_k,
            self.distance,
            self.normalize_query_subvectors,
        )
        metrics = {self.primary_metric: score}
        if output_path is not None:
            self._append_results(Path(output_path), {"epoch": epoch, "steps": steps, **metrics})
        return metrics

    def get_config_dict(self) -> dict[str, Any]:
        """Settings worth reporting next to the scores (model card)."""
        return {
            "top_k": self.top_k,
            "distance": self.distance,
            "normalize_query_subvectors": self.normalize_query_subvectors,
        }

    @property
    def results_file_name(self) -> str:
        return f"{self.name or 'retrieval'}_evaluation_results.json"

    def _append_results(self, folder: Path, record: dict[str, Any]) -> None:
        """Append one record to the JSON list in `folder`, rewriting the file atomically."""
        path = folder / self.results_file_name
        records = read_json(path, "Evaluation results") if path.exists() else []
        write_json(path, [*records, record])


def _pick_labels(given: torch.Tensor | None, from_batches: torch.Tensor | None, side: str) -> torch.Tensor:
    labels = given if given is not None else from_batches
    if labels is None:
        raise ValueError(
            f"No {side} labels: pass {side}_labels to RetrievalEvaluator or yield 'labels' in the "
            f"{side} batches."
        )
    return labels


__all__ = [
    "CodeScores",
    "RetrievalEvaluator",
    "RetrievalResult",
    "ScoreMatrix",
    "average_precision",
    "evaluate_codes",
    "evaluate_features",
    "evaluate_model",
    "mean_average_precision",
    "precision_at_n_curve",
    "precision_recall_curve",
    "score_codes",
]
