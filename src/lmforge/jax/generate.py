"""Generation in JAX with a key/value cache, compiled once per (batch, prompt length, new tokens).

Everything has a static shape under ``jax.jit``:

* a token buffer ``ids`` (B, L + n): left-padded prompts, then room for the n new tokens;
* an attention mask of the same shape (0 on the padding, 1 elsewhere);
* a KV cache of L + n slots per layer (``model.init_cache``) and a position index: the prompt
  goes in once (*prefill*, written at slots 0..L-1), then each new token is written at slot
  ``L + t`` (*decode*); the causal mask hides the slots not written yet.

The decode steps run inside ``jax.lax.scan``, so the whole generation is one compiled call.
Positions count real tokens only, so a left-padded row generates what it would alone, as in
``lmforge.generate``; greedy decoding (``temperature=0``) gives the same tokens as the PyTorch
generator on the same weights. Sampling: temperature, then top-k, then a draw with
``jax.random.categorical`` from ``jax.random.key(seed)``.

Unlike the PyTorch generator, the cache does not slide: prompt + ``max_new_tokens`` must fit in
``context_length``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from lmforge.errors import ConfigError, InputError
from lmforge.jax.model import init_cache


def sample_next(logits, key, temperature, top_k):
    """One token per row (B,) from next-token logits (B, V): the argmax at temperature 0, else
    logits / temperature, only the top_k largest kept, and a categorical draw. ``temperature`` and
    ``top_k`` may be traced values, so one compiled program serves every setting."""
    V = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)  # (B,)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    kth = jnp.sort(scaled, axis=-1)[:, V - jnp.clip(top_k, 1, V)][:, None]  # (B, 1) the k-th largest
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1)  # (B,)
    return jnp.where(temperature == 0, greedy, drawn)


@partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, ids, mask, L: int, n: int, temperature, top_k, key):
    """ids, mask (B, L + n) -> the n new tokens (B, n)."""
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, ids.shape[0], L + n)
    pos = jnp.sum(mask[:, :L], axis=-1, keepdims=True)  # (B, 1) position of the first new token
    # prefill: the whole prompt at once, its keys/values into slots 0..L-1
    logits, cache = model(ids[:, :L], attention_mask=mask, cache=cache, index=0, last_only=True)

    def step(carry, t):
        logits, cache, pos, key = carry
        key, sub = jax.random.split(key)
        nxt = sample_next(logits[:, -1], sub, temperature, top_k)  # (B,)
        # decode: one token, written at slot L + t, attending over the cache
        logits, cache = model(nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, index=L + t,
                              last_only=True)
        return (logits, cache, pos + 1, key), nxt

    (logits, _, _, key), tokens = jax.lax.scan(step, (logits, cache, pos, key), jnp.arange(n - 1))
    last = sample_next(logits[:, -1], jax.random.split(key)[1], temperature, top_k)  # (B,)
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)  # (B, n)


def generate(model, prompt_ids, max_new_tokens: int = 100, temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, eos_id: int | None = None):
    """New tokens for one prompt (a list of ids -> a list) or a batch (a list of lists -> lists).
    A row stops at ``eos_id`` (left out of the output)."""
    cfg = model.config
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ConfigError(f"max_new_tokens: got {max_new_tokens!r}, expected an integer >= 0")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ConfigError(f"temperature: got {temperature!r}, expected a number >= 0 (0 = greedy)")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ConfigError(f"top_k: got {top_k!r}, expected an integer >= 1 or None")
    if hasattr(prompt_ids, "tolist"):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise InputError(f"prompt_ids: got {prompt_ids!r:.60}, expected a non-empty list of token ids or a list "
                         "of such lists")
    single = not isinstance(prompt_ids[0], (list, tuple))
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p or not all(isinstance(t, int) and 0 <= t < cfg.vocab_size for t in p):
            raise InputError(f"prompt {i}: expected a non-empty list of token ids in [0, {cfg.vocab_size})")
    L, n = max(map(len, prompts)), max_new_tokens
    if cfg.arch == "decoder" and L + n > cfg.context_length:
        raise InputError(f"prompt of {L} tokens + max_new_tokens={n} is {L + n} tokens, longer than the model's "
                         f"context_length {cfg.context_length}; the JAX cache does not slide, expected at most "
                         f"{cfg.context_length}")
    if n == 0:
        return [] if single else [[] for _ in prompts]
    ids = jnp.array([[0] * (L - len(p)) + p + [0] * n for p in prompts], dtype=jnp.int32)  # (B, L + n)
    mask = jnp.array([[0] * (L - len(p)) + [1] * (len(p) + n) for p in prompts], dtype=jnp.int32)
    graphdef, state = nnx.split(model)
    k = cfg.vocab_size if top_k is None else min(top_k, cfg.vocab_size)
    out = _generate(graphdef, state, ids, mask, L, n, jnp.float32(temperature), jnp.int32(k), jax.random.key(seed))
    rows = [[int(t) for t in row] for row in jax.device_get(out)]
    if eos_id is not None:
        rows = [r[:r.index(eos_id)] if eos_id in r else r for r in rows]
    return rows[0] if single else rows


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0) -> str:
    """The text generated after ``prompt``."""
    ids = tokenizer.encode(prompt) or ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])
    if not ids:
        raise InputError(f"prompt: {prompt!r} encodes to no tokens and the tokenizer has no bos token")
    new = generate(model, ids, max_new_tokens, temperature, top_k, seed, eos_id=tokenizer.eos_id)
    return tokenizer.decode(new)
