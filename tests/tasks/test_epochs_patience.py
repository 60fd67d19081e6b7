"""``train.epochs`` (steps from the data and the batch, said at start-up, exact resume) and early
stopping on ``train.best_metric`` with ``train.patience``."""

from __future__ import annotations

import math

import pytest

from tests.conftest import run_in_two_parts
from lmforge.errors import ConfigError
from lmforge.tasks import config_from_dict
from lmforge.tasks.run import run


def _run(cfg, lines=None):
    return run(cfg, progress=False, print_fn=(lines.append if lines is not None else (lambda *a, **k: None)))


def test_epochs_set_max_steps_from_the_token_store_and_say_so(tiny_dict):
    lines = []
    summary = _run(config_from_dict(tiny_dict(train={"epochs": 0.5, "max_steps": 1000})), lines)
    said = next(x for x in lines if "train.epochs" in x)
    per_epoch = float(said.split(" steps/epoch")[0].split("(")[-1])
    assert summary["steps"] == math.ceil(0.5 * per_epoch) < 1000  # max_steps came from the data
    assert f"= train.max_steps {summary['steps']}" in said


def test_epochs_resume_mid_epoch_exactly(tiny_dict):
    make = lambda: config_from_dict(tiny_dict("epochs", train={"epochs": 0.5, "checkpoint_every": 100}))  # noqa: E731
    straight = _run(config_from_dict(tiny_dict("straight", train={"epochs": 0.5})))
    first, second = run_in_two_parts(make, 3)
    assert second["steps"] == straight["steps"] > 3
    assert [h["loss"] for h in first["history"] + second["history"]] == [h["loss"] for h in straight["history"]]


def test_patience_ends_the_run_after_evaluations_without_a_new_best(tiny_dict):
    # lr 0 keeps every evaluation equal: the first is the best, the next `patience` are not better
    summary = _run(config_from_dict(tiny_dict(train={"max_steps": 20, "eval_every": 2, "patience": 2, "lr": 1e-12,
                                                     "min_lr": 0.0, "warmup_steps": 0})))
    assert summary["early_stopped"] and not summary["stopped_early"]
    assert [e["step"] for e in summary["evals"]] == [2, 4, 6] and summary["steps"] == 6
    assert summary["best_checkpoint"] and summary["best_checkpoint"].endswith("best")


def test_epochs_and_patience_are_checked(tiny_dict):
    with pytest.raises(ConfigError, match="train.epochs"):
        config_from_dict(tiny_dict(train={"epochs": 0}))
    with pytest.raises(ConfigError, match="train.patience"):
        config_from_dict(tiny_dict(train={"patience": 2, "best_metric": None}))
    with pytest.raises(ConfigError, match="train.epochs: the JAX backend"):
        config_from_dict(tiny_dict(train={"epochs": 1, "backend": "jax"}))
