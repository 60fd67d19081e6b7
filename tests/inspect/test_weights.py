"""lmforge.inspect.weights: spectral norm and effective rank against closed forms, weight statistics
and change between checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import InputError
from lmforge.inspect.weights import (
    compare_weights, effective_rank, layer_group, matrix_stats, plot_weight_change, plot_weight_histograms, plot_weight_stats, spectral_norm, weight_stats,
)
from lmforge.model import build
from lmforge.model.layers import Attention


def _model(**fields):
    torch.manual_seed(0)
    cfg = {"vocab_size": 48, "context_length": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, **fields}
    model = build(cfg).eval()
    with torch.no_grad():  # untrained weights are nearly uniform: make the attention peaky
        for m in model.modules():
            if isinstance(m, Attention):
                m.qkv.weight.mul_(8.0)
    return model


# ---------------------------------------------------------------------------- weights
def test_spectral_norm_and_effective_rank_closed_forms():
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    s = matrix_stats(d)
    assert s["spectral_norm"] == pytest.approx(3.0) and s["frobenius_norm"] == pytest.approx(math.sqrt(14))
    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert s["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert matrix_stats(torch.eye(7))["effective_rank"] == pytest.approx(7.0)
    u, v = torch.randn(9, 1), torch.randn(1, 5)
    rank1 = matrix_stats(u @ v)
    assert rank1["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert rank1["spectral_norm"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)
    w = torch.randn(20, 12)
    assert spectral_norm(w) == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-5)
    assert matrix_stats(w)["spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-5)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_weight_stats_and_change(tmp_path):
    model = _model()
    records = weight_stats(model)
    names = [r["name"] for r in records]
    assert "transformer.blocks.1.attn.qkv.weight" in names and "transformer.tok_emb.weight" in names
    assert "lm_head.weight" not in names  # tied to tok_emb: counted once
    assert layer_group("transformer.blocks.1.mlp.fc.weight") == "layer 1"
    assert layer_group("transformer.pos_emb.weight") == "embeddings"
    other = _model()
    with torch.no_grad():
        other.transformer.blocks[1].mlp.fc.weight.mul_(1.1)
    change = {r["name"]: r["rel_change"] for r in compare_weights(model, other)}
    assert change["transformer.blocks.1.mlp.fc.weight"] == pytest.approx(0.1, rel=1e-4)
    assert change["transformer.blocks.0.mlp.fc.weight"] == 0.0
    with pytest.raises(InputError, match="same"):
        compare_weights(model, _model(n_layer=3))
    for p in (plot_weight_histograms(model, tmp_path / "h.png"), plot_weight_stats(records, tmp_path / "s.png"),
              plot_weight_change(compare_weights(model, other), tmp_path / "c.png")):
        assert p.stat().st_size > 1000
