"""A sha256 of a safetensors file's data section, kept in its own header metadata, to refuse damaged weights.

`save_pretrained` records it (`add_weights_checksum`); `from_pretrained` checks the file's length and the
digest before transformers reads the tensors (`verify_weights_checksum`), so a truncated download or an
edited file fails with a message naming the file instead of loading wrong weights. Files saved without a
digest (other tools, older versions) are only checked for their length.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from .file_access import check_readable, write_atomic

WEIGHTS_CHECKSUM_KEY = "mecoq_sha256"
_FIX = "Download it again (delete the cached copy) or re-save the model with `save_pretrained`."


def _read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse a safetensors header; returns (header, offset of the data section)."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        header_length = int.from_bytes(prefix, "little")
        raw = file.read(header_length)
    if len(raw) < header_length:
        raise ValueError(f"header of {header_length} bytes announced, only {len(raw)} present")
    return json.loads(raw), 8 + header_length


def _data_sha256(path: str | os.PathLike, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(offset)
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_weights_checksum(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file with the sha256 of its data section in the header metadata (atomically)."""
    header, offset = _read_safetensors_header(path)
    header.setdefault("__metadata__", {})[WEIGHTS_CHECKSUM_KEY] = _data_sha256(path, offset)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data section 8-byte aligned, as safetensors does

    def write(temporary: str) -> None:
        with open(temporary, "wb") as target, open(path, "rb") as source:
            target.write(len(encoded).to_bytes(8, "little") + encoded)
            source.seek(offset)
            shutil.copyfileobj(source, target)

    write_atomic(path, write)


def verify_weights_checksum(path: str | os.PathLike) -> None:
    """Check a safetensors file's length and recorded sha256.

    Raises:
        PermissionError: the file may not be read by this user.
        ValueError: naming the file, when it is truncated, not safetensors, or altered since it was saved.
    """
    check_readable(path, "Weights file", _FIX)
    try:
        header, offset = _read_safetensors_header(path)
        data_end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}). {_FIX}") from error
    size = os.path.getsize(path)
    if size != offset + data_end:
        raise ValueError(
            f"{path} is truncated or padded: expected {offset + data_end} bytes, found {size}. {_FIX}"
        )
    expected = (header.get("__metadata__") or {}).get(WEIGHTS_CHECKSUM_KEY)
    if expected is not None and _data_sha256(path, offset) != expected:
        raise ValueError(
            f"{path} was altered after it was saved: its sha256 does not match the recorded one. {_FIX}"
        )


__all__ = ["WEIGHTS_CHECKSUM_KEY", "add_weights_checksum", "verify_weights_checksum"]
