"""Heads that sit on a transformer's hidden states: masked-LM, classification, value."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.layers import make_norm


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, method: str) -> torch.Tensor:
    """(B, T, C) -> (B, C): mean over real tokens, the first (CLS) token, or the last real token."""
    if method == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
    m = attention_mask.to(hidden.dtype)
    if method == "mean":
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
    if method == "last":
        # index of the last real token, right or left padding alike
        T = hidden.shape[1]
        idx = (torch.arange(T, device=hidden.device) * attention_mask.long()).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise InputError(f"pooling: got {method!r}, expected one of mean, cls, last")


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> activation -> norm -> decoder tied to the token embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(h), approximate=self.approximate))
        return self.decoder(h) + self.bias  # (B, T, vocab)


class ClassificationHead(nn.Module):
    """Pool the hidden states, then a linear layer to ``num_classes`` logits."""

    def __init__(self, n_embd: int, num_classes: int, pooling: str = "mean", dropout: float = 0.0):
        super().__init__()
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(n_embd, num_classes)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.drop(pool(hidden, attention_mask, self.pooling)))  # (B, num_classes)


class ValueHead(nn.Module):
    """One scalar per position (PPO values) or per sequence (reward models, pooled 'last')."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.out = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden).squeeze(-1)  # (B, T)
