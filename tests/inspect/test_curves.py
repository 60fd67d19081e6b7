"""lmforge.inspect.curves: the CurvePlotter callback redraws training_curves.png after each
evaluation in a child process and draws the final figure at the end of fit; a SIGKILLed trainer
leaves no plotting process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from lmforge.inspect.curves import CurvePlotter

PNG = b"\x89PNG\r\n\x1a\n"


def _trainer(is_main: bool = True):
    return SimpleNamespace(dist=SimpleNamespace(is_main=is_main))


def _metrics(run, steps: int) -> None:
    rows = [{"step": s, "split": "train", "loss": 3.0 / s} for s in range(1, steps + 1)]
    rows.append({"step": steps, "split": "val", "loss": 2.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plotter_draws_after_evaluations_and_at_the_end(tmp_path):
    plotter = CurvePlotter(tmp_path, title="tiny")
    assert plotter.png_path == tmp_path / "training_curves.png"
    plotter.on_evaluate(_trainer(), {"val_loss": 1.0})  # no metrics yet: nothing starts
    assert plotter._proc is None and not plotter.png_path.exists()
    _metrics(tmp_path, 5)
    plotter.on_evaluate(_trainer(), {"val_loss": 1.0})
    child = plotter._proc
    assert child is not None and child.poll() is None  # a child process does the redraws
    plotter.on_evaluate(_trainer(), {"val_loss": 1.0})
    assert plotter._proc is child  # started once, reused
    plotter.on_fit_end(_trainer(), result=None)
    assert plotter._proc is None and child.poll() is not None  # stopped at the end of fit
    assert plotter.png_path.read_bytes().startswith(PNG)  # and the final figure drawn here
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file


def test_plotter_of_another_rank_does_nothing(tmp_path):
    _metrics(tmp_path, 3)
    plotter = CurvePlotter(tmp_path)
    plotter.on_evaluate(_trainer(is_main=False), {})
    plotter.on_fit_end(_trainer(is_main=False), result=None)
    assert plotter._proc is None and not plotter.png_path.exists()


def test_the_curve_plotter_dies_with_its_parent(tmp_path):
    """A SIGKILLed trainer leaves no plotting process behind."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'lmforge.inspect.plots', r'{tmp_path / 'metrics.jsonl'}', "
        f"r'{tmp_path / 'c.png'}'], stdin=subprocess.PIPE)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
        try:  # reap it if it became our zombie (it does not: init adopts it)
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
    os.kill(child, signal.SIGKILL)
    pytest.fail("the plotter outlived its parent by more than 20 s")
