"""A searchable index of MeCoQ product-quantization codes (M bytes per item for K = 256).

`CodeIndex` keeps the hard codes (N, M), the codewords (M, K, D), int64 user ids and the `SearchSettings`,
and answers top-k queries through a search backend from `backends.BACKENDS` (the native torch scan, or faiss
`IndexPQ`). It follows faiss' verbs (`add`, `search`, `ntotal`, `reconstruct`) and can export itself as a
faiss `IndexPQ`. Files are safetensors with a format version and a checksum; `sidecar.IndexSidecar`
describes what the ids stand for, and `image_index.ImageIndex` builds and searches both from a model and a
dataset. The native backend breaks ranking ties by database position (lower first), as `evaluation.py` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..file_io import check_readable, write_atomic
from ..models.mecoq.configuration_mecoq import DISTANCES
from ..models.mecoq.quantization import check_codebooks, check_codes, code_dtype, decode_codes, hard_codes
from .backends import IndexBackend, backend_class, check_backend_options
from .faiss_interop import add_codes, import_faiss, index_pq
from .scoring import SearchSettings, check_query_embeddings

if TYPE_CHECKING:
    import faiss

FORMAT_NAME = "mecoq-hf/code-index"
FORMAT_VERSION = 1
TENSOR_NAMES = ("codebooks", "codes", "ids")
METADATA_KEYS = (
    "format",
    "format_version",
    "num_codebooks",
    "codebook_size",
    "subvector_dim",
    "ntotal",
    "distance",
    "normalize_query_subvectors",
)


class IndexFormatError(ValueError):
    """An index file is not a complete, unmodified `CodeIndex` file of a supported version."""


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
        codebooks: (M, K, D) codewords the codes refer to, normally `model.codebooks()`; a float32 CPU copy
            is kept as `codewords`.
        settings: how queries are scored (`SearchSettings`); None: `SearchSettings()`, `MeCoQConfig`'s
            defaults. `CodeIndex.from_model` takes them from the model's config.
        backend: default search backend, a key of `backends.BACKENDS`: "native" (torch scan) or "faiss"
            (`IndexPQ`, asymmetric, K = 256 only).
        **backend_options: options of that backend, e.g. `block_size=4096` for "native".

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
        check_codebooks(codebooks)
        if not codebooks.is_floating_point():
            raise ValueError(f"Codebooks must be floating point, got dtype {codebooks.dtype}.")
        self._settings = settings or SearchSettings()
        if not isinstance(self._settings, SearchSettings):
            raise TypeError(f"settings must be a SearchSettings, got {type(settings).__name__}.")
        check_backend_options(backend, backend_options)
        # A copy: the codebooks of a model that keeps training must not change the codes already indexed.
        self._codewords = codebooks.detach().to("cpu", torch.float32, copy=True).contiguous()  # (M, K, D)
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
        return cls(model.codebooks(), settings=settings, backend=backend, **backend_options)

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
        """Raise a ValueError unless `codebooks` (`model.codebooks()` of the model at `source`) are the ones
        the codes were made with (same shape, equal within 1e-5): another model's queries score nonsense."""
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

    def _metadata(self) -> dict[str, str]:
        num_codebooks, codebook_size, subvector_dim = self._codewords.shape
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "num_codebooks": str(num_codebooks),
            "codebook_size": str(codebook_size),
            "subvector_dim": str(subvector_dim),
            "ntotal": str(self.ntotal),
            "distance": self._settings.distance,
            "normalize_query_subvectors": json.dumps(self._settings.normalize_query_subvectors),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index as one safetensors file, atomically (temp file in the folder, fsync, rename).

        Missing parent folders are created. The backend is not stored: it is chosen when loading.
        """
        tensors = {"codebooks": self._codewords, "codes": self.codes, "ids": self.ids}
        metadata = self._metadata()
        metadata["sha256"] = _checksum(tensors, metadata)
        return write_atomic(path, lambda name: save_file(tensors, name, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "native", **backend_options: Any) -> CodeIndex:
        """Read an index written by `save`; `IndexFormatError` for a truncated, edited or foreign file.

        `backend` and `backend_options` are as in the constructor. Raises FileNotFoundError / PermissionError
        for a missing / unreadable file.
        """
        path = check_readable(path, "Index file", "Build it with `mecoq index build` or `CodeIndex.save`.")
        # `safe_open` memory-maps the file privately (copy-on-write) and `get_tensor` returns views of that
        # map, so the index bytes are not read into a second in-memory copy; pages load lazily as the checksum
        # below (and later searches) touch them. Copies happen only on `add` (new tensors) or a write.
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                _check_metadata(metadata, path)
                if set(file.keys()) != set(TENSOR_NAMES):
                    raise IndexFormatError(
                        f"{path} holds tensors {sorted(file.keys())}, expected {TENSOR_NAMES}."
                    )
                tensors = {name: file.get_tensor(name) for name in TENSOR_NAMES}
        except SafetensorError as error:
            raise IndexFormatError(
                f"{path} is not a readable safetensors file (truncated or damaged?): {error}"
            ) from error
        _check_tensors(tensors, metadata, path)
        if _checksum(tensors, {k: v for k, v in metadata.items() if k != "sha256"}) != metadata["sha256"]:
            raise IndexFormatError(f"{path} fails its sha256 checksum: the file was modified or damaged.")
        settings = SearchSettings(metadata["distance"], json.loads(metadata["normalize_query_subvectors"]))
        index = cls(tensors["codebooks"], settings=settings, backend=backend, **backend_options)
        index._codes, index._ids = tensors["codes"], tensors["ids"]  # no backend is built yet
        return index

    def __repr__(self) -> str:
        return (
            f"CodeIndex(ntotal={self.ntotal}, M={self.num_codebooks}, K={self.codebook_size}, "
            f"dim={self.dim}, settings={self._settings}, backend={self.backend!r})"
        )


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over the metadata (sorted JSON) and each tensor's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode())
    for name in TENSOR_NAMES:
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).reshape(-1).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def _check_metadata(metadata: Mapping[str, str], path: Path) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path} is not a CodeIndex file (format={metadata.get('format')!r}).")
    missing = {*METADATA_KEYS, "sha256"} - set(metadata)
    if missing:
        raise IndexFormatError(f"{path} lacks metadata {sorted(missing)}; the header was edited or damaged.")
    if metadata["format_version"] != str(FORMAT_VERSION):
        raise IndexFormatError(
            f"{path} has format version {metadata['format_version']}, this mecoq-hf reads version "
            f"{FORMAT_VERSION}. Upgrade mecoq-hf or re-create the index."
        )
    if metadata["distance"] not in DISTANCES or metadata["normalize_query_subvectors"] not in (
        "true",
        "false",
    ):
        raise IndexFormatError(f"{path} has invalid search settings in its metadata; the header was edited.")


def _check_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path) -> None:
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
