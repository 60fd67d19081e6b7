"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.objectives.base import Objective


class CausalLM(Objective):
    name = "causal_lm"

    def collate(self, windows: torch.Tensor, generator=None) -> dict:
        # windows (B, T+1): inputs are the first T tokens, targets the same shifted by one
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}

    def loss(self, model, batch):
        # packed rows (task sft, objective.packing) also carry per-document positions and segment ids
        packed = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
        logits = model(batch["input_ids"], batch.get("attention_mask"), **packed)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["targets"].reshape(-1),
                               ignore_index=-100)
        return loss, {}
