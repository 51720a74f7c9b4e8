"""Safe reads and writes of the package's small files: split records, index sidecars, metrics, encoded codes.

A write goes to a temporary file in the target folder, is flushed to disk, then renamed onto the target
(`os.replace`), so a reader sees the complete old file or the complete new one, never a half-written file.
A JSON read that fails names the file and what it was supposed to be, instead of a bare `JSONDecodeError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(temp_path)`, fsync the result, then rename it onto `path`: the file is complete or absent.

    Args:
        path: the file to create or replace; its parent folders are created.
        write: writes the whole content to the temporary path it is given (e.g. `safetensors.torch.save_file`).

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_name)
        with open(temp_name, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; the file is as readable as any other output
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> Path:
    """Write `payload` as JSON (plus a final newline) with `write_atomic`; `indent=None` for one line."""
    text = json.dumps(payload, indent=indent) + "\n"
    return write_atomic(path, lambda name: Path(name).write_text(text))


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of a JSON file; `ValueError` naming `what` (e.g. "Split record") if it is damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} {path} is not valid JSON ({error}); it was damaged or edited by hand."
        ) from error


__all__ = ["read_json", "write_atomic", "write_json"]
