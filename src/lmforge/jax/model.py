"""The lmforge decoder in JAX / Flax NNX, from a bigram table to GPT, read top to bottom.

This file is the twin of ``lmforge/model/{bigram,layers,transformer}.py``: the same
:class:`~lmforge.model.ModelConfig`, the same modules, the same parameter names (so weights move
both ways, see ``convert.py``) and the same numbers. It grows the model the way the learning path
in ``docs/jax/`` does:

1. :class:`BigramLM`    -- a (vocab x vocab) table: the next token from the current one alone.
2. :class:`Head`        -- one head of causal scaled self-attention: tokens look at the past.
3. :class:`Attention`   -- many heads at once (one fused q/k/v projection), RoPE, grouped kv heads.
4. :class:`Block`       -- attention and an MLP, each behind a norm and inside a residual.
5. :class:`DecoderLM`   -- embeddings, blocks, a final norm and the language-model head (GPT).

GPT-2 style (learned positions, LayerNorm, GELU, biases, tied embeddings) and Llama style (RoPE,
RMSNorm, SwiGLU, grouped-query attention) are fields of the config, not separate classes.

Shapes: B batch, T new tokens, S keys (cached + new), C n_embd, V vocab, nh query heads,
nkv key/value heads, hs head size. Flax's ``Linear`` stores its kernel as (in, out), PyTorch's as
(out, in); ``convert.py`` transposes.

Causal masking is built into every attention call: a position never sees a later one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmforge.errors import ConfigError, InputError
from lmforge.model.config import ModelConfig

normal = nnx.initializers.normal


# ----------------------------------------------------------------------------- config checks
def check_supported(cfg: ModelConfig) -> ModelConfig:
    """Raise one ConfigError naming every field this JAX twin does not implement yet."""
    cfg.validate()
    p = []
    if cfg.arch not in ("decoder", "bigram"):
        p.append(f"model.arch: {cfg.arch!r} is not supported by lmforge.jax yet (expected decoder or bigram)")
    if cfg.arch == "decoder":
        if cfg.norm_position != "pre":
            p.append(f"model.norm_position: {cfg.norm_position!r} is not supported by lmforge.jax yet (expected pre)")
        if cfg.embedding_norm:
            p.append("model.embedding_norm: true is not supported by lmforge.jax yet (expected false)")
        if cfg.type_vocab_size:
            p.append(f"model.type_vocab_size: {cfg.type_vocab_size} is not supported by lmforge.jax yet (expected 0)")
    if p:
        raise ConfigError(p)
    return cfg


class _HasConfig:
    """Modules keep their config as a tuple of fields (hashable, as Flax wants its static data)."""

    _config_items: tuple

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(**dict(self._config_items))


def _freeze(cfg: ModelConfig) -> tuple:
    return tuple(cfg.to_dict().items())


# ============================================================================ 1. bigram
class BigramLM(_HasConfig, nnx.Module):
    """The next token depends only on the current one: a (V, V) table of next-token logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self._config_items = _freeze(cfg)
        self.table = nnx.Embed(cfg.vocab_size, cfg.vocab_size, embedding_init=normal(cfg.init_std), rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, index=0, last_only=False):
        check_ids(input_ids, self.config, index)
        if last_only:
            input_ids = input_ids[:, -1:]
        logits = self.table(input_ids)  # (B, T, V)
        return logits if cache is None else (logits, cache)


# ============================================================================ 2. one attention head
def causal_mask(T: int, S: int | None = None, index=0):
    """(T, S) booleans: query t (at position index + t) may see key s when s <= index + t."""
    S = T if S is None else S
    q_pos = index + jnp.arange(T)[:, None]  # (T, 1)
    k_pos = jnp.arange(S)[None, :]  # (1, S)
    return k_pos <= q_pos  # (T, S)


class Head(nnx.Module):
    """One head of causal scaled self-attention, the textbook way: every token emits a query
    ("what am I looking for"), a key ("what do I contain") and a value ("what I pass on"); the
    softmax of q.k / sqrt(hs), hiding the future, weights the values."""

    def __init__(self, n_embd: int, head_size: int, *, rngs: nnx.Rngs, init_std: float = 0.02):
        self.key = nnx.Linear(n_embd, head_size, use_bias=False, kernel_init=normal(init_std), rngs=rngs)
        self.query = nnx.Linear(n_embd, head_size, use_bias=False, kernel_init=normal(init_std), rngs=rngs)
        self.value = nnx.Linear(n_embd, head_size, use_bias=False, kernel_init=normal(init_std), rngs=rngs)

    def __call__(self, x):
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        att = q @ k.swapaxes(-2, -1) / math.sqrt(k.shape[-1])  # (B, T, T) affinities
        att = jnp.where(causal_mask(T), att, -jnp.inf)  # no peeking at later tokens
        att = jax.nn.softmax(att, axis=-1)  # (B, T, T) each row sums to 1
        return att @ v  # (B, T, hs)


