"""Step 3 of 5: multi-head self-attention -- several heads look for different things at once.

lmforge.jax.model.Attention runs n_head heads with one fused q/k/v matmul and a projection back
to the model width; it is the exact twin of lmforge's PyTorch Attention.

    python docs/jax/03_multihead.py
"""

import jax.numpy as jnp
from flax import nnx

from lmforge.errors import DataError
from lmforge.jax.learn import budget, load_data, sample, train
from lmforge.jax.model import Attention
from lmforge.model import ModelConfig

CONTEXT = 32


class MultiHeadLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.n_embd, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.context_length, cfg.n_embd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.n_embd, cfg.vocab_size, rngs=rngs)

    def __call__(self, ids):
        B, T = ids.shape
        x = self.tok_emb(ids) + self.pos_emb(jnp.arange(T))  # (B, T, C)
        x, _ = self.attn(x)  # (B, T, C): 4 heads of 16 dims each, concatenated and projected
        return self.lm_head(x)  # (B, T, V)


try:
    tokenizer, train_ids, val_ids = load_data()
except DataError as e:  # no text file: one line, not a traceback
    raise SystemExit(f"{__file__}: {e}") from None
cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, n_layer=1, n_head=4, n_embd=64)
model = MultiHeadLM(cfg, rngs=nnx.Rngs(0))
train(model, train_ids, val_ids, steps=budget(1500), context=CONTEXT, lr=1e-3)
print(sample(model, tokenizer, CONTEXT))
