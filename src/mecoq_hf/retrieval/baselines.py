"""Shallow hashing and quantization baselines on fixed feature vectors (e.g. frozen backbone features).

The benchmark compares MeCoQ with the classic "shallow" methods the paper lists, run on the same backbone
features, so that the only difference is how the codes are learned:

- `ExactCosine`: no code at all; exact cosine similarity of the L2-normalised features (a reference ceiling).
- `LSH`: random hyperplanes (sign of random projections of the centred features), `bits` bits per item.
- `ITQ`: Iterative Quantization (Gong & Lazebnik, CVPR 2011): PCA to `bits` dimensions, then alternate between
  binary codes B = sign(V R) and the rotation R that best aligns V R with B (orthogonal Procrustes).
- `PQ` / `OPQ`: faiss product quantization (and its optimised rotation, Ge et al. 2013) with K = 256 codewords
  per sub-space, so `bits / 8` bytes per item like MeCoQ, scored asymmetrically by inner product.

Every method is a small class with `fit(train_features)`, `encode(features) -> codes` and
`scores(query_features, db_codes)`, which returns a lazy (Q, N) score matrix (higher = more similar) accepted
by every metric of `retrieval.metrics` (`mean_average_precision`, `precision_recall_curve`, ...). Ranking
ties, frequent with Hamming similarities, are broken by database position there, as for MeCoQ's codes.

All methods first L2-normalise the features (cosine geometry, as MeCoQ's intra-normalised sub-vectors);
LSH and ITQ then centre them on the training mean so that the hyperplanes split the data. faiss is imported
only when PQ or OPQ is fitted.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .evaluation import CodeScores
from .faiss_interop import import_faiss, pq_centroids
from .scoring import SearchSettings

if TYPE_CHECKING:
    from .evaluation import RetrievalResult

PQ_CODEBOOK_SIZE = 256  # 8-bit codes: one byte per sub-space, as MeCoQ with K = 256
ITQ_ITERATIONS = 50


# faiss IndexPQ's scoring: the inner product of the (unit) query with the decoded code, no sub-vector norm.
INNER_PRODUCT = SearchSettings(distance="asymmetric", normalize_query_subvectors=False)


# helpers


def _check_features(features: Any, name: str, dim: int | None = None) -> torch.Tensor:
    """A finite floating (N, F) tensor (float32, CPU), or a ValueError saying what is wrong."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a (N, F) tensor or NumPy array, got {type(features).__name__}.")
    if features.ndim != 2 or (dim is not None and features.shape[1] != dim):
        expected = f"(N, {dim})" if dim is not None else "(N, F)"
        raise ValueError(
            f"{name} must have shape {expected}, got {tuple(features.shape)}. Use features of the backbone "
            "the baseline was fitted on."
        )
    if not features.is_floating_point() or not torch.isfinite(features).all():
        raise ValueError(f"{name} must be finite floating-point values (dtype {features.dtype}).")
    return features.detach().to("cpu", torch.float32)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 8 or bits % 8:
        raise ValueError(
            f"bits must be a positive multiple of 8 (whole bytes, e.g. 16, 32, 64), got {bits!r}."
        )


def _normalize(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=1)


def _quiet_kmeans(product_quantizer: Any, seed: int) -> None:
    """Seed faiss' k-means and drop its "provide at least 39 x K training points" warning (printed once per
    sub-space and OPQ iteration): the protocols here train K = 256 codewords on a few thousand vectors."""
    product_quantizer.cp.seed = seed
    product_quantizer.cp.min_points_per_centroid = 1


def pack_bits(signs: torch.Tensor) -> torch.Tensor:
    """(N, bits) bool -> (N, bits / 8) uint8, most significant bit first (`numpy.packbits` order)."""
    return torch.from_numpy(np.packbits(signs.numpy().astype(np.uint8), axis=1))