# ============================================================================ 3. multi-head attention
def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm (GPT-2; two-pass variance, as PyTorch computes it) or RMSNorm (Llama)."""
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.n_embd, epsilon=cfg.norm_eps, rngs=rngs)
    return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.norm_eps, use_bias=cfg.bias, use_fast_variance=False, rngs=rngs)


def rope_angles(position_ids, head_dim: int, theta: float):
    """position_ids (B, T) -> cos, sin (B, 1, T, hs) of the rotary embedding ("rotate half" layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # (hs/2,)
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq  # (B, T, hs/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (B, T, hs)
    return jnp.cos(emb)[:, None], jnp.sin(emb)[:, None]


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hs/2}) of x (B, heads, T, hs) by the angles in cos/sin."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    """Multi-head causal self-attention with grouped key/value heads (MHA when nkv == nh, MQA when
    nkv == 1). One matmul makes the queries, keys and values of every head.

    With a KV cache (a (k, v) pair of (B, nkv, max_len, hs) buffers) the new keys and values are
    written at ``index`` and the queries attend over the whole buffer; the mask hides the slots not
    written yet (they lie in the future), so every shape stays fixed under ``jax.jit``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual init
        self.qkv = nnx.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, use_bias=cfg.bias,
                              kernel_init=normal(cfg.init_std), rngs=rngs)
        self.proj = nnx.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, use_bias=cfg.bias,
                               kernel_init=normal(residual_std), rngs=rngs)
        self.attn_drop = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, rope=None, mask=None, cache=None, index=0):
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).reshape(B, T, nh + 2 * nkv, hs).transpose(0, 2, 1, 3)  # (B, nh+2nkv, T, hs)
        qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]  # v: (B, nkv, T, hs)
        if rope is not None:  # rotate queries and keys together
            qk = apply_rotary(qk, *rope)
        q, k = qk[:, :nh], qk[:, nh:]  # (B, nh, T, hs), (B, nkv, T, hs)
        if cache is not None:  # write the new keys/values at `index`, read the whole buffer
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, 0, index, 0))  # (B, nkv, S, hs)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, 0, index, 0))
            cache = (k, v)
        if nkv != nh:  # each group of nh/nkv query heads shares one key/value head
            k = jnp.repeat(k, nh // nkv, axis=1)  # (B, nh, S, hs)
            v = jnp.repeat(v, nh // nkv, axis=1)
        S = k.shape[2]
        if mask is None:
            mask = causal_mask(T, S, index)[None, None]  # (1, 1, T, S)
        att = q @ k.swapaxes(-2, -1) / math.sqrt(hs)  # (B, nh, T, S)
        att = jnp.where(mask, att, -jnp.inf)
        att = self.attn_drop(jax.nn.softmax(att, axis=-1))  # (B, nh, T, S)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)  # heads side by side again
        return self.proj(y), cache  # (B, T, C)


# ============================================================================ 4. the decoder block
class MLP(nnx.Module):
    """Position-wise feed-forward: act(x W_in) W_out, or SwiGLU silu(x W_g) * (x W_u) W_out
    (gate and up fused in one matmul, gate first, as in lmforge's PyTorch MLP)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.activation = cfg.activation
        n_in = 2 * cfg.mlp_hidden if cfg.activation == "swiglu" else cfg.mlp_hidden
        self.fc = nnx.Linear(cfg.n_embd, n_in, use_bias=cfg.bias, kernel_init=normal(cfg.init_std), rngs=rngs)
        self.proj = nnx.Linear(cfg.mlp_hidden, cfg.n_embd, use_bias=cfg.bias,
                               kernel_init=normal(cfg.init_std / math.sqrt(2 * cfg.n_layer)), rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x):
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.activation == "swiglu":
            gate, up = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * up  # (B, T, hidden)
        elif self.activation == "gelu_tanh":
            h = jax.nn.gelu(h, approximate=True)
        elif self.activation == "gelu":
            h = jax.nn.gelu(h, approximate=False)
        else:
            h = jax.nn.relu(h)
        return self.drop(self.proj(h))  # (B, T, C)


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.norm1 = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = make_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, rope=None, mask=None, cache=None, index=0):
        a, cache = self.attn(self.norm1(x), rope, mask, cache, index)  # (B, T, C)
        x = x + self.drop(a)
        x = x + self.mlp(self.norm2(x))
        return x, cache


# ============================================================================ 5. the decoder LM (GPT)
def check_ids(input_ids, cfg: ModelConfig, index=0) -> None:
    """Shape checks always; id range checks when the ids are concrete (not inside jax.jit)."""
    if input_ids.ndim != 2:
        raise InputError(f"input_ids: expected shape (batch, time), got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    past = index if isinstance(index, int) else 0
    if cfg.arch == "decoder" and past + T > cfg.context_length:
        raise InputError(f"sequence of {past + T} tokens is longer than the model's context_length "
                         f"{cfg.context_length}")
    if isinstance(input_ids, jax.core.Tracer) or input_ids.size == 0:
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(f"token id {hi if hi >= cfg.vocab_size else lo} is out of range: expected "
                         f"0 <= id < vocab_size={cfg.vocab_size}")


def attention_mask_4d(attention_mask, T: int, S: int, index=0):
    """Causal mask (B|1, 1, T, S) with padding keys (attention_mask (B, >=S), 0 = padding) hidden.
    A padding query would see no key at all; it sees itself, as in the PyTorch model."""
    allowed = causal_mask(T, S, index)[None, None]  # (1, 1, T, S)
    if attention_mask is None:
        return allowed
    keys = attention_mask[:, None, None, :S].astype(bool)  # (B, 1, 1, S)
    own = (jnp.arange(S)[None, :] == index + jnp.arange(T)[:, None])[None, None]  # (1, 1, T, S)
    return (allowed & keys) | own


def default_positions(attention_mask, B: int, T: int, index=0):
    """Positions count real tokens only, so a left-padded prompt gets the same positions as alone."""
    if attention_mask is None:
        return (index + jnp.arange(T))[None]  # (1, T)
    counts = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)  # (B, S)
    return jax.lax.dynamic_slice_in_dim(counts, index, T, axis=1)  # (B, T)


class Transformer(_HasConfig, nnx.Module):
    """Token (+ learned position) embeddings, the blocks, the final norm: ids -> hidden states."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self._config_items = _freeze(cfg)
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=normal(cfg.init_std), rngs=rngs)
        self.pos_emb = (nnx.Embed(cfg.context_length, cfg.n_embd, embedding_init=normal(cfg.init_std), rngs=rngs)
                        if cfg.positional == "learned" else None)
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.norm = make_norm(cfg, rngs)
        self.rope = (cfg.head_dim, cfg.rope_theta) if cfg.positional == "rope" else None

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, index=0):
        """input_ids (B, T) -> hidden (B, T, C); with a cache also the updated cache.

        attention_mask (B, S) marks real tokens with 1 and padding with 0; with a cache it covers
        every slot of the cache (S = max_len)."""
        B, T = input_ids.shape
        S = T if cache is None else cache[0][0].shape[2]
        if position_ids is None:
            position_ids = default_positions(attention_mask, B, T, index)
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)  # (B, T, C)
        x = self.drop(x)
        rope = rope_angles(position_ids, *self.rope) if self.rope is not None else None
        mask = attention_mask_4d(attention_mask, T, S, index)  # (B|1, 1, T, S)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, rope, mask, None if cache is None else cache[i], index)
            new_cache.append(layer_cache)
        x = self.norm(x)
        return x if cache is None else (x, tuple(new_cache))


