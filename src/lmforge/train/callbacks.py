"""Callbacks: what runs around the trainer's steps without living in the trainer.

A callback implements any of these hooks (all optional, all receive the trainer):

    on_fit_start(trainer)
    on_step_start(trainer)                    # before the step's micro-batches
    on_step_end(trainer, metrics)             # after the optimizer step (trainer.step is new)
    on_evaluate(trainer, metrics)             # after each validation pass (val_* metrics)
    on_fit_end(trainer, result)               # after the loop (also after an early stop)

A callback may call ``trainer.request_stop()`` to end the run at the next step boundary (with a
checkpoint), as SIGINT does. The curve plotter below is one; benchmarks add timers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class Callback:
    def on_fit_start(self, trainer) -> None: ...
    def on_step_start(self, trainer) -> None: ...
    def on_step_end(self, trainer, metrics: dict) -> None: ...
    def on_evaluate(self, trainer, metrics: dict) -> None: ...
    def on_fit_end(self, trainer, result) -> None: ...


class StopAtStep(Callback):
    """Ends the run after step ``step`` as SIGINT would (a checkpoint, then ``resume=auto``
    continues it): the way to test and demonstrate exact resume."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, metrics: dict) -> None:
        if trainer.step == self.step:
            trainer.request_stop()


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
        from lmforge.inspect.plots import plot_training_curves

        try:
            plot_training_curves(self.metrics_path, self.png_path, title=self.title)
        except Exception as e:  # a plot must never stop training
            print(f"warning: could not plot training curves: {e}")
