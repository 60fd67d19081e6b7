"""Tiny versions of each model family, shared by the model tests: the same fields as the presets,
a few thousand parameters, cached so hypothesis examples share them."""

from __future__ import annotations

import functools

import torch
from hypothesis import settings

from lmforge.model import ModelConfig, build

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
