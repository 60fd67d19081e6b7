"""lmforge.runlock: a folder held by another live process is refused naming its pid; the lock of
a process that died (kill -9) is never in the way; release leaves the file, empty. Real processes."""

from __future__ import annotations

import os
import signal

import pytest

from lmforge.errors import ConfigError
from lmforge.runlock import LOCK_FILE, RunLock
from tests.faults import faultkit


def test_second_lock_refused_naming_the_holder_then_free_after_exit(tmp_path):
    p = faultkit.lock_holder(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=rf"in use by another lmforge run \(pid {p.pid}\)"):
            RunLock(tmp_path / "run").acquire()
    finally:
        faultkit.stop(p)
    with RunLock(tmp_path / "run"):  # the kernel dropped the lock with its process
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""


def test_lock_of_a_killed_run_is_stale(tmp_path):
    p = faultkit.lock_holder(tmp_path / "run", "crash")
    assert p.wait(timeout=60) == -signal.SIGKILL
    faultkit.stop(p)
    assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(p.pid)  # left behind...
    with RunLock(tmp_path / "run"):  # ...and not in the way
        pass


def test_the_same_process_cannot_take_it_twice(tmp_path):
    """flock locks belong to open files: a second RunLock in one process is a second run too."""
    with RunLock(tmp_path / "run"):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()


def test_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises((ConfigError, NotADirectoryError, FileExistsError)):
        RunLock(tmp_path / "file" / "run").acquire()
