"""faiss, imported lazily, and conversions between our tensors and faiss product-quantization indexes.

`import mecoq_hf` and the model closure never need faiss: only the faiss index backend, `CodeIndex.to_faiss`
and the PQ / OPQ baselines import it, through `import_faiss`. Inputs are validated by the callers before
faiss sees them (faiss answers bad shapes with an empty `AssertionError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import faiss


def import_faiss() -> Any:
    """The `faiss` module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency of the package
        raise ImportError(
            "faiss is needed for the faiss index backend and the PQ / OPQ baselines: `pip install faiss-cpu`."
        ) from error
    return faiss


def check_faiss_codebooks(codebooks: torch.Tensor) -> None:
    """Raise a ValueError unless (M, K, D) codebooks fit faiss' 8-bit `IndexPQ` (K = 256)."""
    if codebooks.shape[1] != 256:
        raise ValueError(
            f"faiss export needs K=256 codewords per codebook (8-bit codes), got K={codebooks.shape[1]}. "
            "Use the native backend for other codebook sizes."
        )


def index_pq(codebooks: torch.Tensor, codes: torch.Tensor) -> faiss.IndexPQ:
    """A faiss `IndexPQ(d, M, 8, METRIC_INNER_PRODUCT)` holding (M, 256, D) codebooks and (N, M) uint8 codes.

    Searching it returns insertion positions; its scores are the asymmetric inner products of the raw query
    with the decoded codes. More codes can be appended with `add_codes`.
    """
    check_faiss_codebooks(codebooks)
    faiss = import_faiss()
    num_codebooks, _, subvector_dim = codebooks.shape
    index = faiss.IndexPQ(num_codebooks * subvector_dim, num_codebooks, 8, faiss.METRIC_INNER_PRODUCT)
    # pq.centroids is laid out (M, ksub, dsub) row-major, exactly our (M, K, D) codebooks.
    centroids = codebooks.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    faiss.copy_array_to_vector(centroids, index.pq.centroids)
    index.is_trained = True
    add_codes(index, codes)
    return index


def add_codes(index: faiss.IndexPQ, codes: torch.Tensor) -> None:
    """Append (n, M) uint8 codes to a faiss `IndexPQ` (its codes are one flat vector of ntotal x M bytes)."""
    if codes.shape[0]:
        index.add_sa_codes(np.ascontiguousarray(codes.to("cpu", torch.uint8).numpy()))


def pq_centroids(product_quantizer: Any) -> torch.Tensor:
    """The (M, ksub, dsub) float32 centroids of a trained faiss `ProductQuantizer`."""
    faiss = import_faiss()
    centroids = faiss.vector_to_array(product_quantizer.centroids)
    return torch.from_numpy(centroids).reshape(product_quantizer.M, product_quantizer.ksub, -1)


__all__ = ["import_faiss", "index_pq"]
