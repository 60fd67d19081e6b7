"""``train.trainable``: which parameters a run trains; the others are frozen (requires_grad off).

* ``all``: everything.
* ``head``: the task's head only (the classifier when the model has one, else the LM/MLM head).
* ``last_blocks:N``: the last N transformer blocks, the final norm and the head (the classic
  classification fine-tune trains the last block + final norm + head).
"""

from __future__ import annotations

import torch.nn as nn

from lmforge.errors import ConfigError


def _heads(model: nn.Module) -> list[nn.Module]:
    classifier = getattr(model, "classifier", None)
    if classifier is not None:
        return [classifier]
    return [m for m in (getattr(model, "lm_head", None), getattr(model, "mlm", None)) if m is not None]


def apply_trainable(model: nn.Module, spec: str) -> tuple[int, int]:
    """Freeze per ``spec``; returns (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    if spec == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return total, total
    keep: list[nn.Module] = list(_heads(model))
    if spec.startswith("last_blocks:"):
        n = int(spec.split(":", 1)[1])
        t = getattr(model, "transformer", None)
        if t is None:
            raise ConfigError(f"train.trainable: {spec} needs a transformer model; this one has no blocks")
        if n > len(t.blocks):
            raise ConfigError(f"train.trainable: {spec} but the model has {len(t.blocks)} blocks")
        keep += list(t.blocks[-n:])
        if t.norm is not None:
            keep.append(t.norm)
    elif spec != "head":
        raise ConfigError(f"train.trainable: got {spec!r}, expected all, head or last_blocks:N")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in keep:
        for p in m.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError(f"train.trainable: {spec} leaves nothing to train in this model")
    return trainable, total
