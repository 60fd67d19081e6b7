"""lmforge.jax.model: the JAX/Flax NNX twin of the PyTorch decoder, checked against the PyTorch model:
logits within 1e-4 (fp32, highest matmul precision) for GPT-2 and Llama styles with and without
padding, each block, causality, the KV cache, and the missing extra named."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F


# These tests spend most of their time compiling tiny programs: XLA's cheapest optimisation level
# compiles them in about 2/3 of the CPU time (the models are too small to notice at run time).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
jax = pytest.importorskip("jax")  # the extra is part of `make test`'s install; skipped only without it
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from lmforge.jax import build, from_state_dict, init_cache, to_jax, model as jm  # noqa: E402
from lmforge.model import ModelConfig, layers as tl  # noqa: E402
from tests.jax.jax_helpers import TOL, STYLES, torch_model, fwd, fwd_cached, t2n, max_diff  # noqa: E402


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("style", STYLES)
def test_decoder_logits_match_pytorch(style):
    tm = torch_model(STYLES[style])
    jmodel = to_jax(tm)
    ids = torch.randint(0, 53, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = t2n(tm(ids))
    got = fwd(jmodel, jnp.asarray(ids.numpy()))
    assert got.shape == (3, 12, 53)
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_decoder_logits_match_pytorch_with_padding(style):
    tm = torch_model(STYLES[style])
    jmodel = to_jax(tm)
    ids = torch.randint(0, 53, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    with torch.no_grad():
        want = t2n(tm(ids, attention_mask=mask))
    got = fwd(jmodel, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert max_diff(got, want) <= TOL
    # a left-padded row gives the same logits as the row alone (positions count real tokens)
    alone = torch.cat([ids[:, 5:], ids[:, :5]], dim=1)  # row 0's real tokens first (what follows is unseen)
    assert max_diff(got[0, 5:], fwd(jmodel, jnp.asarray(alone.numpy()))[0, :7]) <= TOL


def test_bigram_matches_pytorch():
    tm = torch_model(dict(arch="bigram", vocab_size=40, n_layer=1, n_head=1, n_embd=8, positional="none"))
    jmodel = to_jax(tm)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert max_diff(fwd(jmodel, jnp.asarray(ids.numpy())), t2n(tm(ids))) <= TOL


def test_single_head_matches_scaled_dot_product_attention():
    head = jm.Head(16, 8, rngs=nnx.Rngs(0), init_std=0.3)
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)
    W = {n: torch.from_numpy(np.asarray(getattr(head, n).kernel.get_value())) for n in ("query", "key", "value")}
    xt = torch.from_numpy(x)
    want = F.scaled_dot_product_attention(xt @ W["query"], xt @ W["key"], xt @ W["value"], is_causal=True)
    assert max_diff(nnx.jit(lambda m, x: m(x))(head, jnp.asarray(x)), t2n(want)) <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_attention_mlp_block_match_pytorch(style):
    cfg = ModelConfig(**STYLES[style])
    torch.manual_seed(3)
    x = torch.randn(2, 10, cfg.n_embd)
    rope_t = tl.RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(10)[None]) if style == "llama" else None
    rope_j = jm.rope_angles(jnp.arange(10)[None], cfg.head_dim, cfg.rope_theta) if style == "llama" else None
    for tmod, jmod in ((tl.Attention(cfg), jm.Attention(cfg, rngs=nnx.Rngs(0))),
                       (tl.Block(cfg), jm.Block(cfg, rngs=nnx.Rngs(0)))):
        with torch.no_grad():
            for p in tmod.parameters():
                p.normal_(0, 0.3)
            want = t2n(tmod(x, rope_t, None, True))
        from_state_dict(jmod, tmod.state_dict())
        got, cache = nnx.jit(lambda m, x, rope: m(x, rope))(jmod, jnp.asarray(x.numpy()), rope_j)
        assert cache is None and max_diff(got, want) <= TOL
    tmlp, jmlp = tl.MLP(cfg), jm.MLP(cfg, rngs=nnx.Rngs(0))
    from_state_dict(jmlp, tmlp.state_dict())
    with torch.no_grad():
        assert max_diff(nnx.jit(lambda m, x: m(x))(jmlp, jnp.asarray(x.numpy())), t2n(tmlp(x))) <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_causal_a_later_token_never_changes_earlier_logits(style):
    jmodel = build(ModelConfig(**STYLES[style]), seed=4)
    ids = np.random.default_rng(4).integers(0, 53, (3, 12))
    base = fwd(jmodel, jnp.asarray(ids))
    changed = ids.copy()
    changed[:, 7:] = (changed[:, 7:] + 7) % 53
    out = fwd(jmodel, jnp.asarray(changed))
    assert max_diff(out[:, :7], base[:, :7]) == 0.0
    assert max_diff(out[:, 7:], base[:, 7:]) > 1e-3


# ------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_equals_uncached(style):
    jmodel = build(ModelConfig(**STYLES[style]), seed=5)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 53, (3, 12)))
    full = fwd(jmodel, ids)  # (B, T, V)
    cache = init_cache(jmodel.config, 3, 16)
    logits, cache = fwd_cached(jmodel, ids[:, :7], cache, 0)
    steps = [logits]
    for t in range(7, 12):
        logits, cache = fwd_cached(jmodel, ids[:, t:t + 1], cache, t)
        steps.append(logits)
    assert max_diff(jnp.concatenate(steps, axis=1), full) <= TOL
