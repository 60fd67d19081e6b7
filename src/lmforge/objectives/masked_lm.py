"""Masked language modelling (BERT): predict a random 15% of tokens from both sides.

Of the chosen positions 80% become the mask token, 10% a random token and 10% stay unchanged
(Devlin et al. 2019, section 3.1). The loss covers the chosen positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.objectives.base import Objective


class MaskedLM(Objective):
    name = "masked_lm"

    def __init__(self, mask_id: int | None = None, vocab_size: int | None = None, mask_prob: float = 0.15,
                 special_ids: tuple[int, ...] = ()):
        if mask_id is None or vocab_size is None:
            raise ConfigError("objective: masked_lm needs the tokenizer's mask token id and the vocab size")
        self.mask_id, self.vocab_size, self.mask_prob = mask_id, vocab_size, mask_prob
        self.special_ids = torch.tensor(sorted(special_ids), dtype=torch.long)

    def collate(self, windows: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        ids = windows[:, :-1].clone()  # (B, T); the extra token of a window is not needed here
        r = torch.rand(ids.shape, generator=generator)
        choose = r < self.mask_prob
        if self.special_ids.numel():
            choose &= ~torch.isin(ids, self.special_ids)
        targets = torch.where(choose, ids, torch.full_like(ids, -100))
        u = torch.rand(ids.shape, generator=generator)
        random_tokens = torch.randint(0, self.vocab_size, ids.shape, generator=generator)
        ids = torch.where(choose & (u < 0.8), torch.full_like(ids, self.mask_id), ids)
        ids = torch.where(choose & (u >= 0.8) & (u < 0.9), random_tokens, ids)
        return {"input_ids": ids, "targets": targets}

    def loss(self, model, batch):
        chosen = batch["targets"] != -100  # (B, T)
        if not chosen.any():  # nothing was masked: no signal, but a valid graph
            logits = model(batch["input_ids"], batch.get("attention_mask"), head="mlm")
            return logits.sum() * 0.0, {"mlm_acc": 0.0}
        # the head runs on the chosen positions only: (N, vocab) instead of (B, T, vocab)
        logits = model(batch["input_ids"], batch.get("attention_mask"), head="mlm", positions=chosen)
        targets = batch["targets"][chosen]  # (N,)
        loss = F.cross_entropy(logits.float(), targets)
        acc = (logits.argmax(-1) == targets).float().mean()
        return loss, {"mlm_acc": float(acc)}
