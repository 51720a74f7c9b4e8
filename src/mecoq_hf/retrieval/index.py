"""A searchable index of MeCoQ product-quantization codes (M bytes per item for K = 256).

`CodeIndex` keeps the hard codes (N, M), the codebooks (M, K, D) and int64 user ids, and answers top-k queries
with asymmetric (query embedding vs. codewords, docs/method.md §7) or symmetric scores. It follows faiss' verbs
(`add`, `search`, `ntotal`, `reconstruct`) and can export itself as a faiss `IndexPQ`. Files are safetensors
with a format version and a checksum; an optional JSON sidecar next to the file (`save_sidecar`) records what
the ids stand for (labels, image paths, the data source and the model). Ranking ties are broken by database
position (lower first), as in `evaluation.py`; `encoding.encode_dataset` produces the codes from a dataloader.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..file_io import check_readable, read_json, write_atomic, write_json
from ..models.mecoq.quantization import check_codebooks, check_codes, code_dtype, decode_codes, hard_codes
from .scoring import DISTANCES, check_choice, check_query_embeddings, query_tables, scan_topk

if TYPE_CHECKING:
    import faiss

FORMAT_NAME = "mecoq-hf/code-index"
FORMAT_VERSION = 1
BACKENDS = ("native", "faiss")
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
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = "mecoq-hf/index-sidecar"


class IndexFormatError(ValueError):
    """An index file is not a complete, unmodified `CodeIndex` file of a supported version."""


class SearchResult(NamedTuple):
    """scores: (Q, k) float32, best first (-inf where missing); ids: (Q, k) int64 user ids (-1 if missing)."""

    scores: torch.Tensor
    ids: torch.Tensor


# validation helpers


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency of the package
        raise ImportError("The faiss backend needs faiss: `pip install faiss-cpu`.") from error
    return faiss


# the index


class CodeIndex:
    """Product-quantization codes with user ids, searchable by asymmetric or symmetric scores.

    Args:
        codebooks: (M, K, D) codewords, normally `model.codebooks()`; a float32 CPU copy is kept.
        distance: "asymmetric" (query embedding vs. codewords, the paper's default) or "symmetric" (the query
            is hard-coded too; many ties).
        normalize_query_subvectors: asymmetric only; unit-normalise each query sub-vector (the paper's
            formula) instead of the raw query (the reference code). docs/method.md §10.
        backend: default search backend, "native" (torch) or "faiss" (`IndexPQ`, asymmetric, K = 256 only).
        query_batch_size, database_batch_size: search processes (query_batch_size x database_batch_size) score
            blocks, so memory stays bounded whatever the index size.

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
        distance: str = "asymmetric",
        normalize_query_subvectors: bool = False,
        backend: str = "native",
        query_batch_size: int = 256,
        database_batch_size: int = 16384,
    ) -> None:
        check_codebooks(codebooks)
        if not codebooks.is_floating_point():
            raise ValueError(f"Codebooks must be floating point, got dtype {codebooks.dtype}.")
        check_choice("distance", distance, DISTANCES)
        check_choice("backend", backend, BACKENDS)
        for name, size in (
            ("query_batch_size", query_batch_size),
            ("database_batch_size", database_batch_size),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}.")
        # A copy: the codebooks of a model that keeps training must not change the codes already indexed.
        self.codebooks = codebooks.detach().to("cpu", torch.float32, copy=True).contiguous()  # (M, K, D)
        self.distance = distance
        self.normalize_query_subvectors = normalize_query_subvectors
        self.backend = backend
        self.query_batch_size = query_batch_size
        self.database_batch_size = database_batch_size
        num_codebooks, codebook_size, _ = self.codebooks.shape
        self._codes = torch.empty(0, num_codebooks, dtype=code_dtype(codebook_size))  # (N, M)
        self._ids = torch.empty(0, dtype=torch.int64)  # (N,)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # added but not yet concatenated
        self._faiss_index: Any = None
        self._id_order: tuple[torch.Tensor, torch.Tensor] | None = None  # (sorted ids, their positions)

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    @property
    def dim(self) -> int:
        return self.codebooks.shape[0] * self.codebooks.shape[2]

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
        check_codes(codes, self.codebooks)
        ids = self._new_ids(codes.shape[0], ids)
        self._pending.append((codes.to("cpu", code_dtype(self.codebook_size)).contiguous(), ids))
        self._faiss_index = None
        self._id_order = None

    def add_embeddings(
        self, embeddings: torch.Tensor, ids: torch.Tensor | None = None, batch_size: int = 65536
    ) -> torch.Tensor:
        """Hard-code (N, d) embeddings with the index's codebooks (as `ProductQuantizer.encode`), add them and
        return the (N, M) codes."""
        check_query_embeddings(embeddings, self.dim)
        parts = [
            hard_codes(embeddings[i : i + batch_size].detach().cpu(), self.codebooks)
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

    def search(self, query_embeddings: torch.Tensor, k: int, backend: str | None = None) -> SearchResult:
        """Top-k database items for each (Q, d) query: (scores (Q, k) float32, ids (Q, k) int64).

        Scores are higher-is-better similarities; ties go to the earlier-added item (native backend). Where
        the index holds fewer than k items the remaining slots get score -inf and id -1, as in faiss.
        """
        backend = backend or self.backend
        check_choice("backend", backend, BACKENDS)
        _check_k(k)
        query_embeddings = torch.as_tensor(query_embeddings)
        check_query_embeddings(query_embeddings, self.dim)
        queries = query_embeddings.detach().to("cpu", torch.float32)
        if backend == "faiss":
            return self._search_faiss(queries, k)
        parts = [
            self._search_block(queries[i : i + self.query_batch_size], k)
            for i in range(0, queries.shape[0], self.query_batch_size)
        ]
        if not parts:
            return SearchResult(torch.empty(0, k), torch.empty(0, k, dtype=torch.int64))
        return SearchResult(torch.cat([p.scores for p in parts]), torch.cat([p.ids for p in parts]))

    def _search_block(self, queries: torch.Tensor, k: int) -> SearchResult:
        """Scan the database in blocks with a running top-k; memory is O(queries x database_batch_size)."""
        tables = query_tables(
            queries, self.codebooks, self.distance, self.normalize_query_subvectors
        )  # (Q, M, K)
        values, positions = scan_topk(tables, self.codes, k, self.database_batch_size)  # (Q, k'), k' <= k
        return self._pad(values, self.ids[positions], k)

    @staticmethod
    def _pad(scores: torch.Tensor, ids: torch.Tensor, k: int) -> SearchResult:
        missing = k - scores.shape[1]
        scores = F.pad(scores.to(torch.float32), (0, missing), value=float("-inf"))
        return SearchResult(scores, F.pad(ids, (0, missing), value=-1))

    def _search_faiss(self, queries: torch.Tensor, k: int) -> SearchResult:
        if self.distance != "asymmetric":
            raise ValueError(
                "The faiss backend scores asymmetrically only; use backend='native' for symmetric."
            )
        if self._faiss_index is None:
            self._faiss_index = self.to_faiss()
        if self.normalize_query_subvectors:  # sum_m <q^m/|q^m|, c^m> is plain ADC on the normalised query
            queries = F.normalize(queries.reshape(queries.shape[0], self.num_codebooks, -1), dim=-1)
            queries = queries.reshape(queries.shape[0], self.dim)
        distances, positions = self._faiss_index.search(np.ascontiguousarray(queries.numpy()), k)
        positions = torch.from_numpy(positions)  # (Q, k), -1 where missing
        found = positions >= 0
        ids = torch.where(found, self.ids[positions.clamp(min=0)], -1)
        scores = torch.where(found, torch.from_numpy(distances), float("-inf"))
        return SearchResult(scores.to(torch.float32), ids)

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
        return decode_codes(self.codes[positions[slots]], self.codebooks)

    def to_faiss(self, with_ids: bool = False) -> faiss.Index:
        """A faiss `IndexPQ(d, M, 8, METRIC_INNER_PRODUCT)` holding these codebooks and codes.

        Its search returns insertion positions; `with_ids=True` wraps it in an `IndexIDMap` returning user
        ids. faiss `IndexPQ` stores 8-bit codes only here, so K must be 256.
        """
        if self.codebook_size != 256:
            raise ValueError(
                f"faiss export needs K=256 codewords per codebook (8-bit codes), got K={self.codebook_size}. "
                "Use the native backend for other codebook sizes."
            )
        faiss = _import_faiss()
        index = faiss.IndexPQ(self.dim, self.num_codebooks, 8, faiss.METRIC_INNER_PRODUCT)
        # pq.centroids is laid out (M, ksub, dsub) row-major, exactly our (M, K, D) codebooks.
        faiss.copy_array_to_vector(self.codebooks.numpy().reshape(-1), index.pq.centroids)
        index.is_trained = True
        wrapped = faiss.IndexIDMap(index) if with_ids else None  # wraps empty indexes only; keeps a reference
        # IndexPQ stores its codes as one flat uint8 vector of ntotal x M bytes: our (N, M) uint8 codes.
        faiss.copy_array_to_vector(np.ascontiguousarray(self.codes.numpy()).reshape(-1), index.codes)
        index.ntotal = self.ntotal
        if wrapped is None:
            return index
        faiss.copy_array_to_vector(self.ids.numpy(), wrapped.id_map)
        wrapped.ntotal = self.ntotal
        return wrapped

    # persistence

    def _metadata(self) -> dict[str, str]:
        num_codebooks, codebook_size, subvector_dim = self.codebooks.shape
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "num_codebooks": str(num_codebooks),
            "codebook_size": str(codebook_size),
            "subvector_dim": str(subvector_dim),
            "ntotal": str(self.ntotal),
            "distance": self.distance,
            "normalize_query_subvectors": json.dumps(self.normalize_query_subvectors),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index as one safetensors file, atomically (temp file in the folder, fsync, rename).

        Missing parent folders are created.
        """
        tensors = {"codebooks": self.codebooks, "codes": self.codes, "ids": self.ids}
        metadata = self._metadata()
        metadata["sha256"] = _checksum(tensors, metadata)
        return write_atomic(path, lambda name: save_file(tensors, name, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "native") -> CodeIndex:
        """Read an index written by `save`; `IndexFormatError` for a truncated, edited or foreign file."""
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
        index = cls(
            tensors["codebooks"],
            distance=metadata["distance"],
            normalize_query_subvectors=json.loads(metadata["normalize_query_subvectors"]),
            backend=backend,
        )
        index._codes, index._ids = tensors["codes"], tensors["ids"]
        return index

    def __repr__(self) -> str:
        return (
            f"CodeIndex(ntotal={self.ntotal}, M={self.num_codebooks}, K={self.codebook_size}, "
            f"dim={self.dim}, distance={self.distance!r}, "
            f"normalize_query_subvectors={self.normalize_query_subvectors}, backend={self.backend!r})"
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


# sidecar: what the ids of an index file are


def sidecar_path(index_path: str | os.PathLike) -> Path:
    """`index.safetensors` -> `index.meta.json`: where the description of an index's items is stored."""
    return Path(index_path).with_suffix(SIDECAR_SUFFIX)


def save_sidecar(
    index_path: str | os.PathLike,
    *,
    model: str | os.PathLike,
    data: Mapping[str, Any],
    ids: Sequence[int],
    labels: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
    paths: Sequence[str | None] | None = None,
) -> Path:
    """Describe the items of an index file in a JSON file next to it (`sidecar_path`), written atomically.

    The index holds only codes and ids; the sidecar says what the ids stand for, so that a search can print
    labels and file paths and reload the retrieved images. `load_sidecar` reads it back.

    Args:
        index_path: the index file the sidecar belongs to.
        model: the model the codes were made with: a folder (stored as an absolute path) or a Hub id.
        data: how to reload the indexed images, e.g. `data.DataSource.to_dict()`.
        ids: the index's ids, in insertion order.
        labels: one label per id (a class id or a multi-hot list); None for unlabelled images.
        class_names: the names of the class ids, if known.
        paths: one image file path per id (None for images stored as bytes); stored only if any is set.
    """
    model_folder = Path(model).expanduser()
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "model": str(model_folder.resolve()) if model_folder.is_dir() else str(model),
        "data": dict(data),
        "class_names": list(class_names) if class_names is not None else None,
        "ids": [int(item) for item in ids],
        "labels": list(labels) if labels is not None else None,
        "paths": list(paths) if paths is not None and any(paths) else None,
    }
    return write_json(sidecar_path(index_path), sidecar, indent=None)


def load_sidecar(index_path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar written by `save_sidecar` for `index_path`, or None when there is none.

    Raises `ValueError` when the file is damaged or is not a mecoq index sidecar.
    """
    path = sidecar_path(index_path)
    if not path.is_file():
        return None
    sidecar = read_json(path, "Index sidecar")
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not a mecoq index sidecar (format {SIDECAR_FORMAT!r} expected).")
    return sidecar


__all__ = [
    "BACKENDS",
    "DISTANCES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "CodeIndex",
    "IndexFormatError",
    "SearchResult",
    "load_sidecar",
    "save_sidecar",
    "sidecar_path",
]