def unpack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, bits / 8) uint8 -> (N, bits) bool, the inverse of `pack_bits`."""
    return torch.from_numpy(np.unpackbits(codes.numpy(), axis=1, count=bits).astype(bool))


# lazy score matrices (the `ScoreMatrix` protocol of retrieval.metrics)


class CosineScores:
    """Lazy (Q, N) cosines of unit query and database vectors; `scores[i:j]` computes rows i..j only."""

    def __init__(self, queries: torch.Tensor, database: torch.Tensor) -> None:
        self.queries, self.database = queries, database
        self.shape = (queries.shape[0], database.shape[0])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.queries[rows] @ self.database.T  # (Qc, N)


class HammingScores:
    """Lazy (Q, N) number of equal bits between query and database binary codes (bits - Hamming distance).

    Computed as (bits + <b_q, b_x>) / 2 with codes as +-1 vectors, a matrix product per block of queries.
    """

    def __init__(self, query_codes: torch.Tensor, db_codes: torch.Tensor, bits: int) -> None:
        for name, codes in (("query_codes", query_codes), ("db_codes", db_codes)):
            if codes.dtype != torch.uint8 or codes.ndim != 2 or codes.shape[1] != bits // 8:
                raise ValueError(
                    f"{name} must be packed bits of shape (N, {bits // 8}) and dtype uint8 for {bits} bits, "
                    f"got {tuple(codes.shape)} {codes.dtype}. Encode them with the same LSH / ITQ model."
                )
        self.bits = bits
        self.query_signs = unpack_bits(query_codes, bits).float() * 2 - 1  # (Q, bits) in {-1, +1}
        self.db_signs = unpack_bits(db_codes, bits).float() * 2 - 1  # (N, bits)
        self.shape = (query_codes.shape[0], db_codes.shape[0])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return (self.bits + self.query_signs[rows] @ self.db_signs.T) / 2  # (Qc, N)


# the baselines


class ExactCosine:
    """Reference without compression: the database keeps its unit float vectors, search is exact cosine."""

    name = "cosine"

    def __init__(self) -> None:
        self.dim: int | None = None

    def fit(self, train_features: torch.Tensor) -> ExactCosine:
        """Nothing to learn; records the feature width."""
        self.dim = _check_features(train_features, "train_features").shape[1]
        return self

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N, F) float32 unit vectors."""
        return _normalize(_check_features(features, "features", self.dim))

    def scores(self, query_features: torch.Tensor, db_codes: torch.Tensor) -> CosineScores:
        return CosineScores(self.encode(query_features), db_codes)


class _BinaryHash:
    """Codes sign(W^T (x / |x| - mean)) of `bits` bits, packed in bytes; Hamming similarity for search."""

    name = "binary"

    def __init__(self, bits: int, seed: int = 0) -> None:
        _check_bits(bits)
        self.bits, self.seed = bits, seed
        self.mean: torch.Tensor | None = None  # (F,) training mean of the unit features
        self.projection: torch.Tensor | None = None  # (F, bits)

    def _centred(self, features: torch.Tensor, name: str) -> torch.Tensor:
        if self.projection is None:
            raise ValueError(f"{type(self).__name__} is not fitted yet: call fit(train_features) first.")
        return _normalize(_check_features(features, name, self.projection.shape[0])) - self.mean

    def _fit_mean(self, train_features: torch.Tensor) -> torch.Tensor:
        features = _normalize(_check_features(train_features, "train_features"))
        self.mean = features.mean(dim=0)
        return features - self.mean  # (N, F)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) features -> (N, bits / 8) uint8 packed sign bits."""
        return pack_bits(self._centred(features, "features") @ self.projection >= 0)

    def scores(self, query_features: torch.Tensor, db_codes: torch.Tensor) -> HammingScores:
        """Queries are hashed too (symmetric Hamming ranking, the usual protocol for binary codes)."""
        return HammingScores(self.encode(query_features), db_codes, self.bits)


class LSH(_BinaryHash):
    """Locality-sensitive hashing with random hyperplanes (Charikar 2002) through the training mean.

    Args:
        bits: code length (a multiple of 8).
        seed: seed of the Gaussian hyperplanes.
    """

    name = "lsh"

    def fit(self, train_features: torch.Tensor) -> LSH:
        centred = self._fit_mean(train_features)
        generator = torch.Generator().manual_seed(self.seed)
        self.projection = torch.randn(centred.shape[1], self.bits, generator=generator)  # (F, bits)
        return self


