"""The simplest autoregressive model: the next token depends only on the current one."""

from __future__ import annotations

import torch.nn as nn

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig


class BigramLM(nn.Module):
    """A (vocab x vocab) table of next-token logits; trains through the same path as a decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
        nn.init.normal_(self.table.weight, 0.0, cfg.init_std)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False, keep=None):
        if input_ids.numel():
            lo, hi, V = int(input_ids.min()), int(input_ids.max()), self.config.vocab_size
            if lo < 0 or hi >= V:
                raise InputError(f"token id {hi if hi >= V else lo} is out of range: expected 0 <= id < vocab_size={V}")
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            input_ids = input_ids[:, -1:]
        if keep is not None:
            input_ids = input_ids[keep]  # (N,)
        return self.table(input_ids)  # (B, T, vocab) or (N, vocab)
