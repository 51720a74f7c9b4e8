"""A searchable index of MeCoQ product-quantization codes (M bytes per item for K = 256).

`CodeIndex` keeps the hard codes (N, M), the codewords (M, K, D), int64 user ids and the `SearchSettings`,
and answers top-k queries through a search backend from `backends.BACKENDS` (the native torch scan, faiss
`IndexPQ`, or faiss `IndexIVFPQ` over coarse lists). It follows faiss' verbs (`add`, `search`, `ntotal`,
`reconstruct`) and can export itself as a faiss `IndexPQ`. A file (`index_file.py`) is one safetensors unit
under one checksum: codes, ids, the description of the items (`sidecar.IndexSidecar`: labels, paths, model,
data source) and backend state (the IVF lists). `image_index.ImageIndex` builds and searches indexes of image
datasets. The native and IVF backends break ranking ties by database position (lower first), as
`evaluation.py` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from ..models.mecoq.configuration_mecoq import DISTANCES
from ..models.mecoq.quantization import check_codebooks, check_codes, code_dtype, decode_codes, hard_codes
from .backends import BACKENDS, IndexBackend, backend_class, check_backend_options
from .faiss_interop import add_codes, import_faiss, index_pq
from .index_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IndexFile,
    IndexFormatError,
    TensorPlan,
    read_index_file,
    write_index_file,
)
from .scoring import SearchSettings, check_query_embeddings
from .sidecar import IndexSidecar, sidecar_file_entries, sidecar_from_file

if TYPE_CHECKING:
    import faiss

METADATA_KEYS = (
    "num_codebooks",
    "codebook_size",
    "subvector_dim",
    "ntotal",
    "distance",
    "normalize_query_subvectors",
)


class SearchResult(NamedTuple):
    """scores: (Q, k) float32, best first (-inf where missing); ids: (Q, k) int64 user ids (-1 if missing)."""

    scores: torch.Tensor
    ids: torch.Tensor


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")


# the index


class CodeIndex:
    """Product-quantization codes with user ids, searched through a registered backend.

    Args:
        codebooks: (M, K, D) codewords the codes refer to, normally `model.normalized_codebooks()`; a
            float32 CPU copy is kept as `codewords`.
        settings: how queries are scored (`SearchSettings`); None: `SearchSettings()`, `MeCoQConfig`'s
            defaults. `CodeIndex.from_model` takes them from the model's config.
        backend: default search backend, a key of `backends.BACKENDS`: "native" (exact torch scan, the
            evaluation's tie rule), "faiss" (`IndexPQ`) or "ivf" (`IndexIVFPQ`), both asymmetric, K = 256.
            `backends.exhaustive_backend` names the faster exact one for given codebooks.
        **backend_options: options of that backend, e.g. `block_size=4096` for "native", `nlist=1024,
            nprobe=16` for "ivf".

    Example:
        >>> index = CodeIndex(torch.nn.functional.normalize(torch.randn(4, 256, 16), dim=-1))
        >>> codes = index.add_embeddings(torch.randn(1000, 64))
        >>> scores, ids = index.search(torch.randn(5, 64), k=10)
        >>> scores.shape, ids.dtype
        (torch.Size([5, 10]), torch.int64)
    """

    def __init__(
        self,
        codebooks: torch.Tensor,
        *,
        settings: SearchSettings | None = None,
        backend: str = "native",
        **backend_options: Any,
    ) -> None:
        self._init(codebooks, settings, backend, backend_options, {}, None)

    def _init(
        self,
        codebooks: torch.Tensor,
        settings: SearchSettings | None,
        backend: str,
        backend_options: dict[str, Any],
        stored_states: dict[str, dict[str, torch.Tensor]],
        file: IndexFile | None,
    ) -> None:
        check_codebooks(codebooks)
        if not codebooks.is_floating_point():
            raise ValueError(f"Codebooks must be floating point, got dtype {codebooks.dtype}.")
        self._settings = settings or SearchSettings()
        if not isinstance(self._settings, SearchSettings):
            raise TypeError(f"settings must be a SearchSettings, got {type(settings).__name__}.")
        check_backend_options(backend, backend_options)
        # A copy: the codebooks of a model that keeps training must not change the codes already indexed.
        self._codewords = codebooks.detach().to("cpu", torch.float32, copy=True).contiguous()  # (M, K, D)
        self._stored_states = stored_states  # backend name -> tensors saved with the index (e.g. IVF lists)
        self.file = file  # the file this index was read from (path, header, sha256), None if built in memory
        backend_class(backend).check(self._codewords, self._settings)  # refuse early, build on first search
        self.backend, self.backend_options = backend, dict(backend_options)
        num_codebooks, codebook_size, _ = self._codewords.shape
        self._codes = torch.empty(0, num_codebooks, dtype=code_dtype(codebook_size))  # (N, M)
        self._ids = torch.empty(0, dtype=torch.int64)  # (N,)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # added but not yet concatenated
        self._backends: dict[str, IndexBackend] = {}  # built on first use, kept up to date by `add`
        self._id_order: tuple[torch.Tensor, torch.Tensor] | None = None  # (sorted ids, their positions)

    @classmethod
    def from_model(cls, model: Any, *, distance: str | None = None, backend: str = "native",
                   **backend_options: Any) -> CodeIndex:  # fmt: skip
        """An empty index for a model's codes: its codebooks, and the scoring of its config (`distance`
        overrides the config's)."""
        settings = SearchSettings.from_config(model.config, distance=distance)
        return cls(model.normalized_codebooks(), settings=settings, backend=backend, **backend_options)

    @property
    def codewords(self) -> torch.Tensor:
        """(M, K, D) float32 copy of the codewords the codes refer to (read only)."""
        return self._codewords

    @property
    def settings(self) -> SearchSettings:
        return self._settings

    @property
    def num_codebooks(self) -> int:
        return self._codewords.shape[0]

    @property
    def codebook_size(self) -> int:
        return self._codewords.shape[1]

    @property
    def dim(self) -> int:
        return self._codewords.shape[0] * self._codewords.shape[2]

    @property
    def ntotal(self) -> int:
        return self._codes.shape[0] + sum(codes.shape[0] for codes, _ in self._pending)

    @property
    def codes(self) -> torch.Tensor:
        """(N, M) stored codes in insertion order."""
        self._consolidate()
        return self._codes

    @property
    def ids(self) -> torch.Tensor:
        """(N,) int64 user ids in insertion order."""
        self._consolidate()
        return self._ids

    def _consolidate(self) -> None:
        # Appends are buffered and concatenated once, so many small `add` calls stay linear in N.
        if self._pending:
            self._codes = torch.cat([self._codes, *(codes for codes, _ in self._pending)])
            self._ids = torch.cat([self._ids, *(ids for _, ids in self._pending)])
            self._pending = []

    def add(self, codes: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Append (N, M) hard codes with (N,) unique non-negative ids (default: ntotal, ntotal + 1, ...)."""
        codes = torch.as_tensor(codes)
        check_codes(codes, self._codewords)
        ids = self._new_ids(codes.shape[0], ids)
        codes = codes.to("cpu", code_dtype(self.codebook_size)).contiguous()
        for name in self._stored_states:  # a saved backend state (the IVF lists) must follow the new codes
            self._backend(name)
        self._pending.append((codes, ids))
        self._id_order = None
        for backend in self._backends.values():
            backend.add(codes)

    def add_embeddings(
        self, embeddings: torch.Tensor, ids: torch.Tensor | None = None, batch_size: int = 65536
    ) -> torch.Tensor:
        """Hard-code (N, d) embeddings with the index's codewords (as `ProductQuantizer.encode`), add them and
        return the (N, M) codes."""
        check_query_embeddings(embeddings, self.dim)
        parts = [
            hard_codes(embeddings[i : i + batch_size].detach().cpu(), self._codewords)
            for i in range(0, embeddings.shape[0], batch_size)
        ]
        codes = torch.cat(parts) if parts else self._codes[:0]  # (N, M)
        self.add(codes, ids)
        return codes

    def _new_ids(self, count: int, ids: torch.Tensor | None) -> torch.Tensor:
        if ids is None:
            return torch.arange(self.ntotal, self.ntotal + count, dtype=torch.int64)
        ids = torch.as_tensor(ids)
        if ids.shape != (count,) or ids.is_floating_point():
            raise ValueError(
                f"ids must be an integer tensor of shape ({count},), got {ids.dtype} {tuple(ids.shape)}."
            )
        ids = ids.to("cpu", torch.int64)
        if count and int(ids.min()) < 0:
            raise ValueError("ids must be non-negative: -1 marks a missing result in `search`.")
        if torch.unique(torch.cat([self.ids, ids])).numel() != self.ntotal + count:
            raise ValueError(
                "ids must be unique within the index; some of the new ids are repeated or present."
            )
        return ids

    # search

    def search(self, query_embeddings: torch.Tensor, k: int, backend: str | None = None) -> SearchResult:
        """Top-k database items for each (Q, d) query: (scores (Q, k) float32, ids (Q, k) int64).

        Scores are higher-is-better similarities; ties go to the earlier-added item (native backend). Where
        the index holds fewer than k items the remaining slots get score -inf and id -1, as in faiss.
        `backend` overrides the index's default backend for this call (with that backend's default options).
        """
        _check_k(k)
        query_embeddings = torch.as_tensor(query_embeddings)
        check_query_embeddings(query_embeddings, self.dim)
        queries = query_embeddings.detach().to("cpu", torch.float32)
        searcher = self._backend(backend or self.backend)
        if queries.shape[0] == 0:
            return SearchResult(torch.empty(0, k), torch.empty(0, k, dtype=torch.int64))
        scores, positions = searcher.search(queries, k)  # (Q, k'), k' <= k; position -1 where missing
        found = positions >= 0
        ids = torch.full_like(positions, -1)
        ids[found] = self.ids[positions[found]]
        scores = torch.where(found, scores.to(torch.float32), float("-inf"))
        missing = k - scores.shape[1]
        scores, ids = F.pad(scores, (0, missing), value=float("-inf")), F.pad(ids, (0, missing), value=-1)
        return SearchResult(scores, ids)

    def _backend(self, name: str) -> IndexBackend:
        """The backend `name` for this index, built from the current codes on first use."""
        if name not in self._backends:
            cls = backend_class(name)
            cls.check(self._codewords, self._settings)
            options = self.backend_options if name == self.backend else {}
            self._backends[name] = cls(self, **options)
        return self._backends[name]

    def reconstruct(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) user ids -> (n, d) decoded vectors (concatenated codewords)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if self._id_order is None:
            sorted_ids, positions = torch.sort(self.ids)
            self._id_order = (sorted_ids, positions)
        sorted_ids, positions = self._id_order
        slots = torch.searchsorted(sorted_ids, ids).clamp(max=max(sorted_ids.numel() - 1, 0))
        if sorted_ids.numel() == 0 or not torch.equal(sorted_ids[slots], ids):
            raise ValueError(
                f"Some ids are not in the index: {ids[~torch.isin(ids, sorted_ids)][:10].tolist()}."
            )
        return decode_codes(self.codes[positions[slots]], self._codewords)

    def check_codebooks_match(
        self, codebooks: torch.Tensor, source: str, index_name: str = "The index"
    ) -> None:
        """Raise a ValueError unless `codebooks` (`model.normalized_codebooks()` of the model at `source`) are
        the ones the codes were made with (same shape, equal within 1e-5): another model's queries score
        nonsense."""
        codebooks = codebooks.detach().to("cpu", torch.float32)
        same_shape = codebooks.shape == self._codewords.shape
        if not same_shape or not torch.allclose(codebooks, self._codewords, atol=1e-5):
            raise ValueError(
                f"{index_name} was built with other codebooks than the model {source}: pass the model the "
                "index was built with (mecoq index build MODEL_DIR ...)."
            )

    def to_faiss(self, with_ids: bool = False) -> faiss.Index:
        """A faiss `IndexPQ(d, M, 8, METRIC_INNER_PRODUCT)` holding these codewords and codes.

        Its search returns insertion positions; `with_ids=True` wraps it in an `IndexIDMap` returning user
        ids. faiss `IndexPQ` stores 8-bit codes only here, so K must be 256.
        """
        if not with_ids:
            return index_pq(self._codewords, self.codes)
        faiss = import_faiss()
        inner = index_pq(self._codewords, self.codes[:0])
        wrapped = faiss.IndexIDMap(inner)  # wraps empty indexes only; keeps a reference to `inner`
        add_codes(inner, self.codes)
        faiss.copy_array_to_vector(self.ids.numpy(), wrapped.id_map)
        wrapped.ntotal = self.ntotal
        return wrapped

    # persistence

    def stored_state(self, backend: str) -> dict[str, torch.Tensor]:
        """The state a backend saved with this index (e.g. the IVF lists), read from its file; {} if none."""
        return self._stored_states.get(backend, {})

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """`backend.name + "." + key` -> tensor, for every backend state to save (built backends win).

        The default backend is built first if it keeps a state (an IVF index saved before its first search
        still saves its lists)."""
        if self.ntotal and backend_class(self.backend).state is not IndexBackend.state:
            self._backend(self.backend)
        states = {name: dict(state) for name, state in self._stored_states.items()}
        for name, backend in self._backends.items():
            state = backend.state()
            if state:
                states[name] = state
        return {f"{name}.{key}": tensor for name, state in states.items() for key, tensor in state.items()}

    def _file_plans(self) -> tuple[dict[str, TensorPlan], dict[str, str]]:
        """The tensors and header entries of this index's file (without an item description)."""
        num_codebooks, codebook_size, subvector_dim = self._codewords.shape
        tensors = {
            "codebooks": self._codewords,
            "codes": self.codes,
            "ids": self.ids,
            **self._state_tensors(),
        }
        metadata = {
            "num_codebooks": str(num_codebooks),
            "codebook_size": str(codebook_size),
            "subvector_dim": str(subvector_dim),
            "ntotal": str(self.ntotal),
            "distance": self._settings.distance,
            "normalize_query_subvectors": json.dumps(self._settings.normalize_query_subvectors),
        }
        return {name: TensorPlan.of(tensor) for name, tensor in tensors.items()}, metadata

    def save(self, path: str | os.PathLike, *, sidecar: IndexSidecar | None = None) -> Path:
        """Write the index as one safetensors file, atomically (temp file in the folder, fsync, rename).

        Args:
            path: the file; missing parent folders are created.
            sidecar: what the ids stand for (labels, image paths, model, data source); stored inside the
                same file, under the same checksum (format version 2), so it cannot be paired with other
                codes. Its ids must be this index's ids, in order.

        The backend choice is not stored (it is chosen when loading), but backend state is (the IVF lists).
        """
        plans, metadata = self._file_plans()
        if sidecar is not None:
            if sidecar.ids != self.ids.tolist():
                raise ValueError("The sidecar's ids are not this index's ids (in insertion order).")
            item_plans, item_metadata = sidecar_file_entries(sidecar)
            plans, metadata = {**plans, **item_plans}, {**metadata, **item_metadata}
        return write_index_file(path, plans, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "native", **backend_options: Any) -> CodeIndex:
        """Read an index written by `save` (any version); `IndexFormatError` for a truncated, edited or
        foreign file.

        `backend` and `backend_options` are as in the constructor. Raises FileNotFoundError / PermissionError
        for a missing / unreadable file. The item description, if any, is read by `load_with_sidecar`.
        """
        return cls.load_with_sidecar(path, backend=backend, **backend_options)[0]

    @classmethod
    def load_with_sidecar(
        cls, path: str | os.PathLike, *, backend: str = "native", verify: bool = True, **backend_options: Any
    ) -> tuple[CodeIndex, IndexSidecar | None]:
        """`load`, plus the description of the items stored in the file (None for version 1 files, whose
        description is a JSON sidecar, and for files saved without one). `verify=False` skips the sha256."""
        file = read_index_file(path, verify=verify)
        _check_tensors(file.tensors, file.metadata, file.path)
        metadata = file.metadata
        settings = SearchSettings(metadata["distance"], json.loads(metadata["normalize_query_subvectors"]))
        states: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in file.tensors.items():
            owner, _, key = name.partition(".")
            if key and owner in BACKENDS:
                states.setdefault(owner, {})[key] = tensor
        index = cls.__new__(cls)
        index._init(file.tensors["codebooks"], settings, backend, backend_options, states, file)
        index._codes, index._ids = file.tensors["codes"], file.tensors["ids"]  # no backend is built yet
        backend_class(backend).check_index(index, backend_options)
        sidecar = sidecar_from_file(file.tensors, metadata, index._ids) if file.version >= 2 else None
        return index, sidecar

    def __repr__(self) -> str:
        return (
            f"CodeIndex(ntotal={self.ntotal}, M={self.num_codebooks}, K={self.codebook_size}, "
            f"dim={self.dim}, settings={self._settings}, backend={self.backend!r})"
        )


def _check_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path) -> None:
    missing = sorted({*METADATA_KEYS} - set(metadata)) + sorted({"codebooks", "codes", "ids"} - set(tensors))
    if missing:
        raise IndexFormatError(f"{path} lacks {missing}; the file was edited or damaged.")
    if metadata["distance"] not in DISTANCES or metadata["normalize_query_subvectors"] not in (
        "true",
        "false",
    ):
        raise IndexFormatError(f"{path} has invalid search settings in its metadata; the header was edited.")
    try:
        shape = tuple(int(metadata[key]) for key in ("num_codebooks", "codebook_size", "subvector_dim"))
        ntotal = int(metadata["ntotal"])
    except ValueError as error:
        raise IndexFormatError(
            f"{path} has non-integer sizes in its metadata; the header was edited."
        ) from error
    codes, ids = tensors["codes"], tensors["ids"]
    if (
        tuple(tensors["codebooks"].shape) != shape
        or tensors["codebooks"].dtype != torch.float32
        or tuple(codes.shape) != (ntotal, shape[0])
        or codes.dtype != code_dtype(shape[1])
        or tuple(ids.shape) != (ntotal,)
        or ids.dtype != torch.int64
    ):
        raise IndexFormatError(f"{path}: tensor shapes or dtypes do not match the metadata {dict(metadata)}.")


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CodeIndex",
    "IndexFormatError",
    "SearchResult",
]
