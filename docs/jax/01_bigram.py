"""Step 1 of 5: the bigram model -- the next character from the current one alone.

A (vocab x vocab) table: row i holds the logits of the character that follows character i.
No context at all, yet it already learns which letters follow which.

    python docs/jax/01_bigram.py        # LMFORGE_JAX_STEPS=... to change the budget
"""

from flax import nnx

from lmforge.errors import DataError
from lmforge.jax.learn import budget, load_data, sample, train
from lmforge.jax.model import BigramLM
from lmforge.model import ModelConfig

CONTEXT = 32

try:
    tokenizer, train_ids, val_ids = load_data()
except DataError as e:  # no text file: one line, not a traceback
    raise SystemExit(f"{__file__}: {e}") from None
cfg = ModelConfig(arch="bigram", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_embd=8,
                  positional="none")
model = BigramLM(cfg, rngs=nnx.Rngs(0))  # model(ids (B, T)) -> logits (B, T, V)

train(model, train_ids, val_ids, steps=budget(1500), context=CONTEXT, lr=1e-2)
print(sample(model, tokenizer, CONTEXT))
