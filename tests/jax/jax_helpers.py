"""Helpers shared by the JAX twin's tests: two tiny model shapes (GPT-2 and Llama style), the
PyTorch twin of a shape, jitted forwards and the largest difference between two arrays.
Import it after ``pytest.importorskip("jax")``."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

from lmforge.model import ModelConfig, build as torch_build

TOL = 1e-4

GPT2 = dict(arch="decoder", vocab_size=53, context_length=24, n_layer=2, n_head=4, n_embd=32,
            activation="gelu_tanh", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)
LLAMA = dict(arch="decoder", vocab_size=53, context_length=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
             activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positional="rope", bias=False,
             tie_embeddings=False)
STYLES = {"gpt2": GPT2, "llama": LLAMA}


def torch_model(fields: dict, seed: int = 0, scale: float = 1.0):
    torch.manual_seed(seed)
    m = torch_build(ModelConfig(**fields)).eval()
    if scale != 1.0:  # larger weights: decisive logits (greedy ties cannot flip on rounding)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return m


@nnx.jit
def fwd(model, ids, mask=None):
    """Logits under jit: one compiled program instead of op-by-op dispatch (much faster on CPU)."""
    return model(ids, attention_mask=mask)


@nnx.jit
def fwd_cached(model, ids, cache, index):
    return model(ids, cache=cache, index=index)


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
