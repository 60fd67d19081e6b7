"""AdamW with weight-decay groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only; norms, biases and embeddings are not decayed."""
    decay, no_decay, seen = [], [], set()
    no_decay_ids = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding) or not isinstance(m, nn.Linear):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    for p in model.parameters():  # model.parameters() yields a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8,
                   device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on CPU and GPU. On the 2-core CPU the fused
    step of an 800k-parameter model took 0.53 ms against 1.66 ms (default) and 2.2 ms (foreach),
    with updates equal to the default's within 2e-7."""
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine") -> float:
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then cosine (or linear) decay to
    ``min_lr`` at ``max_steps``; ``constant`` stays at lr after the warmup."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    base = kwargs["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **kwargs) / base)
