# %% [markdown]
# # 03 · Attention without trainable weights
#
# The bigram model sees one token. To see more, each position should gather information from the
# positions **before** it (never after: when we generate, the future does not exist yet). The
# simplest gathering is an average, and the trick that makes it fast is a matrix product with a
# lower-triangular matrix of weights. Attention is that same product, with weights that depend on
# the tokens themselves. No parameters are trained in this notebook.

# %%
import math

import torch
import torch.nn.functional as F

from lmforge.model.layers import explicit_attention

torch.manual_seed(0)
B, T, C = 2, 6, 8  # batch, time (positions), channels
x = torch.randn(B, T, C, dtype=torch.float64)  # (B, T, C)

# %% [markdown]
# ## 1. The average of the past, with loops
#
# `avg[b, t]` is the mean of `x[b, 0..t]`: position `t` summarised by everything up to itself.

# %%
avg_loop = torch.zeros(B, T, C, dtype=torch.float64)
for b in range(B):
    for t in range(T):
        avg_loop[b, t] = x[b, : t + 1].mean(dim=0)  # (C,)

# %% [markdown]
# ## 2. The same as one matrix product
#
# Row `t` of a lower-triangular matrix whose rows sum to 1 holds the weights `1/(t+1)` on columns
# `0..t` and 0 after. Multiplying it into `x` does all the averages at once.

# %%
w = torch.tril(torch.ones(T, T, dtype=torch.float64))  # (T, T): 1 on and below the diagonal
w = w / w.sum(dim=1, keepdim=True)  # each row sums to 1
print(w)
avg_matmul = w @ x  # (T, T) @ (B, T, C) -> (B, T, C)
assert torch.allclose(avg_loop, avg_matmul, atol=1e-12)

# %% [markdown]
# ## 3. The same through a softmax
#
# Start from *scores* (here all 0), put `-inf` where a position would look at the future, and take a
# softmax along each row: `exp(-inf) = 0`, and the equal scores become equal weights. This is the
# form attention uses, because the scores need not be equal.

# %%
scores = torch.zeros(T, T, dtype=torch.float64)  # (T, T)
future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # (T, T): True above the diagonal
weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # (T, T)
assert torch.allclose(weights, w, atol=1e-12)
assert torch.allclose(weights @ x, avg_loop, atol=1e-12)

# %% [markdown]
# ## 4. Scores from the tokens: self-attention
#
# Let the score between a query position `t` and a key position `s` be the dot product
# `x[t] · x[s]`: positions with similar vectors weigh each other more. Dividing by `sqrt(C)` keeps
# the scores at unit scale whatever the width (a dot product of `C` unit-variance numbers has
# variance `C`), so the softmax does not saturate into a one-hot choice.

# %%
scores = x @ x.transpose(-2, -1) / math.sqrt(C)  # (B, T, C) @ (B, C, T) -> (B, T, T)
weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # (B, T, T), each row sums to 1
y = weights @ x  # (B, T, T) @ (B, T, C) -> (B, T, C)
print(weights[0].numpy().round(3))
assert torch.allclose(weights.sum(-1), torch.ones(B, T, dtype=torch.float64))
assert (weights[:, future] == 0).all()  # nothing from the future

a, b_ = torch.randn(10_000, 256), torch.randn(10_000, 256)
print("var of a·b:", (a * b_).sum(-1).var().item(), " after / sqrt(256):", ((a * b_).sum(-1) / 16).var().item())

# %% [markdown]
# ## The same in lmforge and in PyTorch
#
# lmforge's attention works on tensors of shape `(B, heads, T, head size)`; here there is one
# "head" and queries, keys and values are all `x` itself. `explicit_attention` is lmforge's
# written-out version (it returns the weights too, for `lmforge inspect`); the model itself calls
# PyTorch's fused `F.scaled_dot_product_attention`, which never stores the `(T, T)` weights.

# %%
q = k = v = x[:, None]  # (B, 1, T, C): one head
y_lmforge, weights_lmforge = explicit_attention(q, k, v, is_causal=True)  # (B, 1, T, C), (B, 1, T, T)
y_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, 1, T, C)
print("max |y - lmforge|", (y - y_lmforge[:, 0]).abs().max().item())
assert torch.allclose(y, y_lmforge[:, 0], atol=1e-6, rtol=0)
assert torch.allclose(weights, weights_lmforge[:, 0].double(), atol=1e-6, rtol=0)
assert torch.allclose(y, y_sdpa[:, 0], atol=1e-6, rtol=0)

# %% [markdown]
# What is missing: every position uses the same vector `x[t]` to ask (query), to be found (key) and
# to answer (value). **Next**, [04 · one causal head](04_causal_head.ipynb) gives each role its own
# learned projection.
