"""lmforge.train.optim: the learning-rate schedules (warmup, cosine, linear, constant) and the
parameter groups (weight decay only on linear weights, tied weights once, frozen ones left out)."""

from __future__ import annotations

import math

import pytest
import torch.nn as nn

from lmforge.model import build
from lmforge.train.optim import lr_at, param_groups


# ----------------------------------------------------------------------------- schedule
def _lr(step, **kw):
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, schedule="cosine")
    base.update(kw)
    return lr_at(step, **base)


def test_warmup_is_linear_from_lr_over_warmup():
    assert _lr(0) == pytest.approx(1e-3 / 10)
    assert _lr(4) == pytest.approx(5e-4)
    steps = [_lr(s) for s in range(10)]
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    assert all(d == pytest.approx(1e-4) for d in diffs)


def test_peak_at_warmup_end_and_cosine_to_min():
    assert _lr(9) == pytest.approx(1e-3)  # last warmup step reaches the peak
    assert _lr(10) == pytest.approx(1e-3)  # decay starts from the peak
    assert _lr(60) == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the decay
    assert _lr(110) == pytest.approx(1e-4)
    assert _lr(500) == pytest.approx(1e-4)  # stays at min_lr after max_steps
    values = [_lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    # the cosine shape at a quarter of the decay
    assert _lr(35) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))


def test_linear_and_constant_schedules():
    assert _lr(60, schedule="linear") == pytest.approx((1e-3 + 1e-4) / 2)
    assert _lr(35, schedule="linear") == pytest.approx(1e-3 - 0.25 * 9e-4)
    assert _lr(110, schedule="linear") == pytest.approx(1e-4)
    assert _lr(0, schedule="constant") == pytest.approx(1e-4)  # warmup still applies
    for s in (10, 60, 110, 1000):
        assert _lr(s, schedule="constant") == pytest.approx(1e-3)


def test_no_warmup_starts_at_peak():
    assert _lr(0, warmup_steps=0) == pytest.approx(1e-3)
    assert _lr(100, warmup_steps=0, max_steps=100) == pytest.approx(1e-4)


def test_scheduler_follows_lr_at():
    from lmforge.train.optim import make_optimizer, make_scheduler

    model = nn.Linear(2, 2)
    opt = make_optimizer(model, 1e-3, 0.1)
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=3, max_steps=12, schedule="cosine")
    sched = make_scheduler(opt, **kw)
    for step in range(14):
        assert sched.get_last_lr()[0] == pytest.approx(lr_at(step, **kw))
        opt.step()
        sched.step()


# ----------------------------------------------------------------------------- param groups
def _groups(model, wd=0.1):
    decay, no_decay = param_groups(model, wd)
    assert decay["weight_decay"] == wd and no_decay["weight_decay"] == 0.0
    return decay["params"], no_decay["params"]


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups_decay_only_linear_weights(tied):
    model = build({"arch": "decoder", "vocab_size": 20, "context_length": 8, "n_layer": 2, "n_head": 2,
                   "n_embd": 16, "tie_embeddings": tied})
    decay, no_decay = _groups(model)
    ids_decay, ids_no = {id(p) for p in decay}, {id(p) for p in no_decay}
    assert len(ids_decay) == len(decay) and len(ids_no) == len(no_decay)  # nothing twice
    assert not ids_decay & ids_no
    unique = {id(p) for p in model.parameters()}
    assert ids_decay | ids_no == unique  # every parameter once (tied weights included)

    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            assert id(m.weight) in ids_no, name
        elif isinstance(m, nn.Linear):
            if tied and m.weight is model.transformer.tok_emb.weight:
                assert id(m.weight) in ids_no  # the tied head is the embedding: not decayed
            else:
                assert id(m.weight) in ids_decay, name
            if m.bias is not None:
                assert id(m.bias) in ids_no, name
        elif isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower():
            for p in m.parameters(recurse=False):
                assert id(p) in ids_no, name
    for p in no_decay:
        if p.dim() >= 2:
            assert any(p is m.weight for m in model.modules() if isinstance(m, nn.Embedding))


def test_param_groups_tied_weight_counted_once():
    model = build({"arch": "decoder", "vocab_size": 20, "context_length": 8, "n_layer": 1, "n_head": 2,
                   "n_embd": 16, "tie_embeddings": True})
    assert model.lm_head.weight is model.transformer.tok_emb.weight
    decay, no_decay = _groups(model)
    everything = decay + no_decay
    assert sum(p is model.lm_head.weight for p in everything) == 1
    assert sum(p.numel() for p in everything) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_param_groups_rmsnorm_and_encoder_heads():
    model = build({"arch": "encoder", "vocab_size": 20, "context_length": 8, "n_layer": 1, "n_head": 2,
                   "n_embd": 16, "mlm_head": True, "type_vocab_size": 2})
    decay, no_decay = _groups(model)
    assert all(p.dim() == 2 for p in decay)
    assert all(p.dim() < 2 or any(p is m.weight for m in model.modules() if isinstance(m, nn.Embedding))
               for p in no_decay)
    llama = build({"arch": "decoder", "vocab_size": 20, "context_length": 8, "n_layer": 1, "n_head": 2,
                   "n_embd": 16, "norm": "rmsnorm", "bias": False, "positional": "rope", "activation": "swiglu"})
    decay, no_decay = _groups(llama)
    assert all(p.dim() == 1 or p is llama.transformer.tok_emb.weight for p in no_decay)
    assert len(decay) == 4  # qkv, proj, mlp fc, mlp proj (head tied)


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    decay, no_decay = _groups(model)
    assert decay == []
    assert {id(p) for p in no_decay} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
