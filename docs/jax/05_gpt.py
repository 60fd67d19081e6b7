"""Step 5 of 5: GPT -- lmforge's DecoderLM from a ModelConfig: the blocks of step 4 plus a final
norm, weight tying and GPT-2's initialisation. The same config builds the PyTorch model, and
the weights convert both ways (lmforge.jax.to_torch / to_jax). Sampling uses the KV-cache
generator (lmforge.jax.generate), compiled once.

    python docs/jax/05_gpt.py
"""

import os

from lmforge.errors import DataError
from lmforge.jax import build, generate_text
from lmforge.jax.learn import budget, load_data, train
from lmforge.model import ModelConfig

CONTEXT = 64

try:
    tokenizer, train_ids, val_ids = load_data()
except DataError as e:  # no text file: one line, not a traceback
    raise SystemExit(f"{__file__}: {e}") from None
cfg = ModelConfig.from_preset("baby", vocab_size=tokenizer.vocab_size, context_length=CONTEXT)  # 4 layers, 128 wide
model = build(cfg)
train(model, train_ids, val_ids, steps=budget(1500), context=CONTEXT, lr=1e-3)
model.eval()
n = min(CONTEXT - 1, int(os.environ.get("LMFORGE_JAX_SAMPLE", CONTEXT - 1)))  # the cache holds CONTEXT positions
print("\n" + generate_text(model, tokenizer, "\n", max_new_tokens=n, temperature=1.0, seed=0))
