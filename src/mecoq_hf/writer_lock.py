"""One writer at a time: an exclusive, non-blocking lock file next to what is being written.

An index build holds `index.safetensors.lock` (`retrieval.build_lock`); a training run holds
`.mecoq-train.lock` inside its output folder (`training.RunFolder.writer_lock`). A second writer is refused
at once with the holder's pid, instead of interleaving its files with the first one's. The lock is an advisory
`fcntl.flock` on the lock file, released by the kernel when the holder exits, also after a crash or SIGKILL,
so a stale lock file never blocks a later writer.

Within one process the lock nests: taking it again while this process holds it (the CLI around a library
call that locks too) succeeds and releasing the inner one keeps the outer one. The holder is recognised by the
pid it writes into the lock file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, concurrent writers are not detected
    fcntl = None


class WriterLocked(ValueError):
    """Another process holds the writer lock."""


class WriterLock:
    """An exclusive, non-blocking writer lock, as a context manager.

    Args:
        path: the lock file (created, and removed again on release).
        busy: the message when another process holds it, where `{pid}` stands for the holder's pid.
        error: the exception class raised then (a `WriterLocked`).

    Raises:
        WriterLocked (or `error`): on `acquire` (or entering the context), when another process holds it.
    """

    def __init__(self, path: str | os.PathLike, busy: str, error: type[WriterLocked] = WriterLocked) -> None:
        self.path = Path(path)
        self.busy, self.error = busy, error
        self._handle: int | None = None

    def acquire(self) -> WriterLock:
        if fcntl is None:  # pragma: no cover
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as failure:
                holder = _read_pid(handle)
                os.close(handle)
                if failure.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if holder == str(os.getpid()):
                    return self  # this process holds it already (nested): the outer holder releases it
                raise self.error(self.busy.replace("{pid}", holder or "unknown")) from None
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

    def __enter__(self) -> WriterLock:
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


__all__ = ["WriterLock", "WriterLocked"]
