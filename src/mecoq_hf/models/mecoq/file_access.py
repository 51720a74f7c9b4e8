"""Writing files atomically with the modes the user's umask asks for, and reads that say why they fail.

- `write_atomic` writes to a temporary file in the target folder, fsyncs it, gives it the mode `open` would
  (`0o666 & ~umask`; temporary files and `safetensors` start at 0600), and renames it onto the target: a
  reader sees the complete old file or the complete new one. A failed write leaves no temporary file behind.
- `apply_umask` gives files that other libraries wrote (accelerate's checkpoints, `safetensors.save_file`)
  those same modes, so a model folder shared with a group is readable by it and a private one stays private.
- `check_readable` tells "permission denied" from "does not exist": `Path.is_file()`, `os.path.isdir()` and
  `safetensors` report an unreadable file as missing.

Part of the `trust_remote_code` closure: the rest of the package uses it through `mecoq_hf.file_io`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import pwd
except ImportError:  # pragma: no cover - Windows has no user database
    pwd = None

READ_ACCESS_FIX = (
    "Ask the owner for read access (for a group: `chmod -R g+rX` on the model or data folder), or copy the "
    "files to a folder you can read."
)


# modes


def _umask_from_proc() -> int | None:
    """The process umask from `/proc/self/status` (Linux >= 4.7) without changing it; None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    """The process umask by setting it and setting it back (another thread's file may get 0o077 meanwhile)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def current_umask() -> int:
    """The process umask, e.g. 0o022."""
    umask = _umask_from_proc()
    return _umask_by_setting() if umask is None else umask


def file_mode() -> int:
    """The mode `open` gives a new file: 0o666 & ~umask (0o644 under umask 022, 0o600 under 077)."""
    return 0o666 & ~current_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` and everything under it the modes the umask asks for: files 0o666, folders 0o777 & ~umask.

    For files written by code that ignores the umask (`safetensors.torch.save_file` creates 0600 files);
    execute bits of files are dropped (model folders and checkpoints hold none).
    """
    umask = current_umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


# writing


def _fsync_folder(folder: Path) -> None:
    """Persist a rename in `folder` (best effort: some file systems cannot open or fsync a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(temp_path)`, fsync the result, then rename it onto `path`: the file is complete or absent.

    Args:
        path: the file to create or replace; its parent folders are created.
        write: writes the whole content to the temporary path it is given, e.g.
            `lambda name: safetensors.torch.save_file(tensors, name)`.

    Returns:
        `path` as a `Path`, with mode 0o666 & ~umask whatever `write` created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_name)
        with open(temp_name, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp_name, file_mode())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


# reading


def _user_name(uid: int | None) -> str:
    try:
        return pwd.getpwuid(uid).pw_name if pwd is not None and uid is not None else f"uid {uid}"
    except KeyError:
        return f"uid {uid}"


def _denied(path: Path, what: str, status: os.stat_result | None) -> PermissionError:
    """The "permission denied" error for `path`, with its mode and owner when they can be seen."""
    where = (
        f"mode {stat.filemode(status.st_mode)}, owner {_user_name(status.st_uid)}"
        if status is not None
        else "a folder above it is closed to this user"
    )
    user = _user_name(os.geteuid() if hasattr(os, "geteuid") else None)
    return PermissionError(
        f"Cannot read {what.lower()} {path}: permission denied for user {user} ({where}). {READ_ACCESS_FIX}"
    )


def check_readable(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    """Check that `path` (a file or a folder) exists and can be read; return it as a `Path`.

    Args:
        path: the file or folder about to be read.
        what: what it is, for the message, e.g. "Model folder" or "Index file".
        fix: what to do when it does not exist, in the caller's terms (e.g. the command that writes it).

    Raises:
        FileNotFoundError: `path` does not exist ("... does not exist. <fix>").
        PermissionError: `path`, or a folder above it, may not be read by this user ("permission denied").
    """
    path = Path(path)
    status = None
    try:
        status = os.stat(path)
        if stat.S_ISDIR(status.st_mode):
            os.stat(os.path.join(path, os.curdir))  # needs search (x) permission on the folder
            with os.scandir(path):  # needs read (r) permission
                pass
        else:
            with open(path, "rb"):
                pass
    except PermissionError as error:
        raise _denied(path, what, status) from error
    except (FileNotFoundError, NotADirectoryError) as error:
        raise FileNotFoundError(f"{what} {path} does not exist. {fix}".strip()) from error
    return path


__all__ = ["apply_umask", "check_readable", "current_umask", "file_mode", "write_atomic"]
