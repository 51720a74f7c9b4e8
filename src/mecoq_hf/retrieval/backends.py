"""Search backends of a `CodeIndex`: the interface, the native torch scan, faiss `IndexPQ`, and the registry.

A `CodeIndex` owns the codes, ids, codebooks and search settings; a backend owns whatever it builds from them
to answer searches (nothing for the native scan, a faiss `IndexPQ` copy for faiss) and returns database
*positions* (insertion order), which the index maps to ids and pads to k.

Adding a backend is one `IndexBackend` subclass and one entry in `BACKENDS`; the CLI (`mecoq search
--backend`) and `CodeIndex` read the registry. Backend options are keyword-only arguments of the subclass'
`__init__` (the native scan's `block_size`; an IVF backend would take `nlist` and `nprobe`), passed through
`CodeIndex(..., backend=name, **options)`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .faiss_interop import add_codes, check_faiss_codebooks, index_pq
from .scoring import SearchSettings, query_tables, scan_topk

if TYPE_CHECKING:
    from .index import CodeIndex


class IndexBackend(ABC):
    """How a `CodeIndex` answers `search`. One instance per index and backend, made by the index on first use.

    Subclasses set `name` (the registry key) and `description` (one line for `--help`), may take
    keyword-only options in `__init__`, and implement `check` (refuse, before anything is built, indexes
    they cannot serve), `add` and `search`.

    Args:
        index: the `CodeIndex` to serve, which has passed `check`; `index.codes` already holds its `ntotal`
            items.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, index: CodeIndex) -> None:
        self.index = index

    @classmethod
    @abstractmethod
    def check(cls, codewords: torch.Tensor, settings: SearchSettings) -> None:
        """Raise a ValueError when this backend cannot search codes of (M, K, D) `codewords` by `settings`."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keyword options `__init__` accepts."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @abstractmethod
    def add(self, codes: torch.Tensor) -> None:
        """Called after the index appended (n, M) `codes` at positions ntotal - n .. ntotal - 1."""

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, d) float32 CPU query embeddings -> (scores (Q, k') float32, positions (Q, k') int64), k' <= k.

        Best first; ties to the lower position where the backend can promise it; position -1 (any score)
        marks a missing result. The queries and k are validated by the index.
        """


class NativeScan(IndexBackend):
    """Exact search in torch: per-query score tables and a blocked scan with a running top-k.

    Ties go to the earlier-added item, exactly as `evaluation.py` ranks. Memory is
    O(query_batch_size x block_size) whatever the index size.

    Args:
        index: the `CodeIndex` to serve.
        query_batch_size: queries scored together.
        block_size: database items scored at once.
    """

    name = "native"
    description = "exact torch scan (any K, asymmetric or symmetric; ties to the earlier item)"

    def __init__(self, index: CodeIndex, *, query_batch_size: int = 256, block_size: int = 16384) -> None:
        super().__init__(index)
        for option, size in (("query_batch_size", query_batch_size), ("block_size", block_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{option} must be a positive integer, got {size!r}.")
        self.query_batch_size, self.block_size = query_batch_size, block_size

    @classmethod
    def check(cls, codewords: torch.Tensor, settings: SearchSettings) -> None:
        """Any codebooks and settings: nothing to refuse."""

    def add(self, codes: torch.Tensor) -> None:
        """Nothing to update: each search scans `index.codes`."""

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes, parts = self.index.codes, []
        for start in range(0, queries.shape[0], self.query_batch_size):
            block = queries[start : start + self.query_batch_size]
            tables = query_tables(block, self.index.codewords, self.index.settings)  # (Qb, M, K)
            parts.append(scan_topk(tables, codes, k, self.block_size))  # (Qb, k'), k' = min(k, N)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class FaissPQ(IndexBackend):
    """faiss `IndexPQ(d, M, 8, METRIC_INNER_PRODUCT)` holding the index's codebooks and codes.

    Asymmetric scores only, K = 256 only. With `normalize_query_subvectors` the queries' sub-vectors are
    unit-normalised first: sum_m <q^m/|q^m|, c^m> is plain ADC on the normalised query. Ties among equal
    scores are ordered as faiss orders them.
    """

    name = "faiss"
    description = "faiss IndexPQ (K = 256, asymmetric only)"

    def __init__(self, index: CodeIndex) -> None:
        super().__init__(index)
        self.faiss_index = index_pq(index.codewords, index.codes)

    @classmethod
    def check(cls, codewords: torch.Tensor, settings: SearchSettings) -> None:
        if settings.distance != "asymmetric":
            raise ValueError(
                "The faiss backend scores asymmetrically only; use backend='native' for symmetric."
            )
        check_faiss_codebooks(codewords)

    def add(self, codes: torch.Tensor) -> None:
        add_codes(self.faiss_index, codes)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index.settings.normalize_query_subvectors:
            num_queries, num_codebooks = queries.shape[0], self.index.num_codebooks
            queries = F.normalize(queries.reshape(num_queries, num_codebooks, -1), dim=-1)
            queries = queries.reshape(num_queries, self.index.dim)
        scores, positions = self.faiss_index.search(np.ascontiguousarray(queries.numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(positions)  # (Q, k) each, -1 where missing


# The registry: name -> backend class. The CLI's --backend choices and `CodeIndex` read it.
BACKENDS: dict[str, type[IndexBackend]] = {backend.name: backend for backend in (NativeScan, FaissPQ)}


def backend_class(name: str) -> type[IndexBackend]:
    """The registered backend called `name`, or a ValueError listing the registered ones."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {name!r}.")
    return BACKENDS[name]


def check_backend_options(name: str, options: dict[str, Any]) -> None:
    """Raise a ValueError naming the accepted options when `options` has one the backend does not take."""
    accepted = backend_class(name).option_names()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"The {name!r} backend takes the options {accepted or 'none'}, got {unknown}. "
            "Check the spelling, or pick the backend these options belong to."
        )


__all__ = ["BACKENDS", "FaissPQ", "IndexBackend", "NativeScan", "backend_class"]
