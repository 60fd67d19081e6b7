"""Threads on shared cores (issue 24, item 2): a load average at or above the cores drops training
to one thread and says so with the override; a pinned OMP_NUM_THREADS is kept and only warned about."""

from __future__ import annotations

import pytest
import torch

from lmforge import perf
from lmforge.perf import fit_threads_to_load, plan_threads


@pytest.mark.parametrize("load,cores,threads,pinned,expected", [
    (0.3, 2, 2, False, 2),   # idle: keep
    (1.9, 2, 2, False, 2),   # busy but not full: keep
    (2.0, 2, 2, False, 1),   # every core taken by others: one thread
    (5.2, 2, 2, False, 1),
    (5.2, 2, 2, True, 2),    # OMP_NUM_THREADS pins the count
    (5.2, 2, 1, False, 1),   # already one thread: nothing to say
    (9.0, 8, 8, False, 1),
])
def test_plan_threads(load, cores, threads, pinned, expected):
    got, note = plan_threads(load, cores, threads, pinned)
    assert got == expected
    if load >= cores and threads > 1:
        assert f"load average {load:.1f} on {cores} cores" in note
        assert f"OMP_NUM_THREADS={1 if pinned else threads}" in note
    else:
        assert note is None


@pytest.fixture
def two_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(perf, "cpu_cores", lambda: 2)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_busy_machine_trains_on_one_thread_and_says_how_to_keep_two(two_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    said = []
    assert fit_threads_to_load(said.append, load=4.5) == 1
    assert torch.get_num_threads() == 1
    assert len(said) == 1 and "1 thread instead of 2" in said[0] and "OMP_NUM_THREADS=2 keeps 2" in said[0]


def test_pinned_threads_are_kept_on_a_busy_machine(two_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    said = []
    assert fit_threads_to_load(said.append, load=4.5) == 2 and torch.get_num_threads() == 2
    assert "OMP_NUM_THREADS=1" in said[0]
    said.clear()
    assert fit_threads_to_load(said.append, load=0.2) == 2 and said == []


def test_a_training_run_on_a_busy_machine_uses_one_thread_then_gives_the_count_back(two_threads, monkeypatch,
                                                                                    tiny_config):
    from lmforge.tasks.run import run
    from lmforge.train.callbacks import Callback

    class Threads(Callback):
        seen: list[int] = []

        def on_step_start(self, trainer):
            self.seen.append(torch.get_num_threads())

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(perf.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    said, probe = [], Threads()
    run(tiny_config(train={"max_steps": 2}), progress=False, print_fn=said.append, callbacks=[probe])
    assert probe.seen == [1, 1]
    assert any(s.startswith("busy machine: load average 7.5 on 2 cores") for s in said), said
    assert torch.get_num_threads() == 2  # the caller's setting, back after the run
