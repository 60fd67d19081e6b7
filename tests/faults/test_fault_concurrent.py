"""Two runs, one folder, end to end: a second ``lmforge train`` and a multi-stage recipe on a folder
in use are refused at once naming the holder's pid (the lock itself: tests/test_runlock.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lmforge.errors import ConfigError
from tests.faults import faultkit


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
    p = faultkit.lock_holder(tmp_path / "pipe")
    try:
        with pytest.raises(ConfigError, match=rf"pid {p.pid}"):
            run_pipeline(pipe, progress=False, print_fn=lambda *a, **k: None)
    finally:
        faultkit.stop(p)
    assert not (tmp_path / "pipe" / "one").exists()  # nothing ran
    q = faultkit.lock_holder(tmp_path / "pipe" / "two")  # a stage folder in use: the pipeline stops there
    try:
        with pytest.raises(ConfigError, match=rf"pid {q.pid}"):
            run_pipeline(pipe, progress=False, print_fn=lambda *a, **k: None)
    finally:
        faultkit.stop(q)
    assert (tmp_path / "pipe" / "one" / "stage_done.json").is_file()
