"""lmforge.jax.generate: greedy decoding identical to the PyTorch generator for 100 tokens, sampling
options, bad ids and lengths."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


# These tests spend most of their time compiling tiny programs: XLA's cheapest optimisation level
# compiles them in about 2/3 of the CPU time (the models are too small to notice at run time).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
jax = pytest.importorskip("jax")  # the extra is part of `make test`'s install; skipped only without it
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from lmforge.errors import InputError  # noqa: E402
from lmforge.jax import build, generate, to_jax  # noqa: E402
from lmforge.model import ModelConfig, build as torch_build  # noqa: E402
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


def test_bad_ids_and_lengths_are_input_errors():
    jmodel = build(ModelConfig(**GPT2))
    with pytest.raises(InputError, match="token id 53 is out of range"):
        jmodel(jnp.array([[1, 53]]))
    with pytest.raises(InputError, match="longer than the model's context_length 24"):
        jmodel(jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(InputError, match="context_length 24"):
        generate(jmodel, [1, 2, 3], max_new_tokens=22)


@pytest.mark.parametrize("style", STYLES)
def test_greedy_100_tokens_identical_to_pytorch_generator(style):
    from lmforge.generate import generate as torch_generate

    fields = {**STYLES[style], "context_length": 128}
    tm = torch_model(fields, seed=6, scale=6.0)
    jmodel = to_jax(tm)
    prompts = [[5, 9, 2, 7, 1, 30, 11], [3, 4]]  # different lengths: left padding in the batch
    want = torch_generate(tm, prompts, max_new_tokens=100, temperature=0)
    got = generate(jmodel, prompts, max_new_tokens=100, temperature=0)
    assert got == want and len(got[0]) == 100


def test_sampling_temperature_and_top_k():
    jmodel = build(ModelConfig(**GPT2), seed=7)
    prompt = [1, 2, 3]
    greedy = generate(jmodel, prompt, max_new_tokens=12)
    assert generate(jmodel, prompt, max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy
    a = generate(jmodel, prompt, max_new_tokens=12, temperature=1.5, seed=11)
    assert a == generate(jmodel, prompt, max_new_tokens=12, temperature=1.5, seed=11)
    assert a != generate(jmodel, prompt, max_new_tokens=12, temperature=1.5, seed=12)
    # top-k: every sampled token is among the k most likely given its prefix
    toks = generate(jmodel, prompt, max_new_tokens=12, temperature=2.0, top_k=3, seed=5)
    logits = fwd(jmodel, jnp.asarray([prompt + toks[:9]] * 3))[0]  # (12, V): the shape other tests compiled
    for i, tok in enumerate(toks[:9]):
        top3 = np.argsort(np.asarray(logits[len(prompt) - 1 + i]))[-3:]
        assert tok in top3
