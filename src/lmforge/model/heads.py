"""Heads that sit on a transformer's hidden states: masked-LM, classification, value."""

from __future__ import annotations

import contextlib

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


# ------------------------------------------------------------------------------ PPO's value model
VALUE_MODELS = ("shared", "separate")


class Critic(nn.Module):
    """A separate value network: its own transformer trunk (a copy of the policy's at the start)
    and a :class:`ValueHead` on its hidden states."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk  # a decoder with ``hidden_states`` (its LM head is unused)
        self.head = ValueHead(trunk.config.n_embd)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk.hidden_states(input_ids))  # (B, T)


def attach_value_model(model: nn.Module, kind: str, trunk: nn.Module | None = None) -> nn.Module:
    """Give a decoder a value model, as a submodule (so the optimizer that trains the model trains
    it, and checkpoints carry it): ``shared``: ``model.value_head``, a :class:`ValueHead` on the
    policy's own hidden states; ``separate``: ``model.critic``, a :class:`Critic` on ``trunk``
    (a decoder of the same config). ``model.value_model`` records the kind (checkpoints write it
    to their config, so loading rebuilds the module). A model that has one already is returned
    as it is."""
    if kind not in VALUE_MODELS:
        raise InputError(f"value_model: got {kind!r}, expected one of {', '.join(VALUE_MODELS)}")
    have = value_model_of(model)
    if have is not None:
        if have != kind:
            raise InputError(f"value_model: the model already has a {have} value model; expected {kind}")
        return model
    if kind == "shared":
        model.value_head = ValueHead(model.config.n_embd)
    else:
        if trunk is None:
            raise InputError("value_model separate: needs a trunk (a decoder of the policy's config)")
        model.critic = Critic(trunk)
    model.value_model = kind
    return model


def value_model_of(model: nn.Module) -> str | None:
    """``shared``, ``separate`` or None: the value model :func:`attach_value_model` gave ``model``."""
    return getattr(model, "value_model", None)


@contextlib.contextmanager
def captured_hidden_states(model: nn.Module):
    """Inside the block, each forward of ``model`` leaves its trunk's hidden states (B, T, C) in
    the yielded dict under ``"hidden"`` (with their gradient): the shared value head reads the very
    pass that gave the logits, instead of a second pass through the trunk."""
    got: dict[str, torch.Tensor] = {}
    handle = model.transformer.register_forward_hook(lambda module, args, out: got.__setitem__("hidden", out))
    try:
        yield got
    finally:
        handle.remove()


def values_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The value model's estimate at every position of ``input_ids`` (B, T) -> (B, T)."""
    kind = value_model_of(model)
    if kind == "shared":
        return model.value_head(model.hidden_states(input_ids))  # (B, T)
    if kind == "separate":
        return model.critic(input_ids)  # (B, T)
    raise InputError("this model has no value model; expected one attached with attach_value_model")
