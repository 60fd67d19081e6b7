"""lmforge.model (the package's own functions): build from a preset, a dict or a config; parameter
counts and FLOPs per token by hand."""

from __future__ import annotations

import functools

import pytest
import torch

from lmforge.model import (
    PRESETS, BigramLM, DecoderLM, Encoder, ModelConfig, build, count_parameters, flops_per_token, summary,
)

V, CTX = 37, 16  # tiny vocabulary and context shared by the test models
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


def test_model_classes():
    assert isinstance(tiny("gpt2"), DecoderLM)
    assert isinstance(tiny("llama-gqa"), DecoderLM)
    assert isinstance(tiny("bert"), Encoder)
    assert isinstance(tiny("bigram"), BigramLM)
    assert tiny("llama-mqa").transformer.blocks[0].attn.n_kv_head == 1


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
