"""Search backends of a `CodeIndex`: the interface, the exhaustive native torch scan and faiss `IndexPQ`
(optionally split into shards searched in parallel), faiss `IndexIVFPQ` over learned coarse lists, and the
registry.

A `CodeIndex` owns the codes, ids, codebooks and search settings; a backend owns whatever it builds from them
to answer searches (nothing for the native scan, a faiss copy of the codes for faiss) and returns database
*positions* (insertion order), which the index maps to ids and pads to k. A backend may also keep a state
that is saved inside the index file (`state`; the IVF backend's centroids and list of every item), so that
loading does not redo its training.

Adding a backend is one `IndexBackend` subclass and one entry in `BACKENDS`; the CLI (`mecoq search
--backend`) and `CodeIndex` read the registry. Backend options are keyword-only arguments of the subclass'
`__init__` (the native scan's `block_size`; the IVF backend's `nlist` and `nprobe`), passed through
`CodeIndex(..., backend=name, **options)`. `exhaustive_backend` names the faster exact backend for given
codebooks (chosen from `benchmarks/bench_index.py`, see BENCHMARKS.md).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from . import ivf
from .faiss_interop import add_codes, check_faiss_codebooks, import_faiss, index_pq
from .scoring import SearchSettings, inner_product_queries, query_tables, scan_topk

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

    @classmethod
    def check_index(cls, index: CodeIndex, options: dict[str, Any]) -> None:
        """Raise a ValueError when this backend cannot serve `index` (just loaded) with `options`."""
        return None

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save inside the index file (read back through `index.stored_state(name)`)."""
        return {}

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
    scores go to the earlier position, as in the native scan, whatever faiss' threads or shards do.

    Args:
        index: the `CodeIndex` to serve.
        shards: split the codes into this many `IndexPQ` of consecutive positions inside a faiss
            `IndexShards`, searched by one thread each and merged (same results).
    """

    name = "faiss"
    description = "faiss IndexPQ (K = 256, asymmetric only; shards=S searches S parts in parallel)"

    def __init__(self, index: CodeIndex, *, shards: int = 1) -> None:
        super().__init__(index)
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be a positive integer, got {shards!r}.")
        if shards == 1:
            self.faiss_index = index_pq(index.codewords, index.codes)
            self.parts = [self.faiss_index]
        else:
            faiss = import_faiss()
            bounds = torch.linspace(0, index.ntotal, shards + 1).round().long().tolist()
            self.parts = [
                index_pq(index.codewords, index.codes[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
            ]
            self.faiss_index = faiss.IndexShards(index.dim, True, True)  # threaded, successive ids
            for part in self.parts:
                self.faiss_index.add_shard(part)

    @classmethod
    def check(cls, codewords: torch.Tensor, settings: SearchSettings) -> None:
        if settings.distance != "asymmetric":
            raise ValueError(
                "The faiss backend scores asymmetrically only; use backend='native' for symmetric."
            )
        check_faiss_codebooks(codewords)

    def add(self, codes: torch.Tensor) -> None:
        add_codes(self.parts[-1], codes)  # the last shard holds the highest positions
        if len(self.parts) > 1:
            self.faiss_index.syncWithSubIndexes()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ties go to the earlier position, as in the native scan (`ranked_by_position`)."""
        return ranked_by_position(self.faiss_index, faiss_queries(queries, self.index), k, self.index.ntotal)


def faiss_queries(queries: torch.Tensor, index: CodeIndex) -> np.ndarray:
    """(Q, d) queries as faiss scores them: sub-vectors unit-normalised where the settings ask for it."""
    queries = inner_product_queries(queries, index.num_codebooks, index.settings)
    return np.ascontiguousarray(queries.to(torch.float32).numpy())


