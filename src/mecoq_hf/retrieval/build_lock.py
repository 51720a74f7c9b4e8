"""One writer per index file: an exclusive lock next to it (`index.safetensors` -> `index.safetensors.lock`).

`mecoq index build` holds it from before the first shard until the final file is in place; a second build of
the same output is refused at once with the holder's pid (it would otherwise interleave its shards and files
with the first one's). The lock is an advisory `fcntl.flock` on the lock file, released by the kernel when
the holder exits, also after a crash or SIGKILL, so a stale lock file never blocks a later build.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, concurrent builds are not detected
    fcntl = None

LOCK_SUFFIX = ".lock"


class IndexBuildLocked(ValueError):
    """Another process is building the same index file."""


def lock_path(index_path: str | os.PathLike) -> Path:
    """`index.safetensors` -> `index.safetensors.lock`."""
    path = Path(index_path)
    return path.with_name(path.name + LOCK_SUFFIX)


class BuildLock:
    """An exclusive, non-blocking writer lock of an index file, as a context manager.

    Args:
        index_path: the index file to be written.

    Raises:
        IndexBuildLocked: on `acquire` (or entering the context), when another process holds the lock.
    """

    def __init__(self, index_path: str | os.PathLike) -> None:
        self.index_path = Path(index_path)
        self.path = lock_path(index_path)
        self._handle: int | None = None

    def acquire(self) -> BuildLock:
        if fcntl is None:  # pragma: no cover
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_pid(handle)
                os.close(handle)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise IndexBuildLocked(
                    f"Another `mecoq index build` (pid {holder or 'unknown'}) is writing {self.index_path}: "
                    "wait for it to finish, or write to another --output."
                ) from None
            # The holder before us may have removed the file after we opened it: lock the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(handle)
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
        finally:
            os.close(self._handle)  # releases the flock
            self._handle = None

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(handle: int) -> str | None:
    try:
        return os.pread(handle, 32, 0).decode().strip() or None
    except OSError:
        return None


__all__ = ["BuildLock", "IndexBuildLocked", "lock_path"]
