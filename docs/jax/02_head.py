"""Step 2 of 5: one head of causal self-attention -- characters look back at earlier ones.

Each position embeds its character and its position, then one attention head (lmforge.jax.model.Head)
mixes in information from the positions before it; a linear layer reads the next-character logits.

    python docs/jax/02_head.py
"""

import jax.numpy as jnp
from flax import nnx

from lmforge.errors import DataError
from lmforge.jax.learn import budget, load_data, sample, train
from lmforge.jax.model import Head

CONTEXT, N_EMBD = 32, 64


class SingleHeadLM(nnx.Module):
    def __init__(self, vocab_size: int, *, rngs: nnx.Rngs):
        self.tok_emb = nnx.Embed(vocab_size, N_EMBD, rngs=rngs)
        self.pos_emb = nnx.Embed(CONTEXT, N_EMBD, rngs=rngs)
        self.head = Head(N_EMBD, N_EMBD, rngs=rngs)
        self.lm_head = nnx.Linear(N_EMBD, vocab_size, rngs=rngs)

    def __call__(self, ids):
        B, T = ids.shape
        x = self.tok_emb(ids) + self.pos_emb(jnp.arange(T))  # (B, T, C)
        x = self.head(x)  # (B, T, C): each position a weighted mix of the ones before it
        return self.lm_head(x)  # (B, T, V)


try:
    tokenizer, train_ids, val_ids = load_data()
except DataError as e:  # no text file: one line, not a traceback
    raise SystemExit(f"{__file__}: {e}") from None
model = SingleHeadLM(tokenizer.vocab_size, rngs=nnx.Rngs(0))
train(model, train_ids, val_ids, steps=budget(1500), context=CONTEXT, lr=1e-3)
print(sample(model, tokenizer, CONTEXT))
