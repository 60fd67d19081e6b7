"""The Objective protocol: the contract between the trainer (``lmforge.train.trainer``) and a method.

What the trainer calls, and when::

    objective.setup(model, device)                    # once, before the first step
    objective.loss(model, batch) -> (loss, metrics)   # per micro-batch: loss is the MEAN over its targets
    objective.targets_in(batch) -> int|float          # how many targets that mean is over
    objective.tokens_in(batch) -> int                 # tokens the model ran (throughput, MFU)
    objective.evaluate(model, batches) -> metrics     # validation (unless the task gives its own evaluate)

and weights each micro-batch's mean by its share of the targets of the whole step (all
micro-batches, all ranks), so that the step's loss is the mean over the global batch however the
examples fall into micro-batches (padding and masked labels make them unequal). Around it:
``setup(model, device)`` once before training (objectives with state, e.g. a frozen reference
model, build it there) and ``evaluate(model, batches)`` for validation metrics. The token-stream
objectives (causal and masked LM) also turn raw windows into model inputs with
``collate(windows, generator)``, which the LM task's window batches call.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class Objective:
    name = "objective"

    def setup(self, model, device: torch.device) -> None:
        """Called once by the trainer after the model is on ``device`` (default: nothing to do)."""

    def collate(self, windows: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def tokens_in(self, batch: dict) -> int:
        """Tokens the model processed for this batch (throughput and MFU)."""
        return int(batch["input_ids"].numel())

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict]) -> dict[str, float]:
        """Token-weighted mean loss over ``batches`` and its perplexity."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for batch in batches:
            loss, _ = self.loss(model, batch)
            n = self.targets_in(batch)
            total += float(loss) * n
            count += n
        model.train(was_training)
        if count == 0:
            return {}
        mean = total / count
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}

    def targets_in(self, batch: dict) -> int:
        """The number of targets ``loss`` averages over (tokens that are not -100 by default)."""
        return int((batch["targets"] != -100).sum())
