"""A real second process holding a writer lock, for the tests of concurrent writers.

with lock_held_elsewhere(path) as pid:   # another Python process holds `path` until the block ends
    ...
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_HOLD = """
import sys
from mecoq_hf.writer_lock import WriterLock
with WriterLock(sys.argv[1], busy="held"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@contextlib.contextmanager
def lock_held_elsewhere(path: str | Path) -> Iterator[int]:
    """Hold the `WriterLock` of `path` in a child process for the duration of the block; yields its pid."""
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child.pid
    finally:
        child.stdin.close()
        child.wait(timeout=30)
