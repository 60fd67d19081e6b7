"""Two runs, one folder: the second is refused at once naming the first's pid; a lock left by a
killed process is never in the way. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import faultkit
from lmforge.errors import ConfigError
from lmforge.runlock import LOCK_FILE, RunLock

HOLD = textwrap.dedent("""
    import os, sys, time
    from lmforge.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    if sys.argv[2] == "crash":
        os.kill(os.getpid(), 9)
    time.sleep(120)
""")


def _holder(folder: Path, mode: str = "hold") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True)
    if mode == "hold":
        assert p.stdout.readline().strip() == "held"
    return p


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)
    if p.stdout:
        p.stdout.close()


def test_second_lock_refused_naming_the_holder_then_free_after_exit(tmp_path):
    p = _holder(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=rf"in use by another lmforge run \(pid {p.pid}\)"):
            RunLock(tmp_path / "run").acquire()
    finally:
        _stop(p)
    with RunLock(tmp_path / "run"):  # the kernel dropped the lock with its process
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""


def test_lock_of_a_killed_run_is_stale(tmp_path):
    p = _holder(tmp_path / "run", "crash")
    assert p.wait(timeout=60) == -signal.SIGKILL
    _stop(p)
    assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(p.pid)  # left behind...
    with RunLock(tmp_path / "run"):  # ...and not in the way
        pass


@pytest.mark.slow
def test_second_train_on_a_running_folder_refused_at_once(tmp_path, tiny_yaml):
    """Two ``lmforge train`` processes on one run.out_dir: the first trains on, the second exits
    2 within seconds naming the first's pid, and the first's files are untouched by it."""
    cfg = tiny_yaml("run", train={"max_steps": 100000, "checkpoint_every": 50, "log_every": 50})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "train", "-c", str(cfg), "--quiet"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.is_file() and metrics.stat().st_size) and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        t0 = time.time()
        second = faultkit.cli("train", "-c", cfg, "--quiet", "train.resume=never", cwd=tmp_path)
        faultkit.assert_one_line_error(second, f"pid {first.pid}", str(tmp_path / "run"))
        assert time.time() - t0 < 60
        assert first.poll() is None  # still training
        assert not list(tmp_path.glob("run/checkpoints.*")) and not list(tmp_path.glob("run/metrics.*.jsonl"))
    finally:
        first.send_signal(signal.SIGINT)  # stops at the next step with a checkpoint
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
        first.stderr.close()


def test_pipeline_refused_while_its_folder_is_held(tmp_path, tiny_dict):
    from lmforge.tasks.pipeline import load_pipeline, run_pipeline

    stage = tiny_dict("x")
    stage.pop("run")
    recipe = {"run": {"name": "pipe", "out_dir": str(tmp_path / "pipe")}, **stage,
              "stages": [{"name": "one"}, {"name": "two"}]}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    pipe = load_pipeline(path)
    p = _holder(tmp_path / "pipe")
    try:
        with pytest.raises(ConfigError, match=rf"pid {p.pid}"):
            run_pipeline(pipe, progress=False, print_fn=lambda *a, **k: None)
    finally:
        _stop(p)
    assert not (tmp_path / "pipe" / "one").exists()  # nothing ran
    q = _holder(tmp_path / "pipe" / "two")  # a stage folder in use: the pipeline stops there
    try:
        with pytest.raises(ConfigError, match=rf"pid {q.pid}"):
            run_pipeline(pipe, progress=False, print_fn=lambda *a, **k: None)
    finally:
        _stop(q)
    assert (tmp_path / "pipe" / "one" / "stage_done.json").is_file()
