"""Small helpers for the learning path in ``docs/jax/``: data, a training loop, a sampler.

Each script of the path defines its model and calls these three functions, so the script shows
only what is new at its step. The loop is the plain Flax NNX way: ``nnx.Optimizer`` around
``optax.adamw``, a step compiled with ``nnx.jit``.

Budget and data come from the environment, so a test can run every script for a few steps on a
tiny text: ``LMFORGE_JAX_STEPS`` (training steps), ``LMFORGE_JAX_SAMPLE`` (sampled characters)
and ``LMFORGE_JAX_DATA`` (a text file; default ``catalog:tinyshakespeare``, see ``lmforge data list``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmforge.data import catalog
from lmforge.errors import DataError
from lmforge.jax.model import cross_entropy
from lmforge.tokenizer import CharTokenizer

DEFAULT_DATA = "catalog:tinyshakespeare"  # the named dataset (lmforge.data.catalog): mirror, cache or download


def budget(default_steps: int) -> int:
    """Training steps: ``LMFORGE_JAX_STEPS`` when set, else the script's default."""
    return int(os.environ.get("LMFORGE_JAX_STEPS", default_steps))


def load_data(path: str | os.PathLike | None = None):
    """(tokenizer, train ids, val ids): a character tokenizer (lmforge's) and a 90/10 split."""
    spec = str(path or os.environ.get("LMFORGE_JAX_DATA") or DEFAULT_DATA)
    path = catalog.local_path(spec)  # catalog:NAME is its local file; any other path as it is
    if not path.is_file():
        raise DataError(f"{path}: text file not found; set LMFORGE_JAX_DATA to a text file (e.g. tiny shakespeare)")
    text = path.read_text(encoding="utf-8")
    tok = CharTokenizer.train([text])
    ids = np.array(tok.encode(text), dtype=np.int32)
    n = int(0.9 * len(ids))
    return tok, ids[:n], ids[n:]


def get_batch(ids: np.ndarray, batch_size: int, context: int, rng: np.random.Generator):
    """Random windows: x (B, T) and the next tokens y (B, T)."""
    starts = rng.integers(0, len(ids) - context - 1, batch_size)
    idx = starts[:, None] + np.arange(context + 1)[None]  # (B, T+1)
    w = jnp.asarray(ids[idx])
    return w[:, :-1], w[:, 1:]


def loss_fn(model, x, y):
    return cross_entropy(model(x), y)  # model(x): (B, T, V)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)  # AdamW step on the model's parameters, in place
    return loss


@nnx.jit
def eval_step(model, x, y):
    return loss_fn(model, x, y)


def train(model, train_ids, val_ids, *, steps: int, context: int, batch_size: int = 16, lr: float = 1e-3,
          eval_batches: int = 20, seed: int = 0, say=print) -> float:
    """Train ``model`` for ``steps`` AdamW steps; returns (and prints) the validation loss."""
    rng = np.random.default_rng(seed)
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)
    for step in range(1, steps + 1):
        loss = train_step(model, optimizer, *get_batch(train_ids, batch_size, context, rng))
        if step % max(1, steps // 5) == 0 or step == steps:
            say(f"step {step}/{steps}: train loss {float(loss):.4f}")
    val_rng = np.random.default_rng(seed + 1)
    val = float(np.mean([eval_step(model, *get_batch(val_ids, batch_size, context, val_rng))
                         for _ in range(eval_batches)]))
    say(f"val loss {val:.4f}")
    return val


@nnx.jit
def _next_token(model, buf, cur, key):
    logits = model(buf)  # (1, T, V): causal, so position cur-1 sees only the tokens up to it
    last = jax.lax.dynamic_index_in_dim(logits[0], cur - 1, keepdims=False)  # (V,)
    return jax.random.categorical(key, last)


def sample(model, tokenizer, context: int, n: int | None = None, prompt: str = "\n", seed: int = 0) -> str:
    """``n`` sampled characters after ``prompt`` (``LMFORGE_JAX_SAMPLE`` or 200), from a window of
    the last ``context`` tokens (one compiled shape: the window is a fixed (1, context) buffer)."""
    n = int(os.environ.get("LMFORGE_JAX_SAMPLE", 200)) if n is None else n
    ids = (tokenizer.encode(prompt) or [0])[-context:]
    buf = np.zeros((1, context), dtype=np.int32)
    buf[0, :len(ids)] = ids
    cur, out = len(ids), []
    keys = jax.random.split(jax.random.key(seed), n)
    for i in range(n):
        nxt = int(_next_token(model, jnp.asarray(buf), cur, keys[i]))
        out.append(nxt)
        if cur == context:  # window full: slide it by one
            buf[0, :-1] = buf[0, 1:]
            cur -= 1
        buf[0, cur] = nxt
        cur += 1
    return prompt + tokenizer.decode(out)
