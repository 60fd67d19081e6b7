# %% [markdown]
# # 04 · One causal head of self-attention
#
# In notebook 03 every position used its own vector for three jobs. A *head* gives each job its own
# learned linear map:
#
# - the **query** `q = x Wq`: what this position is looking for,
# - the **key** `k = x Wk`: what this position offers to be found by,
# - the **value** `v = x Wv`: what it hands over when it is found.
#
# Scores are `q · k / sqrt(head size)`, masked to the past and softmaxed into weights; the output
# is the weighted sum of values. We write the head as an `nn.Module`, then load its three weight
# matrices into lmforge's `Attention` and compare outputs.

# %%
import math

import torch
import torch.nn as nn

from lmforge.model import ModelConfig
from lmforge.model.layers import Attention

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # compare to 1e-6 without fp32 rounding in the way


class Head(nn.Module):
    """One head of causal self-attention: (B, T, C) -> (B, T, head_size)."""

    def __init__(self, n_embd, head_size):
        super().__init__()
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.query(x)  # (B, T, hs)
        k = self.key(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])  # (B, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # (T, T)
        self.weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # (B, T, T)
        return self.weights @ v  # (B, T, hs)


B, T, C = 2, 8, 16
x = torch.randn(B, T, C)  # (B, T, C)
head = Head(C, C)
y = head(x)  # (B, T, C)
print(y.shape)
print(head.weights[0].detach().numpy().round(2))

# %% [markdown]
# The mask is what makes it *causal*: changing a later token must not change an earlier output.

# %%
x2 = x.clone()
x2[:, 5:] = torch.randn(B, T - 5, C)  # new tokens from position 5 on
y2 = head(x2)
assert torch.allclose(y[:, :5], y2[:, :5])  # positions 0-4 never saw them
assert not torch.allclose(y[:, 5:], y2[:, 5:])

# %% [markdown]
# ## The same head in lmforge
#
# lmforge's `Attention` (in `lmforge/model/layers.py`) differs in two ways that do not change the
# math:
#
# - one fused linear layer `qkv` makes queries, keys and values in a single matmul: its weight is
#   `Wq`, `Wk`, `Wv` stacked row-wise (for one head: 3·hs rows);
# - it ends with an output projection `proj`; we set it to the identity to compare one head alone.
#
# A config with `n_head=1` and `n_embd=16` has a head size of 16; `bias=False` matches our head.

# %%
cfg = ModelConfig(n_embd=C, n_head=1, bias=False, context_length=T)
attn = Attention(cfg)
with torch.no_grad():
    attn.qkv.weight.copy_(torch.cat([head.query.weight, head.key.weight, head.value.weight]))  # (3C, C)
    attn.proj.weight.copy_(torch.eye(C))  # (C, C): the identity
    y_lmforge = attn(x, is_causal=True)  # (B, T, C)
print("max |y - lmforge|", (y - y_lmforge).abs().max().item())
assert torch.allclose(y, y_lmforge, atol=1e-6, rtol=0)

# %% [markdown]
# lmforge's model runs `F.scaled_dot_product_attention`, which never stores the `(T, T)` weights.
# `record_weights` switches a layer to the written-out path that keeps them in `last_weights` (this
# is how `lmforge inspect` draws attention maps); they are our `head.weights`.

# %%
attn.record_weights = True
with torch.no_grad():
    head(x)  # head.weights of x again (the causality check above left those of x2)
    attn(x, is_causal=True)
assert torch.allclose(head.weights, attn.last_weights[:, 0].double(), atol=1e-6, rtol=0)

# %% [markdown]
# **Next:** [05 · multi-head attention](05_multi_head.ipynb): several heads side by side, each free
# to look for something different.
