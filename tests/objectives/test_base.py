"""lmforge.objectives.base: the Objective protocol's defaults: tokens_in counts the input ids,
targets_in the targets that are not -100, and evaluate is the target-weighted mean loss over the
batches with its perplexity, in eval mode, leaving the model's mode as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lmforge.objectives.base import Objective


class MeanTarget(Objective):
    """A toy objective: the loss of a batch is the mean of its targets that are not -100, and it
    records the mode the model was in when it was called."""

    def __init__(self):
        self.modes = []

    def loss(self, model, batch):
        self.modes.append(model.training)
        t = batch["targets"]
        return t[t != -100].float().mean(), {}


def _batch(targets: list[list[int]]) -> dict:
    t = torch.tensor(targets)
    return {"input_ids": torch.zeros_like(t), "targets": t}


def test_counts_default_to_input_ids_and_real_targets():
    obj = Objective()
    b = _batch([[1, 2, -100], [-100, -100, 3]])
    assert obj.tokens_in(b) == 6 and obj.targets_in(b) == 3
    with pytest.raises(NotImplementedError):
        obj.loss(None, b)
    with pytest.raises(NotImplementedError):
        obj.collate(torch.zeros(1, 2))
    assert obj.setup(nn.Linear(1, 1), torch.device("cpu")) is None  # nothing to set up by default


def test_evaluate_is_the_target_weighted_mean_in_eval_mode():
    obj = MeanTarget()
    model = nn.Linear(1, 1).train()
    batches = [_batch([[1, 2, 3]]), _batch([[10, -100, -100]])]  # means 2 (3 targets) and 10 (1 target)
    out = obj.evaluate(model, batches)
    mean = (2 * 3 + 10 * 1) / 4  # not the mean of the batch means (6)
    assert out["loss"] == pytest.approx(mean) and out["ppl"] == pytest.approx(math.exp(mean))
    assert obj.modes == [False, False] and model.training  # evaluated in eval mode, mode restored
    model.eval()
    obj.evaluate(model, batches)
    assert not model.training


def test_evaluate_of_nothing_is_empty_and_perplexity_does_not_overflow():
    obj = MeanTarget()
    assert obj.evaluate(nn.Linear(1, 1), []) == {}
    huge = obj.evaluate(nn.Linear(1, 1), [_batch([[1000]])])
    assert huge["loss"] == 1000 and huge["ppl"] == pytest.approx(math.exp(50.0))  # capped, finite