class DecoderLM(_HasConfig, nnx.Module):
    """Causal language model: ``model(input_ids) -> logits (B, T, V)``.

    With ``cache`` (from :func:`init_cache`) and ``index`` (how many positions it holds) it also
    returns the updated cache: ``logits, cache = model(ids, cache=cache, index=i)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self._config_items = _freeze(cfg)
        self.transformer = Transformer(cfg, rngs=rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        nnx.Linear(cfg.n_embd, cfg.vocab_size, use_bias=False, kernel_init=normal(cfg.init_std),
                                   rngs=rngs))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, index=0, last_only=False):
        check_ids(input_ids, self.config, index)
        out = self.transformer(input_ids, attention_mask, position_ids, cache, index)
        h, cache = (out, None) if cache is None else out  # h: (B, T, C)
        if last_only:  # generation needs only the next-token distribution
            h = h[:, -1:]
        if self.lm_head is None:
            logits = self.transformer.tok_emb.attend(h)  # tied: h @ tok_emb.T, (B, T, V)
        else:
            logits = self.lm_head(h)  # (B, T, V)
        return logits if cache is None else (logits, cache)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None, dtype=jnp.float32) -> tuple:
    """A fixed-size KV cache: per layer a (k, v) pair of zeros (B, nkv, max_len, hs)."""
    if cfg.arch == "bigram":
        return ()
    shape = (batch_size, cfg.n_kv_head, max_len or cfg.context_length, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layer))


def abstract_model(config: ModelConfig | str | dict, seed: int = 0) -> nnx.Module:
    """The JAX model for ``config`` with shapes only (``nnx.eval_shape``): no weights are drawn.
    ``lmforge.jax.convert.build`` fills it with the PyTorch twin's weights."""
    config = ModelConfig.coerce(config)
    check_supported(config)
    cls = {"decoder": DecoderLM, "bigram": BigramLM}[config.arch]
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1)))


def seed_dropout(model: nnx.Module, seed: int) -> None:
    """Give an abstract model concrete dropout random state: one key per dropout layer."""
    base = jax.random.key(seed + 1)
    for i, (_, node) in enumerate(nnx.iter_graph(model)):
        if isinstance(node, nnx.RngKey):
            node.set_value(jax.random.fold_in(base, i))
        elif isinstance(node, nnx.RngCount):
            node.set_value(jnp.zeros((), jnp.uint32))


def cross_entropy(logits, targets, ignore_index: int = -100):
    """Mean next-token cross-entropy over targets != ignore_index; logits (B, T, V), targets (B, T)."""
    valid = targets != ignore_index  # (B, T)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, T, V)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]  # (B, T)
    return -(picked * valid).sum() / jnp.maximum(valid.sum(), 1)
