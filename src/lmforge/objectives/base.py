"""The Objective base: averaging a loss over validation batches is shared by all objectives."""

from __future__ import annotations

import math
from typing import Iterable

import torch


class Objective:
    name = "objective"

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
        return int((batch["targets"] != -100).sum())
