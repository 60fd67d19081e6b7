"""Tests for lmforge.model: shapes, causality, padding, KV cache, config checks, errors, IO, init."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import lmforge
from lmforge.errors import CheckpointError, ConfigError, InputError
from lmforge.model import (
    PRESETS,
    BigramLM,
    DecoderLM,
    Encoder,
    KVCache,
    ModelConfig,
    build,
    count_parameters,
    flops_per_token,
    summary,
)
from lmforge.store import CONFIG, WEIGHTS, load_model, save_model

FAST = settings(max_examples=25, deadline=None)
V, CTX = 37, 16  # tiny vocabulary and context shared by the test models
TOL = 1e-5

# Tiny versions of each family: same fields as the presets, a few thousand parameters.
GPT2 = dict(arch="decoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=2, n_embd=16,
            activation="gelu_tanh", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)
LLAMA = dict(arch="decoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
             activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positional="rope", bias=False,
             tie_embeddings=False)
MQA = dict(LLAMA, n_kv_head=1)
MHA_ROPE = dict(LLAMA, n_kv_head=4)
BERT = dict(arch="encoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=2, n_embd=16, activation="gelu",
            norm="layernorm", norm_eps=1e-12, norm_position="post", embedding_norm=True, positional="learned",
            type_vocab_size=2, mlm_head=True, pooling="cls")
BIGRAM = dict(arch="bigram", vocab_size=V, context_length=CTX, n_layer=1, n_head=1, n_embd=V, positional="none")

DECODERS = {"gpt2": GPT2, "llama-gqa": LLAMA, "llama-mqa": MQA, "llama-mha": MHA_ROPE}


@functools.cache
def tiny(name: str, seed: int = 0, **overrides):
    """A tiny model (eval mode), cached so hypothesis examples share it. Do not mutate."""
    table = {**DECODERS, "bert": BERT, "bigram": BIGRAM}
    torch.manual_seed(seed)
    return build(ModelConfig(**{**table[name], **overrides})).eval()


def tokens(seed: int, *shape: int, vocab: int = V) -> torch.Tensor:
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or bool((a - b).abs().max() <= tol)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", [*DECODERS, "bigram"])
@FAST
@given(B=st.integers(1, 3), T=st.integers(1, CTX), seed=st.integers(0, 2**16))
def test_decoder_logits_shape(name, B, T, seed):
    model = tiny(name)
    with torch.no_grad():
        out = model(tokens(seed, B, T))
    assert out.shape == (B, T, V)
    assert torch.isfinite(out).all()


def test_model_classes():
    assert isinstance(tiny("gpt2"), DecoderLM)
    assert isinstance(tiny("llama-gqa"), DecoderLM)
    assert isinstance(tiny("bert"), Encoder)
    assert isinstance(tiny("bigram"), BigramLM)
    assert tiny("llama-mqa").transformer.blocks[0].attn.n_kv_head == 1


@FAST
@given(B=st.integers(1, 3), T=st.integers(1, CTX), seed=st.integers(0, 2**16))
def test_encoder_shapes(B, T, seed):
    model = tiny("bert")
    x = tokens(seed, B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:, T // 2 + 1:] = 0  # some right padding, always at least one real token
    with torch.no_grad():
        assert model(x, mask).shape == (B, T, 16)
        assert model.mlm_logits(x, mask).shape == (B, T, V)
        assert model.pooled(x, mask, method="mean").shape == (B, 16)
        assert model.pooled(x, mask, method="cls").shape == (B, 16)
        assert model.pooled(x, mask).shape == (B, 16)  # config default (cls)
        tt = torch.randint(2, (B, T), generator=torch.Generator().manual_seed(seed))
        assert model(x, mask, token_type_ids=tt).shape == (B, T, 16)


def test_encoder_without_mlm_head_raises():
    model = build(ModelConfig(**{**BERT, "mlm_head": False}))
    with pytest.raises(InputError, match="mlm_head"):
        model.mlm_logits(tokens(0, 1, 4))


def test_last_only_and_hidden_states():
    model = tiny("gpt2")
    x = tokens(1, 2, 9)
    with torch.no_grad():
        full = model(x)
        assert close(model(x, last_only=True), full[:, -1:])
        assert model.hidden_states(x).shape == (2, 9, 16)


# --------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "dropout-eval"])
@FAST
@given(T=st.integers(2, CTX), data=st.data())
def test_causality(name, T, data):
    model = tiny("gpt2", dropout=0.3) if name == "dropout-eval" else tiny(name)
    assert not model.training
    t = data.draw(st.integers(0, T - 2), label="t")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = tokens(seed, 2, T)
    y = x.clone()
    y[:, t + 1:] = (x[:, t + 1:] + 1 + tokens(seed + 1, 2, T - t - 1, vocab=V - 1)) % V  # every later token changes
    assert (y[:, t + 1:] != x[:, t + 1:]).all()
    with torch.no_grad():
        a, b = model(x), model(y)
    assert close(a[:, :t + 1], b[:, :t + 1])
    assert not close(a[:, t + 1:], b[:, t + 1:], tol=0.0)  # the future does matter to later positions


# ---------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@FAST
@given(T=st.integers(1, 10), P=st.integers(1, CTX - 10), seed=st.integers(0, 2**16))
def test_encoder_padding_invariance(pooling, T, P, seed):
    model = tiny("bert")
    x = tokens(seed, 1, T)
    padded = torch.cat([x, tokens(seed + 1, 1, P)], dim=1)  # junk after the real tokens
    mask = torch.cat([torch.ones(1, T), torch.zeros(1, P)], dim=1).long()
    with torch.no_grad():
        h, hp = model(x), model(padded, mask)
        assert close(hp[:, :T], h)
        assert close(model.pooled(padded, mask, method=pooling), model.pooled(x, method=pooling))
        assert close(model.mlm_logits(padded, mask)[:, :T], model.mlm_logits(x), tol=1e-4)


def test_encoder_padding_invariance_in_a_batch():
    """Two sequences of different lengths in one batch match each one on its own."""
    model = tiny("bert")
    a, b = tokens(3, 1, 12), tokens(4, 1, 5)
    batch = torch.cat([a, torch.cat([b, tokens(5, 1, 7)], dim=1)])
    mask = torch.tensor([[1] * 12, [1] * 5 + [0] * 7])
    with torch.no_grad():
        h = model(batch, mask)
        mean = model.pooled(batch, mask, method="mean")
        assert close(h[0:1], model(a)) and close(h[1:2, :5], model(b))
        assert close(mean[0:1], model.pooled(a, method="mean"))
        assert close(mean[1:2], model.pooled(b, method="mean"))


@pytest.mark.parametrize("budget", [1, 20, 1024])  # a row per group, a few rows per group, one group
def test_encoder_unpadded_path_equals_padded_path(budget):
    """Skipping padding (real tokens of all rows as one block-diagonal row) changes no number:
    real positions, pooled outputs and every gradient equal the padded computation. In float64:
    in float32 the tiny model's layer norms cancel enough to leave 1e-6 of rounding in some grads."""
    model = tiny("bert").double()
    lengths = [12, 3, 7, 1, 9]
    ids = tokens(6, len(lengths), 12)
    mask = torch.tensor([[1] * n + [0] * (12 - n) for n in lengths])
    out = {}
    for unpad in (False, True):
        model.zero_grad()
        model.transformer.unpad, model.transformer.unpad_tokens = unpad, budget
        h = model(ids, mask)
        pooled = model.pooled(ids, mask, method="mean")
        (h[mask.bool()].square().sum() + pooled.sum()).backward()
        out[unpad] = (h[mask.bool()], pooled, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert close(out[True][0], out[False][0], 1e-12) and close(out[True][1], out[False][1], 1e-12)
    assert all(close(a, b, tol=1e-10) for a, b in zip(out[True][2], out[False][2], strict=True))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-mqa"])
@FAST
@given(T=st.integers(1, 10), P=st.integers(1, CTX - 10), seed=st.integers(0, 2**16))
def test_decoder_left_padding(name, T, P, seed):
    model = tiny(name)
    x = tokens(seed, 1, T)
    padded = torch.cat([tokens(seed + 1, 1, P), x], dim=1)  # junk before the real tokens
    mask = torch.cat([torch.zeros(1, P), torch.ones(1, T)], dim=1).long()
    with torch.no_grad():
        assert close(model(padded, attention_mask=mask)[:, P:], model(x))


def test_decoder_left_padding_in_a_batch():
    model = tiny("llama-gqa")
    a, b = tokens(6, 1, 11), tokens(7, 1, 4)
    batch = torch.cat([a, torch.cat([tokens(8, 1, 7), b], dim=1)])
    mask = torch.tensor([[1] * 11, [0] * 7 + [1] * 4])
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        assert torch.isfinite(out).all()  # padding queries must not produce NaN
        assert close(out[0:1], model(a)) and close(out[1:2, 7:], model(b))


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


# ------------------------------------------------------------------------------ ModelConfig
SMALL_PRESETS = ["bigram", "baby", "llama-baby"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.name == name
    if name in SMALL_PRESETS:
        model = build(name).eval()
        x = tokens(0, 2, 8, vocab=cfg.vocab_size)
        with torch.no_grad():
            assert model(x).shape == (2, 8, cfg.vocab_size)
    else:
        with torch.device("meta"):
            model = build(cfg)
    assert count_parameters(model) > 0
    assert summary(model)["arch"] == cfg.arch


def test_known_preset_sizes():
    """GPT-2 small is the famous 124,439,808 parameters (tied head); BERT-base with its MLM head
    matches transformers' BertForMaskedLM (109,514,298)."""
    with torch.device("meta"):
        assert count_parameters(build("gpt2")) == 124_439_808
        assert count_parameters(build("bert-base")) == 109_514_298


def test_build_accepts_name_dict_and_config():
    assert build("baby").config == ModelConfig.from_preset("baby")
    m = build({"preset": "llama-baby", "n_layer": 1})
    assert m.config.n_layer == 1 and m.config.positional == "rope"
    assert build(dict(GPT2)).config == ModelConfig(**GPT2)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("gpt5")
    msg = str(e.value)
    assert "gpt5" in msg and "model.preset" in msg
    for name in PRESETS:
        assert name in msg
    with pytest.raises(ConfigError, match="gpt5"):
        build("gpt5")


def problems_of(**kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kw)
    assert str(e.value) == "; ".join(e.value.problems)
    return e.value.problems


def test_n_embd_not_divisible_by_n_head():
    (p,) = problems_of(n_embd=30, n_head=4)
    assert p.startswith("model.n_embd") and "30" in p and "n_head=4" in p


def test_n_head_not_divisible_by_n_kv_head():
    (p,) = problems_of(n_embd=32, n_head=4, n_kv_head=3)
    assert p.startswith("model.n_kv_head") and "n_kv_head=3" in p


def test_odd_head_size_with_rope():
    (p,) = problems_of(n_embd=12, n_head=4, positional="rope")
    assert p.startswith("model.n_embd") and "rope" in p
    ModelConfig(n_embd=12, n_head=4, positional="learned")  # fine without rope


@pytest.mark.parametrize("field, value", [
    ("activation", "tanh"), ("norm", "batchnorm"), ("positional", "alibi"), ("norm_position", "middle"),
    ("arch", "rnn"), ("pooling", "max"),
])
def test_bad_choice_named(field, value):
    (p,) = problems_of(**{field: value})
    assert p.startswith(f"model.{field}") and repr(value) in p


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("n_layer", -1), ("n_head", 2.0), ("context_length", True), ("dropout", 1.0),
    ("norm_eps", 0.0), ("init_std", -0.1), ("type_vocab_size", -1),
])
def test_bad_number_named(field, value):
    assert any(p.startswith(f"model.{field}") for p in problems_of(**{field: value}))