class ITQ(_BinaryHash):
    """Iterative Quantization (Gong & Lazebnik, CVPR 2011): PCA, then a learned rotation before the signs.

    With V the (n, c) PCA projection of the centred training data (c = bits) and R a c x c orthogonal
    matrix, ITQ minimises the quantization loss ||B - V R||_F^2 over B in {-1, +1}^(n x c) and R, alternating
    B = sign(V R) and R = S_hat S^T from the SVD B^T V = S Omega S_hat^T (orthogonal Procrustes). Each step
    cannot increase the loss; `quantization_losses` keeps its value (per training item) after each iteration.

    Args:
        bits: code length (a multiple of 8, at most the feature width and the number of training items).
        iterations: alternations of the two steps (50 in the paper).
        seed: seed of the random orthogonal initial rotation.
    """

    name = "itq"

    def __init__(self, bits: int, iterations: int = ITQ_ITERATIONS, seed: int = 0) -> None:
        super().__init__(bits, seed)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}.")
        self.iterations = iterations
        self.rotation: torch.Tensor | None = None  # (bits, bits)
        self.quantization_losses: list[float] = []

    def fit(self, train_features: torch.Tensor) -> ITQ:
        centred = self._fit_mean(train_features).double()  # (N, F)
        if self.bits > min(centred.shape):
            raise ValueError(
                f"ITQ needs bits <= feature width and <= training items, got bits={self.bits} for "
                f"{tuple(centred.shape)} training features. Use fewer bits or more training data."
            )
        principal = self._principal_directions(centred)  # (F, c)
        projected = centred @ principal  # (N, c): V
        generator = torch.Generator().manual_seed(self.seed)
        rotation = torch.linalg.qr(
            torch.randn(self.bits, self.bits, generator=generator, dtype=torch.float64)
        )[0]
        self.quantization_losses = []
        for _ in range(self.iterations):
            signs = torch.where(projected @ rotation >= 0, 1.0, -1.0).double()  # (N, c): B
            rotation = self._procrustes(projected, signs)
            loss = (signs - projected @ rotation).pow(2).sum() / projected.shape[0]
            self.quantization_losses.append(float(loss))
        self.rotation = rotation
        self.projection = (principal @ rotation).float()  # (F, c): sign(x W) = sign(V R)
        return self

    def _principal_directions(self, centred: torch.Tensor) -> torch.Tensor:
        """(N, F) centred data -> (F, c) top-c eigenvectors of the covariance, largest variance first."""
        covariance = centred.T @ centred / centred.shape[0]  # (F, F)
        _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        return eigenvectors[:, -self.bits :].flip(1)

    @staticmethod
    def _procrustes(projected: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """argmin over orthogonal R of ||B - V R||_F: R = S_hat S^T with B^T V = S Omega S_hat^T."""
        left, _, right_t = torch.linalg.svd(signs.T @ projected)  # (c, c) each
        return right_t.T @ left.T


class PQ:
    """faiss product quantization (Jegou et al. 2011) of the unit features, scored asymmetrically.

    M = bits / 8 sub-spaces with 256 codewords each (k-means per sub-space on the training features); a query
    is scored against a database code by the inner product of the unit query with the decoded code, through
    per-query lookup tables, as faiss `IndexPQ(d, M, 8, METRIC_INNER_PRODUCT)` does and as MeCoQ is scored.

    Args:
        bits: code length, a multiple of 8; the feature width must be divisible by bits / 8.
        seed: seed of faiss' k-means.
    """

    name = "pq"

    def __init__(self, bits: int, seed: int = 0) -> None:
        _check_bits(bits)
        self.bits, self.seed = bits, seed
        self.num_codebooks = bits // 8
        self.index: Any = None  # faiss.IndexPQ (trained, empty)

    @property
    def centroids(self) -> torch.Tensor:
        """(M, 256, D) float32 k-means centroids learned by faiss, one codebook per sub-space (not unit)."""
        self._check_fitted()
        return pq_centroids(self.index.pq)

    def _check_fitted(self) -> None:
        if self.index is None:
            raise ValueError(f"{type(self).__name__} is not fitted yet: call fit(train_features) first.")

    def _check_trainable(self, features: torch.Tensor) -> None:
        count, dim = features.shape
        if dim % self.num_codebooks:
            raise ValueError(
                f"{self.bits} bits means M={self.num_codebooks} sub-spaces, which must divide the feature "
                f"width {dim}. Choose bits so that {dim} is divisible by bits / 8."
            )
        if count < PQ_CODEBOOK_SIZE:
            raise ValueError(
                f"PQ needs at least {PQ_CODEBOOK_SIZE} training vectors (one per codeword), got {count}."
            )

    def _prepare(self, features: torch.Tensor, name: str) -> np.ndarray:
        """Unit features (rotated, for OPQ) as a contiguous float32 array for faiss."""
        self._check_fitted()
        return np.ascontiguousarray(_normalize(_check_features(features, name, self.index.d)).numpy())

    def fit(self, train_features: torch.Tensor) -> PQ:
        faiss = import_faiss()
        features = _normalize(_check_features(train_features, "train_features"))
        self._check_trainable(features)
        self.index = self._train_pq(faiss, np.ascontiguousarray(features.numpy()))
        return self

    def _train_pq(self, faiss: Any, features: np.ndarray) -> Any:
        index = faiss.IndexPQ(features.shape[1], self.num_codebooks, 8, faiss.METRIC_INNER_PRODUCT)
        _quiet_kmeans(index.pq, self.seed)
        index.train(features)
        return index

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) features -> (N, M) uint8 codes."""
        prepared = self._prepare(features, "features")
        return torch.from_numpy(self.index.pq.compute_codes(prepared))

    def query_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(Q, F) features -> (Q, d) vectors in the codebooks' space (unit, and rotated for OPQ)."""
        return torch.from_numpy(self._prepare(features, "query_features"))

    def scores(self, query_features: torch.Tensor, db_codes: torch.Tensor) -> CodeScores:
        """Asymmetric inner-product scores sum_m <q^m, c^m_{code_m}> as a lazy `CodeScores` matrix."""
        return CodeScores(self.query_embeddings(query_features), db_codes, self.centroids, INNER_PRODUCT)

    def to_faiss(self, db_codes: torch.Tensor) -> Any:
        """A faiss `IndexPQ` holding these codebooks and `db_codes` (search with `query_embeddings`)."""
        faiss = import_faiss()
        self._check_fitted()
        index = faiss.clone_index(self.index)  # trained and empty
        index.add_sa_codes(np.ascontiguousarray(db_codes.numpy().astype(np.uint8)))
        return index


