"""lmforge.train.callbacks: a callback sees every step and evaluation of the trainer."""

from __future__ import annotations

from lmforge.train.callbacks import Callback
from tests.train.toy_fit import fit_toy


def test_callbacks_see_every_step_and_evaluation(tmp_path):
    class Record(Callback):
        def __init__(self):
            self.events = []

        def on_fit_start(self, trainer):
            self.events.append("start")

        def on_step_end(self, trainer, metrics):
            self.events.append(f"step{trainer.step}")
            if trainer.step == 2:
                trainer.request_stop()

        def on_evaluate(self, trainer, metrics):
            self.events.append(f"eval{sorted(metrics)}")

        def on_fit_end(self, trainer, result):
            self.events.append(f"end{result.step}")

    rec = Record()
    _, result, _ = fit_toy(tmp_path, 4, 1, steps=5, callbacks=[rec])
    assert result.stopped_early and result.step == 2
    assert rec.events == ["start", "step1", "step2", "end2"]
    rec2 = Record()
    fit_toy(tmp_path / "b", 4, 1, steps=1, callbacks=[rec2])
    assert rec2.events == ["start", "step1", "eval['val_toy_metric']", "end1"]
