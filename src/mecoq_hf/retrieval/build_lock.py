"""One writer per index file: an exclusive lock next to it (`index.safetensors` -> `index.safetensors.lock`).

`mecoq index build` holds it from before the first shard until the final file is in place; a second build of
the same output is refused at once with the holder's pid (it would otherwise interleave its shards and files
with the first one's). The lock itself is `writer_lock.WriterLock` (an advisory `flock`, released by the
kernel when the holder exits, also after a crash or SIGKILL).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..writer_lock import WriterLock, WriterLocked

LOCK_SUFFIX = ".lock"


class IndexBuildLocked(WriterLocked):
    """Another process is building the same index file."""


def lock_path(index_path: str | os.PathLike) -> Path:
    """`index.safetensors` -> `index.safetensors.lock`."""
    path = Path(index_path)
    return path.with_name(path.name + LOCK_SUFFIX)


class BuildLock(WriterLock):
    """The writer lock of an index file, as a context manager.

    Args:
        index_path: the index file to be written.

    Raises:
        IndexBuildLocked: on `acquire` (or entering the context), when another process holds the lock.
    """

    def __init__(self, index_path: str | os.PathLike) -> None:
        self.index_path = Path(index_path)
        busy = (
            f"Another `mecoq index build` (pid {{pid}}) is writing {self.index_path}: wait for it to finish, "
            "or write to another --output."
        )
        super().__init__(lock_path(index_path), busy, IndexBuildLocked)


__all__ = ["BuildLock", "IndexBuildLocked", "lock_path"]
