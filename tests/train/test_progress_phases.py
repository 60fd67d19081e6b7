"""Long phases show progress and ETAs settle (issue 24, item 7): the ETA is timed from the end of
the first (warm-up) step; a Phase prints start, periodic done/total with an ETA, and its end; a
step's reward shows on the progress line."""

from __future__ import annotations

import pytest

from lmforge.train import logging as log
from lmforge.train.logging import PROGRESS_EXTRAS, Phase, Progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(log.time, "perf_counter", c)
    return c


def test_eta_counts_from_the_end_of_the_slow_first_step(clock, capsys):
    p = Progress(total_steps=10, print_every=1)
    clock.t += 100.0  # the first step: warm-up, first generation
    p.update(1, loss=1.0, lr=1e-3, tokens_per_s=10.0)
    for step in range(2, 4):
        clock.t += 1.0  # steady steps
        p.update(step, loss=1.0, lr=1e-3, tokens_per_s=10.0, reward=0.625)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step")]
    assert "eta ? (after the first step)" in lines[0]
    assert lines[-1].endswith("eta 7s")  # 7 steps left at 1 s each, not (102 s / 3 steps) * 7
    assert "elapsed 1m42s" in lines[-1] and "reward 0.625" in lines[-1]
    assert "reward" in PROGRESS_EXTRAS


def test_phase_prints_start_periodic_eta_and_end(clock):
    said = []
    phase = Phase("test answers", 110, said.append, every=10.0, unit="prompts")
    assert said == ["test answers: 110 prompts ..."]
    for _ in range(10):  # 10 prompts per 5 s
        clock.t += 5.0
        phase.advance(10)
    assert said[1] == "test answers: 20/110 prompts (10s, eta 45s)"
    assert len(said) == 6  # one line every 10 s
    clock.t += 5.0
    phase.advance(10)
    phase.end()
    phase.end()  # once only
    assert said[-1] == "test answers: 110 prompts in 55s" and len(said) == 7


def test_phase_track_sizes_batches_and_ends_after_the_last(clock):
    said = []
    batches = [[0] * 4, [0] * 4, [0] * 2]
    got = []
    for b in Phase("test loss", 10, said.append, every=0.0, unit="examples").track(batches, size=len):
        clock.t += 1.0
        got.append(b)
    assert got == batches
    assert said == ["test loss: 10 examples ...", "test loss: 4/10 examples (1s, eta 2s)",
                    "test loss: 8/10 examples (2s, eta 0s)", "test loss: 10 examples in 3s"]
    silent = Phase("quiet", 3, None)
    list(silent.track([1, 2, 3]))
    assert silent.done == 3
