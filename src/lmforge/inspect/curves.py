"""The training curves, redrawn while a run trains: a trainer callback.

``lmforge.tasks.run`` adds a :class:`CurvePlotter` to every run; it keeps
``<run_dir>/training_curves.png`` (drawn by :func:`lmforge.inspect.plots.plot_training_curves`)
up to date after each evaluation without slowing the training loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lmforge.inspect.plots import plot_training_curves
from lmforge.train.callbacks import Callback


class CurvePlotter(Callback):
    """Redraws ``training_curves.png`` after each evaluation in a low-priority child process, so
    training neither waits for matplotlib nor shares its cores with it. The child starts once
    (matplotlib is imported once), coalesces queued requests, and exits when its parent is gone;
    at the end of fit it is stopped and the final figure is drawn here."""

    def __init__(self, run_dir: str | Path, title: str = ""):
        self.run_dir = Path(run_dir)
        self.title = title
        self._proc: subprocess.Popen | None = None

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def png_path(self) -> Path:
        return self.run_dir / "training_curves.png"

    def on_evaluate(self, trainer, metrics: dict) -> None:
        if not trainer.dist.is_main or not self.metrics_path.exists():
            return
        if self._proc is None or self._proc.poll() is not None:
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "lmforge.inspect.plots", str(self.metrics_path), str(self.png_path),
                     "--title", self.title],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if hasattr(os, "setpriority"):
                    os.setpriority(os.PRIO_PROCESS, self._proc.pid, 19)
            except OSError:
                self._proc = None
                self.draw()
                return
        try:
            self._proc.stdin.write(b"redraw\n")
            self._proc.stdin.flush()
        except OSError:  # the plotter died: the next evaluation starts another
            self._proc = None

    def on_fit_end(self, trainer, result) -> None:
        self.stop()
        if trainer.dist.is_main:
            self.draw()

    def stop(self) -> None:
        """End the child without waiting for queued redraws (SIGTERM: it removes any temp file)."""
        if self._proc is None:
            return
        try:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            if self._proc.stdin:
                self._proc.stdin.close()
        self._proc = None

    def draw(self) -> None:
        if not self.metrics_path.exists():
            return
        try:
            plot_training_curves(self.metrics_path, self.png_path, title=self.title)
        except Exception as e:  # a plot must never stop training
            print(f"warning: could not plot training curves: {e}")
