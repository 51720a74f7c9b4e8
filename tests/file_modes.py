"""File permissions in tests: run code under a given umask, and list what that umask does not explain.

Plain functions and constants, imported as `from file_modes import ...` (`tests/` is on `sys.path`, see
`conftest.py`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

# A private folder (owner only) and a folder shared with the group: files 0600 / 0664, folders 0700 / 0775.
UMASKS = (0o077, 0o002)


@contextlib.contextmanager
def process_umask(umask: int) -> Iterator[None]:
    """Set the process umask for the duration of the block and restore the previous one."""
    previous = os.umask(umask)
    try:
        yield
    finally:
        os.umask(previous)


def modes_not_following(umask: int, *roots: str | os.PathLike) -> dict[str, str]:
    """`{path: octal mode}` of every file and folder under `roots` not created as `umask` says.

    A file should be `0o666 & ~umask` and a folder `0o777 & ~umask`, as `open` and `mkdir` make them. A root
    that is a file is checked itself; a root folder is checked for its contents only (the test made it).
    Fails when there is nothing to check, so that an empty folder cannot pass.
    """
    paths = [path for root in map(Path, roots) for path in ([root] if root.is_file() else root.rglob("*"))]
    assert paths, f"no files under {[str(root) for root in roots]}"
    wrong = {}
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (0o777 if path.is_dir() else 0o666) & ~umask:
            wrong[str(path)] = oct(mode)
    return wrong