class FaissIVF(IndexBackend):
    """faiss `IndexIVFPQ` over coarse lists of the index's codes: scans only the `nprobe` best lists.

    The coarse centroids are trained once (spherical k-means on a sample of decoded codes, or given as
    `centroids`, e.g. trained on embeddings with `ivf.train_coarse_centroids`) and, with the list of every
    item, saved inside the index file (`state`). The codes are stored verbatim (`by_residual = False`), so
    a scanned item gets exactly its asymmetric score and `nprobe = nlist` gives the exhaustive result.
    Asymmetric scores only, K = 256 only.

    Args:
        index: the `CodeIndex` to serve.
        nlist: number of lists when training; None: the saved lists, else `ivf.default_nlist(N)`.
        nprobe: lists scanned per query (default min(16, nlist)); `nprobe = nlist` is exhaustive.
        centroids: (nlist, d) coarse centroids to use instead of training.
        train_size: decoded codes sampled for k-means (default 64 x nlist).
        seed: of the training sample and k-means.
        on_disk: search the memory-mapped on-disk lists next to the index file (`ivf.write_ondisk_lists`);
            None: when that folder exists.
    """

    name = "ivf"
    description = "faiss IndexIVFPQ with our codebooks over coarse lists (--nprobe of them scanned per query)"

    def __init__(
        self,
        index: CodeIndex,
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        centroids: torch.Tensor | None = None,
        train_size: int | None = None,
        seed: int = 0,
        on_disk: bool | None = None,
    ) -> None:
        super().__init__(index)
        self.check_index(index, {"nlist": nlist, "nprobe": nprobe, "centroids": centroids})
        stored = index.stored_state(self.name)
        if "centroids" in stored:
            self.centroids, lists = stored["centroids"], stored["lists"]
        else:
            self.centroids = centroids if centroids is not None else self._train(nlist, train_size, seed)
            lists = ivf.assign_lists(index.codes, index.codewords, ivf.coarse_quantizer(self.centroids))
        self.centroids = self.centroids.to(torch.float32).contiguous()
        self.lists = [lists]  # (N,) int32 list of each position, appended to by `add`
        folder = ivf.ondisk_folder(index.file.path) if index.file is not None else None
        self.on_disk = bool(on_disk if on_disk is not None else folder is not None and folder.is_dir())
        if self.on_disk:
            if index.file is None:
                raise ValueError("on_disk=True needs an index loaded from a file with on-disk lists.")
            self.faiss_index = ivf.read_ondisk_lists(index.file.path, index.file.metadata["sha256"])
        else:
            self.faiss_index = ivf.ivf_index(index.codewords, self.centroids, index.codes, lists)
        self.quantizer = ivf.coarse_quantizer(self.centroids)
        self.set_nprobe(nprobe if nprobe is not None else min(16, self.nlist))

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    def set_nprobe(self, nprobe: int) -> None:
        """Scan `nprobe` lists per query from now on (1 <= nprobe <= nlist)."""
        if isinstance(nprobe, bool) or not isinstance(nprobe, int) or not 1 <= nprobe <= self.nlist:
            raise ValueError(f"nprobe must be an integer from 1 to nlist={self.nlist}, got {nprobe!r}.")
        self.nprobe = self.faiss_index.nprobe = nprobe

    def _train(self, nlist: int | None, train_size: int | None, seed: int) -> torch.Tensor:
        codes = self.index.codes
        nlist = nlist if nlist is not None else ivf.default_nlist(codes.shape[0])
        sample = ivf.training_sample(codes, self.index.codewords, train_size or 64 * nlist, seed)
        return ivf.train_coarse_centroids(sample, nlist, seed=seed)

    @classmethod
    def check(cls, codewords: torch.Tensor, settings: SearchSettings) -> None:
        if settings.distance != "asymmetric":
            raise ValueError(
                "The ivf backend scores asymmetrically only; use backend='native' for symmetric."
            )
        check_faiss_codebooks(codewords)

    @classmethod
    def check_index(cls, index: CodeIndex, options: dict[str, Any]) -> None:
        stored = index.stored_state(cls.name)
        nlist = options.get("nlist")
        if "centroids" in stored:
            built = stored["centroids"].shape[0]
            if nlist is not None and nlist != built:
                raise ValueError(
                    f"This index was built with nlist={built} lists, got nlist={nlist}. Drop --nlist (or "
                    "rebuild with `mecoq index build ... --backend ivf --nlist N`)."
                )
            nprobe = options.get("nprobe")
            if nprobe is not None and not (isinstance(nprobe, int) and 1 <= nprobe <= built):
                raise ValueError(f"nprobe must be an integer from 1 to nlist={built}, got {nprobe!r}.")
        elif index.file is not None and options.get("centroids") is None and nlist is None:
            raise ValueError(
                f"{index.file.path} was built without IVF lists (an exhaustive index). Search it with an "
                "exhaustive backend (drop --backend ivf and --nprobe), or rebuild it with "
                "`mecoq index build ... --backend ivf --nlist N`."
            )

    def state(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids, "lists": self._all_lists()}

    def _all_lists(self) -> torch.Tensor:
        if len(self.lists) > 1:
            self.lists = [torch.cat(self.lists)]
        return self.lists[0]

    def add(self, codes: torch.Tensor) -> None:
        if self.on_disk:
            raise ValueError(
                "An index searched from on-disk inverted lists is read-only; load it with on_disk=False "
                "to add codes."
            )
        start = self.index.ntotal - codes.shape[0]
        lists = ivf.assign_lists(codes, self.index.codewords, self.quantizer)
        ivf.add_to_lists(self.faiss_index, codes, lists, torch.arange(start, self.index.ntotal))
        self.lists.append(lists)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ties go to the earlier position, as in the native scan (`ranked_by_position`)."""
        return ranked_by_position(self.faiss_index, faiss_queries(queries, self.index), k, self.index.ntotal)


def ranked_by_position(
    faiss_index: Any, queries: np.ndarray, k: int, ntotal: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss' top-k with ties to the earlier position, as the native scan ranks them.

    faiss orders equal scores its own way (and differently with threads or shards), so it is asked for 2k
    results, each row is sorted stably by position among equal scores, and only the rows whose k-th score is
    tied with their last candidate are searched again with 4x more candidates, until nothing tied can be
    left out. Returns (scores (Q, k'), positions (Q, k')); position -1 where fewer were found.
    """
    ntotal = max(ntotal, 1)
    wanted = min(2 * k, ntotal)
    scores, positions = _ranked(faiss_index, queries, wanted)  # (Q, wanted)
    width = min(k, wanted)
    best_scores, best_positions = scores[:, :width].copy(), positions[:, :width].copy()
    rows = np.flatnonzero(_tie_left_out(scores, positions, width))
    while rows.size and wanted < ntotal:
        wanted = min(4 * wanted, ntotal)
        scores, positions = _ranked(faiss_index, queries[rows], wanted)
        best_scores[rows], best_positions[rows] = scores[:, :width], positions[:, :width]
        rows = rows[_tie_left_out(scores, positions, width)]
    return torch.from_numpy(best_scores), torch.from_numpy(best_positions)


