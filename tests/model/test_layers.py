"""lmforge.model.layers: the KV cache (equal to a full forward, chunked prefill, left padding,
overflow), RMSNorm dtypes, weight init."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from lmforge.model import KVCache, ModelConfig, build
from tests.model.tiny_models import FAST, V, CTX, tiny, tokens, close

# --------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-mqa"])
@FAST
@given(T=st.integers(2, CTX), data=st.data())
def test_kv_cache_matches_full_forward(name, T, data):
    model = tiny(name)
    prefill = data.draw(st.integers(1, T - 1), label="prefill")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = tokens(seed, 2, T)
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, :prefill], cache=cache)]
        for t in range(prefill, T):
            steps.append(model(x[:, t:t + 1], cache=cache))
    assert cache.length == T
    assert close(torch.cat(steps, dim=1), full)


def test_kv_cache_chunked_prefill():
    """Several tokens at once after a non-empty cache (the explicit-mask path)."""
    model = tiny("llama-gqa")
    x = tokens(9, 2, 14)
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 9), (9, 10), (10, 14))]
    assert close(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_kv_cache_with_left_padding(name):
    model = tiny(name)
    a, b = tokens(10, 1, 6), tokens(11, 1, 3)
    prompt = torch.cat([a, torch.cat([tokens(12, 1, 3), b], dim=1)])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    new = tokens(13, 2, 4)
    full_ids = torch.cat([prompt, new], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask)
        steps = [model(prompt, attention_mask=mask, cache=cache)]
        for t in range(4):
            steps.append(model(new[:, t:t + 1], attention_mask=full_mask[:, :6 + t + 1], cache=cache))
        got = torch.cat(steps, dim=1)
        assert close(got[:, 3:], full[:, 3:])  # every real position of both rows
        assert close(got[1:2, 3:], model(torch.cat([b, new[1:2]], dim=1)))  # = the unpadded row


def test_kv_cache_overflow_raises():
    model = tiny("llama-gqa")
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with torch.no_grad():
        model(tokens(0, 1, 4), cache=cache)
        with pytest.raises(RuntimeError, match="KV cache"):
            model(tokens(1, 1, 1), cache=cache)


# ----------------------------------------------------------------------------------- init
def test_residual_projection_init():
    L = 2
    torch.manual_seed(0)
    model = build(ModelConfig(vocab_size=V, context_length=8, n_layer=L, n_head=4, n_embd=256))
    want_res = 0.02 / math.sqrt(2 * L)
    for block in model.transformer.blocks:
        for lin in (block.attn.proj, block.mlp.proj):
            assert abs(lin.weight.std().item() - want_res) / want_res < 0.05
            assert abs(lin.weight.mean().item()) < 0.002
            assert torch.count_nonzero(lin.bias) == 0
        assert abs(block.attn.qkv.weight.std().item() - 0.02) / 0.02 < 0.05
        assert abs(block.mlp.fc.weight.std().item() - 0.02) / 0.02 < 0.05
    assert abs(model.transformer.tok_emb.weight.std().item() - 0.02) / 0.02 < 0.1


def test_rmsnorm_keeps_float64_and_upcasts_half():
    """At least fp32 inside: a float64 input is normalised in float64, not rounded through fp32."""
    from lmforge.model.layers import RMSNorm

    norm = RMSNorm(8, eps=1e-6).double()
    x = torch.randn(3, 8, dtype=torch.float64) * (1 + 1e-12)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert norm(x).dtype == torch.float64
    assert (norm(x) - want).abs().max().item() < 1e-14
    assert RMSNorm(8).half()(x.half()).dtype == torch.float16