def test_arch_consistency():
    assert problems_of(arch="encoder", causal=True)[0].startswith("model.causal")
    assert problems_of(arch="decoder", causal=False)[0].startswith("model.causal")
    assert problems_of(mlm_head=True)[0].startswith("model.mlm_head")
    assert problems_of(positional="rope", rope_theta=0.0)[0].startswith("model.rope_theta")


def test_all_problems_in_one_error():
    ps = problems_of(activation="tanh", norm="batchnorm", positional="alibi", vocab_size=0, dropout=1.5)
    assert len(ps) == 5
    for field in ("activation", "norm", "positional", "vocab_size", "dropout"):
        assert any(p.startswith(f"model.{field}:") for p in ps), field
    ps = problems_of(n_embd=30, n_head=4, n_kv_head=3)  # two independent divisibility problems
    assert len(ps) == 2
    assert {p.split(":")[0] for p in ps} == {"model.n_embd", "model.n_kv_head"}


def test_derived_fields():
    assert ModelConfig(n_head=8).n_kv_head == 8
    assert ModelConfig(n_embd=128).mlp_hidden == 512
    assert ModelConfig(n_embd=96, activation="swiglu").mlp_hidden == 256  # 8/3 * 96 = 256, a multiple of 64
    assert ModelConfig(arch="encoder").causal is False and ModelConfig().causal is True
    assert ModelConfig(n_embd=96, n_head=3).head_dim == 32


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(name):
    cfg = ModelConfig.from_preset(name)
    back = ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_yaml_round_trip_tiny():
    for d in (GPT2, LLAMA, BERT, BIGRAM):
        cfg = ModelConfig(**d)
        assert ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_unknown_field_named():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**GPT2, "n_layers": 3, "heads": 2})
    assert len(e.value.problems) == 2
    assert "model.n_layers" in str(e.value) and "model.heads" in str(e.value)
    with pytest.raises(ConfigError, match="n_layers"):
        build({**GPT2, "n_layers": 3})
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_preset("baby", n_layers=3)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert", "bigram"])
@pytest.mark.parametrize("bad", [V + 3, -2])
def test_token_id_out_of_range(name, bad):
    x = tokens(0, 2, 6)
    x[1, 3] = bad
    with pytest.raises(InputError) as e:
        tiny(name)(x)
    msg = str(e.value)
    assert str(bad) in msg and f"vocab_size={V}" in msg