def _ranked(faiss_index: Any, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss' top `count`, re-ordered by descending score, then ascending position (-1 last)."""
    scores, positions = faiss_index.search(queries, count)
    order = np.lexsort((np.where(positions < 0, np.iinfo(np.int64).max, positions), -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)


def _tie_left_out(scores: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """(Q,) rows of ranked candidates whose `width`-th score equals their last one while more may exist."""
    return (positions[:, -1] >= 0) & (scores[:, width - 1] == scores[:, -1])


# The registry: name -> backend class. The CLI's --backend choices and `CodeIndex` read it.
BACKENDS: dict[str, type[IndexBackend]] = {
    backend.name: backend for backend in (NativeScan, FaissPQ, FaissIVF)
}
EXHAUSTIVE_BACKENDS = ("native", "faiss")


def exhaustive_backend(codewords: torch.Tensor, settings: SearchSettings, threads: int | None = None) -> str:
    """The faster exact backend for (M, K, D) codebooks, as measured by `benchmarks/bench_index.py --scale`
    (BENCHMARKS.md, "Index scale"): the native scan with one thread (faster than faiss `IndexPQ` at M = 4
    and 8, and the evaluation's tie rule), faiss `IndexPQ` with more threads where it applies (K = 256,
    asymmetric): torch parallelises each operation and stalls at its barriers, faiss once per search.

    Args:
        codewords: (M, K, D) codebooks.
        settings: the scoring.
        threads: the thread count searches will use; None: `torch.get_num_threads()`.
    """
    threads = torch.get_num_threads() if threads is None else threads
    faiss_applies = codewords.shape[1] == 256 and settings.distance == "asymmetric"
    return "faiss" if faiss_applies and threads > 1 else "native"


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


__all__ = [
    "BACKENDS",
    "FaissIVF",
    "FaissPQ",
    "IndexBackend",
    "NativeScan",
    "backend_class",
    "exhaustive_backend",
]
