# %% [markdown]
# # 02 · The bigram model: the next character from the current one
#
# The simplest language model looks at one token and guesses the next. All it needs is a table
# `P[a, b]`: the probability that `b` follows `a`. We build that table twice: once by **counting**,
# once by **gradient descent** on a table of logits. Then we copy the learned table into lmforge's
# `BigramLM` and check that it computes the same logits and the same loss.
#
# The text is tiny shakespeare when a `shared/data/tinyshakespeare/input.txt` sits in this folder
# or one above it (the project's machines have one); otherwise lmforge's built-in generated
# stories (offline, always there) stand in for it.

# %%
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data import stories
from lmforge.model import BigramLM, ModelConfig, causal_lm_loss
from lmforge.tokenizer import CharTokenizer

torch.manual_seed(0)


def find_shakespeare():
    for folder in [Path.cwd(), *Path.cwd().parents]:
        path = folder / "shared" / "data" / "tinyshakespeare" / "input.txt"
        if path.is_file():
            return path
    return None


path = find_shakespeare()
if path is not None:
    text = path.read_text(encoding="utf-8")
    print(f"tiny shakespeare ({path}): {len(text):,} characters")
else:
    text = "\n\n".join(stories(2000, seed=0))
    print(f"tiny shakespeare not found: using {len(text):,} characters of lmforge's built-in stories")

tok = CharTokenizer.train([text])
data = torch.tensor(tok.encode(text))  # (N,) every character of the text as an id
V = tok.vocab_size
print("vocab", V, "tokens", len(data))

# %% [markdown]
# ## Counting
#
# Count every adjacent pair `(a, b)` in the text. Normalising each row gives `P[a, :]`, the
# distribution of what follows `a`. Adding 1 to every count (smoothing) keeps unseen pairs
# possible. The quality of a model is its average **negative log-likelihood** on the text: how
# surprised it is, on average, by each actual next character. Guessing uniformly scores `ln V`.

# %%
counts = torch.zeros(V, V)  # (V, V): counts[a, b] = how often b follows a
counts.index_put_((data[:-1], data[1:]), torch.ones(len(data) - 1), accumulate=True)
P = (counts + 1) / (counts + 1).sum(dim=1, keepdim=True)  # (V, V), each row sums to 1
nll_counts = -P[data[:-1], data[1:]].log().mean()
print(f"count model NLL {nll_counts:.4f}  (uniform guess: ln V = {math.log(V):.4f})")

# %% [markdown]
# ## Learning the same table
#
# Now a table `W` of *logits* (any real numbers), turned into probabilities by a softmax along each
# row. The loss is the same negative log-likelihood, which `F.cross_entropy` computes from the
# logits; its minimum is at `W[a] = log(counts[a] / counts[a].sum())` plus any constant per row:
# the counting answer again (without the +1). We train on random batches of windows, the way every
# later model trains.

# %%
def get_batch(batch_size=32, context=64):
    start = torch.randint(len(data) - context - 1, (batch_size,))  # (B,)
    window = torch.stack([data[s:s + context + 1] for s in start])  # (B, T+1)
    return window[:, :-1], window[:, 1:]  # inputs (B, T), targets (B, T): the next character


W = torch.zeros(V, V, requires_grad=True)  # (V, V): W[a] are the logits of what follows a
opt = torch.optim.Adam([W], lr=0.3)
for step in range(150):
    x, y = get_batch()
    logits = W[x]  # (B, T, V): row x[b, t] of the table at every position
    loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0 or step == 149:
        print(f"step {step:3d}  loss {loss.item():.4f}")

with torch.no_grad():
    logp = W.log_softmax(dim=1)  # (V, V): log P[a, b]; the same as cross-entropy, without a (N, V) tensor
    nll_learned = -logp[data[:-1], data[1:]].mean()
print(f"learned table NLL {nll_learned:.4f}  vs counting {nll_counts:.4f}")

# %% [markdown]
# ## The same model in lmforge
#
# `BigramLM` is exactly this: an `nn.Embedding(V, V)` whose row `a` holds the next-token logits.
# Copy our table into it and compare the logits and the loss (lmforge's `causal_lm_loss` is the
# mean cross-entropy of already-shifted targets).

# %%
cfg = ModelConfig.from_preset("bigram", vocab_size=V)
model = BigramLM(cfg)
with torch.no_grad():
    model.table.weight.copy_(W)

x, y = get_batch()
with torch.no_grad():
    ours = W[x]  # (B, T, V)
    theirs = model(x)  # (B, T, V)
    loss_ours = F.cross_entropy(ours.reshape(-1, V), y.reshape(-1))
    loss_theirs = causal_lm_loss(theirs, y)
print("max |logit difference|", (ours - theirs).abs().max().item())
assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
assert abs(loss_ours.item() - loss_theirs.item()) < 1e-6

# %% [markdown]
# ## Sampling
#
# To generate, start from a token, turn its row of logits into probabilities, draw the next token
# from them, and repeat. The bigram model forgets everything but the last character, so the text
# has plausible letter pairs and no words: the next notebooks let tokens look further back.

# %%
g = torch.Generator().manual_seed(1)
ids = [tok.encode("\n")[0]]
with torch.no_grad():
    for _ in range(200):
        logits = model(torch.tensor([[ids[-1]]]))[0, -1]  # (V,)
        ids.append(torch.multinomial(logits.softmax(-1), 1, generator=g).item())
print(tok.decode(ids))

# %% [markdown]
# **Next:** [03 · attention without weights](03_attention_without_weights.ipynb): letting every
# position look at the ones before it.