class OPQ(PQ):
    """faiss optimised product quantization (Ge et al., CVPR 2013): a learned rotation, then PQ.

    The rotation (faiss `OPQMatrix`, orthogonal) balances the variance between sub-spaces; inner products are
    unchanged by it, so queries are rotated the same way and scored asymmetrically against the PQ codewords.

    Args:
        bits: code length, a multiple of 8; the feature width must be divisible by bits / 8.
        seed: seed of faiss' k-means.
        iterations: alternations of rotation and PQ training inside `OPQMatrix`. faiss' default is 50; each
            iteration costs an SVD of a (F, F) matrix (seconds for F = 1280 on one CPU core), hence 10.
    """

    name = "opq"

    def __init__(self, bits: int, seed: int = 0, iterations: int = 10) -> None:
        super().__init__(bits, seed)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}.")
        self.iterations = iterations
        self.rotation: Any = None  # faiss.OPQMatrix
        self._rotation_pq: Any = None  # the ProductQuantizer OPQMatrix trains with (kept alive here)

    @property
    def rotation_matrix(self) -> torch.Tensor:
        """(F, F) the learned orthogonal rotation (rotated = features @ matrix.T)."""
        faiss = import_faiss()
        self._check_fitted()
        dim = self.rotation.d_in
        return torch.from_numpy(faiss.vector_to_array(self.rotation.A).reshape(dim, dim))

    def fit(self, train_features: torch.Tensor) -> OPQ:
        faiss = import_faiss()
        features = _normalize(_check_features(train_features, "train_features"))
        self._check_trainable(features)
        self.rotation = faiss.OPQMatrix(features.shape[1], self.num_codebooks)
        self.rotation.niter = self.iterations
        self._rotation_pq = faiss.ProductQuantizer(features.shape[1], self.num_codebooks, 8)
        _quiet_kmeans(self._rotation_pq, self.seed)
        self.rotation.pq = self._rotation_pq  # OPQMatrix holds a raw pointer: keep the object referenced
        features = np.ascontiguousarray(features.numpy())
        self.rotation.train(features)
        self.index = self._train_pq(faiss, self.rotation.apply(features))
        return self

    def _prepare(self, features: torch.Tensor, name: str) -> np.ndarray:
        return self.rotation.apply(super()._prepare(features, name))  # (N, F) rotated unit features


