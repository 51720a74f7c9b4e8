"""The bytes of a `CodeIndex` file: safetensors with a format header and one sha256 over everything.

A file is one unit: codebooks, codes, ids, the description of the items (labels, image paths, the model and
the data source) and any backend state (e.g. the IVF lists) are tensors or header entries of the same file,
and the checksum in the header covers all of them, so a reader cannot pair codes with another build's
labels, and a hand edit anywhere is refused.

Format version 2 (this one) is written by `write_index_file` from tensors given as *chunks*, streamed to disk
in a fixed order while the checksum is computed; the header is written first with a placeholder and patched
with the digest at the end, so a database larger than memory is written shard by shard. `read_index_file`
memory-maps the file (`safe_open`), checks the format, the checksum and the tensor shapes, and also reads
version 1 files (codebooks, codes, ids; their items were described by a JSON sidecar, `sidecar.py`).

Checksum (version 2): sha256 of the header entries as sorted JSON (without "sha256"), then for each tensor in
name order `name|dtype|shape|` and its raw little-endian bytes. Version 1 hashed the three tensors in the
order codebooks, codes, ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..file_io import check_readable, write_atomic

FORMAT_NAME = "mecoq-hf/code-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
VERSION_1_TENSORS = ("codebooks", "codes", "ids")
_PLACEHOLDER = "0" * 64  # the sha256 hex digest is patched over it once the data has been hashed

_SAFETENSORS_DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float32: "F32",
}


class IndexFormatError(ValueError):
    """An index file is not a complete, unmodified `CodeIndex` file of a supported version."""


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its dtype and shape, and a function yielding its rows as chunks, in order.

    The chunks' concatenation along the first dimension must have exactly `shape`; `chunks` is called once.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorPlan:
        """The plan of one in-memory tensor."""
        return cls(tensor.dtype, tuple(tensor.shape), lambda: [tensor])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty(0, dtype=self.dtype).element_size()


def _tensor_digest_prefix(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    return f"{name}|{dtype}|{tuple(shape)}|".encode()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.uint8).reshape(-1).numpy().data if tensor.numel() else memoryview(b"")


def _header(plans: Mapping[str, TensorPlan], metadata: Mapping[str, str]) -> bytes:
    """The safetensors header (8-byte length + JSON padded to 8 bytes) for tensors laid out in name order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(plans):
        plan = plans[name]
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[plan.dtype],
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_index_file(
    path: str | os.PathLike, plans: Mapping[str, TensorPlan], metadata: Mapping[str, str]
) -> Path:
    """Write a version-2 index file atomically, streaming every tensor's chunks; returns the path.

    Args:
        path: the file to create or replace (parent folders are created).
        plans: tensor name -> `TensorPlan`; dtypes among uint8, int8, int16, int32, int64, float32.
        metadata: string header entries, without "format", "format_version" and "sha256" (added here).

    Memory: one chunk at a time (plus the header), whatever the file size.
    """
    header = {**metadata, "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    unsupported = sorted(name for name, plan in plans.items() if plan.dtype not in _SAFETENSORS_DTYPES)
    if unsupported:
        raise TypeError(f"Index tensors {unsupported} have dtypes the index file cannot store.")
    placeholder = _header(plans, {**header, "sha256": _PLACEHOLDER})

    def write(name: str) -> None:
        with open(name, "wb") as file:
            file.write(placeholder)
            for tensor_name in sorted(plans):
                plan = plans[tensor_name]
                digest.update(_tensor_digest_prefix(tensor_name, plan.dtype, plan.shape))
                written = 0
                for chunk in plan.chunks():
                    if chunk.dtype != plan.dtype:
                        raise TypeError(f"A chunk of {tensor_name} is {chunk.dtype}, expected {plan.dtype}.")
                    data = _raw_bytes(chunk)
                    digest.update(data)
                    file.write(data)
                    written += len(data)
                assert written == plan.nbytes, f"{tensor_name}: wrote {written} bytes, planned {plan.nbytes}"
            final = _header(plans, {**header, "sha256": digest.hexdigest()})
            assert len(final) == len(placeholder)
            file.seek(0)
            file.write(final)

    return write_atomic(path, write)


@dataclass(frozen=True)
class IndexFile:
    """The checked content of an index file: its header entries and its tensors (memory-mapped views)."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]

    @property
    def version(self) -> int:
        return int(self.metadata["format_version"])


def read_index_file(path: str | os.PathLike, *, verify: bool = True) -> IndexFile:
    """Open an index file (version 1 or 2), check its format and, with `verify`, its sha256.

    `safe_open` memory-maps the file privately (copy-on-write) and `get_tensor` returns views of that map,
    so the tensors are not read into a second in-memory copy; pages load lazily as the checksum (and later
    searches) touch them.

    Raises:
        FileNotFoundError / PermissionError: the file is missing / unreadable.
        IndexFormatError: a truncated, edited or foreign file, or an unsupported version.
    """
    path = check_readable(path, "Index file", "Build it with `mecoq index build` or `CodeIndex.save`.")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = dict(file.metadata() or {})
            _check_format(metadata, path)
            names = set(file.keys())
            if metadata["format_version"] == "1" and names != set(VERSION_1_TENSORS):
                raise IndexFormatError(f"{path} holds tensors {sorted(names)}, expected {VERSION_1_TENSORS}.")
            tensors = {name: file.get_tensor(name) for name in sorted(names)}
    except SafetensorError as error:
        raise IndexFormatError(
            f"{path} is not a readable safetensors file (truncated or damaged?): {error}"
        ) from error
    if verify and checksum(tensors, metadata) != metadata["sha256"]:
        raise IndexFormatError(
            f"{path} fails its sha256 checksum: the file was modified or damaged. Rebuild it with "
            "`mecoq index build` (or re-save it from the data it was made from)."
        )
    return IndexFile(path, metadata, tensors)


def checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The sha256 a file of this version records for these tensors and header entries ("sha256" ignored)."""
    header = {key: value for key, value in metadata.items() if key != "sha256"}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    names = VERSION_1_TENSORS if metadata.get("format_version") == "1" else sorted(tensors)
    for name in names:
        tensor = tensors[name]
        digest.update(_tensor_digest_prefix(name, tensor.dtype, tuple(tensor.shape)))
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def _check_format(metadata: Mapping[str, str], path: Path) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path} is not a CodeIndex file (format={metadata.get('format')!r}).")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise IndexFormatError(
            f"{path} has format version {metadata.get('format_version')}, this mecoq-hf reads versions "
            f"{', '.join(READABLE_VERSIONS)}. Upgrade mecoq-hf or re-create the index."
        )
    if "sha256" not in metadata:
        raise IndexFormatError(f"{path} lacks its sha256 checksum; the header was edited or damaged.")


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IndexFile",
    "IndexFormatError",
    "TensorPlan",
    "checksum",
    "read_index_file",
    "write_index_file",
]
