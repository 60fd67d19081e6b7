"""Resuming with another train.max_steps says so (issue 24, item 9): the learning-rate schedule
follows the new value, which a user should not discover from the curves."""

from __future__ import annotations

from lmforge.tasks.run import run
from lmforge.train.callbacks import StopAtStep


def test_resume_with_another_max_steps_says_so(tiny_config):
    said: list[str] = []
    first = run(tiny_config("r", train={"max_steps": 6}), progress=False, print_fn=said.append,
                callbacks=[StopAtStep(3)])
    assert first["stopped_early"] and not any("max_steps" in s for s in said)
    said.clear()
    second = run(tiny_config("r", train={"max_steps": 8}), progress=False, print_fn=said.append)
    assert second["steps"] == 8
    notes = [s for s in said if s.startswith("note: train.max_steps")]
    assert notes == ["note: train.max_steps is 8 now but 6 in the checkpoint resumed from; the learning-rate "
                     "schedule follows 8 from step 3 on"], said


def test_resume_with_the_same_max_steps_is_silent(tiny_config):
    said: list[str] = []
    run(tiny_config("s"), progress=False, print_fn=said.append, callbacks=[StopAtStep(2)])
    said.clear()
    run(tiny_config("s"), progress=False, print_fn=said.append)
    assert any(s.startswith("resumed from") for s in said) and not any("max_steps" in s for s in said)
