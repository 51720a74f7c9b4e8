"""writer_lock.WriterLock: one writer across processes, nesting within one process, no stale locks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lock_holder import lock_held_elsewhere

from mecoq_hf.writer_lock import WriterLock, WriterLocked


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    path = tmp_path / "run" / ".lock"
    with lock_held_elsewhere(path) as pid:
        with pytest.raises(WriterLocked, match=f"busy: pid {pid}"):
            WriterLock(path, busy="busy: pid {pid}").acquire()
    with WriterLock(path, busy="busy") as lock:  # free again once the holder is gone
        assert path.read_text().strip() == str(os.getpid()) and lock.path == path
    assert not path.exists()


def test_the_lock_nests_within_one_process(tmp_path):
    path = tmp_path / ".lock"
    with WriterLock(path, busy="busy"):
        with WriterLock(path, busy="busy"):
            pass
        assert path.exists()  # the inner release keeps the outer lock
        probe = "import sys\nfrom mecoq_hf.writer_lock import WriterLock\n"
        probe += "WriterLock(sys.argv[1], 'busy').acquire()"
        result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
        assert result.returncode == 1 and "WriterLocked: busy" in result.stderr
    assert not path.exists()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    path = tmp_path / ".lock"
    hold = "import sys, os, signal\nfrom mecoq_hf.writer_lock import WriterLock\n"
    hold += "WriterLock(sys.argv[1], 'busy').acquire()\nos.kill(os.getpid(), signal.SIGKILL)"
    subprocess.run([sys.executable, "-c", hold, str(path)])
    assert path.exists()  # the file stays, the kernel dropped the flock with the process
    with WriterLock(path, busy="busy"):
        assert path.read_text().strip() == str(os.getpid())
