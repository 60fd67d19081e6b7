"""Callbacks: what runs around the trainer's steps without living in the trainer.

A callback implements any of these hooks (all optional, all receive the trainer):

    on_fit_start(trainer)
    on_step_start(trainer)                    # before the step's micro-batches
    on_step_end(trainer, metrics)             # after the optimizer step (trainer.step is new)
    on_evaluate(trainer, metrics)             # after each validation pass (val_* metrics)
    on_fit_end(trainer, result)               # after the loop (also after an early stop)

A callback may call ``trainer.request_stop()`` to end the run at the next step boundary (with a
checkpoint), as SIGINT does. Others live where their work does: the curve plotter in
``lmforge.inspect.curves``, SFT's sample answers in ``lmforge.tasks.sft``; benchmarks add timers.
"""

from __future__ import annotations


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
