"""Causal language modelling: predict token t+1 from tokens <= t.

A mixture-of-experts model (``model.n_experts``) leaves its router losses in ``router_stats``
after each forward (``lmforge.model.moe``); in training they are added to the cross-entropy and
logged with each layer's expert usage. Dense models are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model.moe import find_router_stats
from lmforge.objectives.base import Objective


class CausalLM(Objective):
    name = "causal_lm"

    def collate(self, windows: torch.Tensor, generator=None) -> dict:
        # windows (B, T+1): inputs are the first T tokens, targets the same shifted by one
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}

    def loss(self, model, batch):
        loss, metrics = self._lm_loss(model, batch)
        stats = find_router_stats(model) if model.training else None
        if stats is None:
            return loss, metrics
        # mixture of experts: + aux_coef * load balancing + z_coef * z-loss (evaluation: cross-entropy alone)
        return loss + stats.loss.to(loss.dtype), {**metrics, "ce_loss": float(loss.detach()), **stats.metrics()}

    def _lm_loss(self, model, batch):
        # packed rows (task sft, objective.packing) also carry per-document positions and segment ids
        packed = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
        targets = batch["targets"]  # (B, T); -100: no loss here (prompt, padding)
        keep = targets != -100
        if bool(keep.all()):  # pretraining: every position predicts
            logits = model(batch["input_ids"], batch.get("attention_mask"), **packed)  # (B, T, V)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)), {}
        # fine-tuning: the LM head (vocab-sized) runs only where a target is
        logits = model(batch["input_ids"], batch.get("attention_mask"), keep=keep, **packed)  # (N, V)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0, {}  # nothing to predict in this micro-batch
        return F.cross_entropy(logits.float(), targets[keep]), {}
