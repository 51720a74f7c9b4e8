"""Safe reads and writes of the package's files: split records, index sidecars, metrics, codes, figures.

Every file the package writes goes through `write_atomic`: a temporary file in the target folder, flushed
to disk, given the mode the user's umask asks for (0o666 & ~umask), then renamed onto the target
(`os.replace`), so a reader sees the complete old file or the complete new one, never a half-written file.
`apply_umask` gives folders other libraries wrote (accelerate's checkpoints) the same modes. The one
implementation lives in the model closure (`models/mecoq/file_access.py`, which must not import this
package) and is re-exported here.

A read that fails names the file and what it was supposed to be: `check_readable` tells "permission
denied" from "does not exist", and a damaged JSON file raises a `ValueError` instead of a bare
`JSONDecodeError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .models.mecoq.file_access import apply_umask, check_readable, current_umask, file_mode, write_atomic


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` with `write_atomic`."""
    return write_atomic(path, lambda name: Path(name).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> Path:
    """Write `payload` as JSON (plus a final newline) with `write_atomic`; `indent=None` for one line."""
    return write_text(path, json.dumps(payload, indent=indent) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of a JSON file.

    Raises:
        FileNotFoundError / PermissionError: the file does not exist / may not be read (`check_readable`).
        ValueError: naming `what` (e.g. "Split record") when the file is damaged.
    """
    path = check_readable(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} {path} is not valid JSON ({error}); it was damaged or edited by hand."
        ) from error


__all__ = [
    "apply_umask",
    "check_readable",
    "current_umask",
    "file_mode",
    "read_json",
    "write_atomic",
    "write_json",
    "write_text",
]