BASELINES: dict[str, type] = {"cosine": ExactCosine, "lsh": LSH, "itq": ITQ, "pq": PQ, "opq": OPQ}


def make_baseline(name: str, bits: int, seed: int = 0) -> ExactCosine | LSH | ITQ | PQ | OPQ:
    """A baseline by name (`cosine`, `lsh`, `itq`, `pq`, `opq`); `bits` is ignored by `cosine`."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; expected one of {sorted(BASELINES)}.")
    return ExactCosine() if name == "cosine" else BASELINES[name](bits, seed=seed)


# a MeCoQ model's shallow counterpart


def evaluate_pq_baseline(
    model: Any,
    splits: Any,
    *,
    top_k: int | None,
    accelerator: Any = None,
    batch_size: int = 128,
    pr_curve: bool = False,
    show_progress_bar: bool = True,
    feature_cache_dir: str | os.PathLike | None = None,
) -> RetrievalResult:
    """mAP@top_k of faiss `PQ` with a model's number of codebooks, on its pretrained backbone's features.

    PQ (same M as the model, K = 256, asymmetric inner product on L2-normalised features) is fitted on the
    features of `splits["train"]` and scored with the query split against the database split: the shallow
    method on the very features MeCoQ starts from. A model trained with a frozen backbone lends its own; for a
    fine-tuned one a fresh backbone with the pretrained weights of `config.backbone_weights` is built.

    Args:
        model: a `MeCoQModel`.
        splits: a `DatasetDict` with labelled "train", "query" and "database" splits (>= 256 train images).
        top_k: K of mAP@K; None for the whole database.
        accelerator: split the feature extraction over its processes.
        batch_size, show_progress_bar: of the feature extraction.
        pr_curve: also compute the precision-recall curve.
        feature_cache_dir: keep and reuse the backbone features on disk (shared with `evaluate_model` and
            training when the backbone is the same).

    Returns:
        An `evaluation.RetrievalResult` whose `details` hold `num_train`, `feature_dim` and `method`.
    """
    from ..feature_cache import compute_eval_features
    from ..models.mecoq.modeling_mecoq import MeCoQModel
    from .evaluation import RetrievalEvaluator, retrieval_result

    evaluator = RetrievalEvaluator(splits["query"], splits["database"], top_k=top_k, batch_size=batch_size,
                                   show_progress_bar=show_progress_bar)  # fmt: skip
    backbone = model.backbone
    if model.config.backbone_trainable != "frozen":  # fine-tuned: the baseline uses the pretrained weights
        backbone = MeCoQModel.for_training(model.config).backbone
    if accelerator is not None:
        backbone.to(accelerator.device)
    (train,) = compute_eval_features(
        backbone, [splits["train"]], batch_size=batch_size, accelerator=accelerator,
        show_progress_bar=show_progress_bar, cache_dir=feature_cache_dir,
    )  # fmt: skip
    queries, database = evaluator.features(backbone, accelerator, cache_dir=feature_cache_dir)
    pq = PQ(bits=8 * model.config.num_codebooks).fit(train.outputs)
    scores = pq.scores(queries.outputs, pq.encode(database.outputs))  # lazy (Q, N)
    details = {
        "num_train": len(splits["train"]),
        "feature_dim": int(train.outputs.shape[1]),
        "method": f"faiss IndexPQ(M={pq.num_codebooks}, 8 bits, METRIC_INNER_PRODUCT) on L2-normalised "
        "frozen backbone features (mecoq_hf.retrieval.baselines.PQ), asymmetric search",
    }
    return retrieval_result(scores, queries.labels, database.labels, top_k=top_k, pr_curve=pr_curve,
                            details=details)  # fmt: skip


__all__ = [
    "BASELINES",
    "ITQ",
    "LSH",
    "OPQ",
    "PQ",
    "CosineScores",
    "ExactCosine",
    "HammingScores",
    "evaluate_pq_baseline",
    "make_baseline",
]