def test_sequence_longer_than_context():
    with pytest.raises(InputError, match=f"context_length {CTX}"):
        tiny("gpt2")(tokens(0, 1, CTX + 1))
    with pytest.raises(InputError, match=f"{CTX + 1} tokens"):
        tiny("llama-gqa")(tokens(0, 1, CTX + 1))
    with pytest.raises(InputError, match="context_length"):
        tiny("bert")(tokens(0, 1, CTX + 1))
    # learned positions: the cache's past counts too
    model = tiny("gpt2")
    cache = KVCache.for_model(model, batch_size=1, max_len=CTX + 4)
    with torch.no_grad():
        model(tokens(0, 1, CTX), cache=cache)
        with pytest.raises(InputError, match="context_length"):
            model(tokens(1, 1, 1), cache=cache)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert"])
@pytest.mark.parametrize("shape", [(5,), (1, 2, 3)])
def test_wrong_rank_input(name, shape):
    with pytest.raises(InputError, match="batch, time"):
        tiny(name)(tokens(0, *shape))


# ---------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("d", [GPT2, LLAMA, BERT, BIGRAM], ids=["gpt2", "llama", "bert", "bigram"])
def test_seeded_build_is_reproducible(d):
    cfg = ModelConfig(**d)
    torch.manual_seed(123)
    a = build(cfg).eval()
    torch.manual_seed(123)
    b = build(cfg).eval()
    torch.manual_seed(124)
    c = build(cfg)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = tokens(0, 2, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_dropout_training_mode_reproducible():
    model = build(ModelConfig(**{**GPT2, "dropout": 0.3})).train()
    x = tokens(0, 2, 10)
    with torch.no_grad():
        torch.manual_seed(7)
        a = model(x)
        torch.manual_seed(7)
        b = model(x)
        c = model(x)  # different dropout masks
        model.eval()
        d, e = model(x), model(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(d, e) and not torch.equal(a, d)


# ------------------------------------------------------------------------- parameters, FLOPs
def test_count_parameters_gpt2_by_hand():
    C, L, T = 16, 2, CTX
    per_layer = (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (2 * C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    expected = V * C + T * C + L * per_layer + 2 * C  # lm_head tied: counted once
    model = tiny("gpt2")
    assert count_parameters(model) == expected
    assert count_parameters(model, exclude_embeddings=True) == expected - V * C - T * C
    untied = build(ModelConfig(**{**GPT2, "tie_embeddings": False}))
    assert count_parameters(untied) == expected + V * C


def test_count_parameters_llama_gqa_by_hand():
    C, L, nh, nkv, hs, H = 32, 2, 4, 2, 8, 128  # swiglu hidden: 8/3 * 32 = 85.3, rounded up to 64s
    assert tiny("llama-gqa").config.mlp_hidden == H
    per_layer = C + C * (nh + 2 * nkv) * hs + nh * hs * C + C + C * 2 * H + H * C  # no biases, RMSNorm
    expected = V * C + L * per_layer + C + C * V  # untied head
    assert count_parameters(tiny("llama-gqa")) == expected
    mqa = L * (C + C * (nh + 2) * hs + nh * hs * C + C + C * 2 * H + H * C) + V * C + C + C * V
    assert count_parameters(tiny("llama-mqa")) == mqa


def test_count_parameters_bigram():
    assert count_parameters(tiny("bigram")) == V * V


def test_flops_per_token_by_hand():
    # GPT2 tiny: N = L * (attn 4C^2 + mlp 8C^2) + C * V = 2 * 12 * 256 + 16 * 37 = 6736
    cfg = ModelConfig(**GPT2)
    N = 6736
    assert flops_per_token(cfg) == 6 * N + 12 * 2 * 16 * CTX == 46560
    assert flops_per_token(cfg, training=False) == 46560 / 3
    assert flops_per_token(cfg, seq_len=8) == 6 * N + 12 * 2 * 16 * 8
    # Llama GQA tiny: qkv + o = 32*(4+4)*8 + 4*8*32 = 3072; swiglu gate, up, down = 3*32*128 = 12288
    N = 2 * (3072 + 12288) + 32 * V
    assert flops_per_token(ModelConfig(**LLAMA)) == 6 * N + 12 * 2 * 32 * CTX
    assert flops_per_token(ModelConfig(**BIGRAM)) == 0


# ------------------------------------------------------------------------------------ IO
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert", "bigram"])
def test_save_load_round_trip(tmp_path, name):
    model = tiny(name, seed=5)
    folder = save_model(model, tmp_path / "m")
    assert (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()
    loaded = load_model(folder)
    assert not loaded.training
    assert loaded.config == model.config
    x = tokens(0, 2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    if model.config.tie_embeddings and name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.tok_emb.weight


def test_save_overwrites_atomically(tmp_path):
    save_model(tiny("gpt2", seed=1), tmp_path / "m")
    save_model(tiny("gpt2", seed=2), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left
    x = tokens(0, 1, 5)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(x), tiny("gpt2", seed=2)(x))


def test_from_pretrained(tmp_path):
    model = tiny("llama-gqa", seed=3)
    save_model(model, tmp_path / "m", config={"train": {"lr": 0.001}})
    loaded = lmforge.from_pretrained(tmp_path / "m")
    assert not loaded.training
    x = tokens(0, 1, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    loaded, tok = lmforge.from_pretrained(str(tmp_path / "m"), with_tokenizer=True)
    assert tok is None


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_model(tiny("gpt2"), tmp_path / "m")


def test_missing_folder(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="nope"):
        lmforge.from_pretrained(path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_missing_weights(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(CheckpointError) as e:
        lmforge.from_pretrained(saved)
    assert str(saved / WEIGHTS) in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights(saved, damage):
    path = saved / WEIGHTS
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as e:
        load_model(saved)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", ["train:\n  lr: 0.1\n", "- a\n- b\n", "", "model: 3\n", "model: [unclosed\n"])
def test_config_without_model_section(saved, content):
    (saved / CONFIG).write_text(content)
    with pytest.raises(CheckpointError) as e:
        lmforge.from_pretrained(saved)
    assert str(saved / CONFIG) in str(e.value)


def test_missing_config(saved):
    (saved / CONFIG).unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(saved)
    assert str(saved / CONFIG) in str(e.value)


@pytest.mark.parametrize("change", [{"n_embd": 32}, {"n_layer": 3}, {"n_layer": 1}, {"tie_embeddings": False},
                                    {"vocab_size": V + 1}])
def test_weights_not_matching_config(saved, change):
    cfg = yaml.safe_load((saved / CONFIG).read_text())
    cfg["model"].update(change)
    (saved / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(saved)
    assert str(saved / WEIGHTS) in str(e.value)


def test_invalid_model_section_is_config_error(saved):
    cfg = yaml.safe_load((saved / CONFIG).read_text())
    cfg["model"]["activation"] = "tanh"
    (saved / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="model.activation"):
        load_model(saved)


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


def test_tied_lm_head_shares_storage():
    model = build(ModelConfig(**GPT2))
    w, e = model.lm_head.weight, model.transformer.tok_emb.weight
    assert w is e and w.data_ptr() == e.data_ptr()
    with torch.no_grad():
        e[0, 0] = 3.0
    assert w[0, 0] == 3.0
    bert = tiny("bert")
    assert bert.mlm.decoder.weight.data_ptr() == bert.transformer.tok_emb.weight.data_ptr()
    llama = tiny("llama-gqa")
    assert llama.lm_head.weight.data_ptr() != llama.transformer.tok_emb.weight.data_ptr()


def test_tied_gradients_flow_to_one_tensor():
    torch.manual_seed(0)
    model = build(ModelConfig(**GPT2))
    x = tokens(0, 2, 6)
    model(x).sum().backward()
    assert model.transformer.tok_emb.weight.grad is model.lm_head.weight.grad
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


def test_rmsnorm_keeps_float64_and_upcasts_half():
    """At least fp32 inside: a float64 input is normalised in float64, not rounded through fp32."""
    from lmforge.model.layers import RMSNorm

    norm = RMSNorm(8, eps=1e-6).double()
    x = torch.randn(3, 8, dtype=torch.float64) * (1 + 1e-12)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert norm(x).dtype == torch.float64
    assert (norm(x) - want).abs().max().item() < 1e-14
    assert RMSNorm(8).half()(x.half()).dtype == torch.float16
