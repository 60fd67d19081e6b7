"""Step 4 of 5: the transformer block -- attention (communication) then an MLP (computation),
each behind a LayerNorm and inside a residual connection; stack a few.

    python docs/jax/04_block.py
"""

import jax.numpy as jnp
from flax import nnx

from lmforge.errors import DataError
from lmforge.jax.learn import budget, load_data, sample, train
from lmforge.jax.model import Block
from lmforge.model import ModelConfig

CONTEXT = 32


class BlocksLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.n_embd, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.context_length, cfg.n_embd, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.norm = nnx.LayerNorm(cfg.n_embd, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.n_embd, cfg.vocab_size, rngs=rngs)

    def __call__(self, ids):
        B, T = ids.shape
        x = self.tok_emb(ids) + self.pos_emb(jnp.arange(T))  # (B, T, C)
        for block in self.blocks:
            x, _ = block(x)  # x + attn(norm(x)), then x + mlp(norm(x))
        return self.lm_head(self.norm(x))  # (B, T, V)


try:
    tokenizer, train_ids, val_ids = load_data()
except DataError as e:  # no text file: one line, not a traceback
    raise SystemExit(f"{__file__}: {e}") from None
cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, n_layer=3, n_head=4, n_embd=64)
model = BlocksLM(cfg, rngs=nnx.Rngs(0))
train(model, train_ids, val_ids, steps=budget(1500), context=CONTEXT, lr=1e-3)
print(sample(model, tokenizer, CONTEXT))
