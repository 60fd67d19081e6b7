# %% [markdown]
# # 05 · Multi-head attention
#
# One head computes one set of weights per position: it can attend to one kind of thing. Several
# smaller heads side by side (say 4 heads of size `C/4` instead of one of size `C`) cost the same
# and can each look for something different: one the previous character, one the start of the word,
# and so on. Their outputs are concatenated back to width `C` and mixed by one more linear layer,
# the **output projection**.
#
# We write it twice, as a list of heads and as one fused matmul, check they agree, and then load
# the weights into lmforge's `Attention`. Last, grouped-query attention (GQA), where several query
# heads share one key/value head.

# %%
import math

import torch
import torch.nn as nn

from lmforge.model import ModelConfig
from lmforge.model.layers import Attention

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # compare to 1e-6 without fp32 rounding in the way


def causal_attention(q, k, v):
    """softmax(q k^T / sqrt(hs), past only) v for q, k, v (..., T, hs)."""
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # (T, T)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v  # (..., T, hs)


class Head(nn.Module):
    def __init__(self, n_embd, head_size):
        super().__init__()
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)

    def forward(self, x):
        return causal_attention(self.query(x), self.key(x), self.value(x))  # (B, T, hs)


class MultiHead(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.heads = nn.ModuleList(Head(n_embd, n_embd // n_head) for _ in range(n_head))
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        y = torch.cat([h(x) for h in self.heads], dim=-1)  # n_head x (B, T, hs) -> (B, T, C)
        return self.proj(y)  # (B, T, C)


B, T, C, n_head = 2, 8, 32, 4
hs = C // n_head
x = torch.randn(B, T, C)  # (B, T, C)
mha = MultiHead(C, n_head)
y = mha(x)  # (B, T, C)

# %% [markdown]
# ## All heads in one matmul
#
# Looping over heads runs many small matmuls. Instead, stack every head's `Wq`, then every `Wk`,
# then every `Wv` into one `(3C, C)` matrix, project once, and reshape the result so that heads
# become a batch dimension: `(B, T, 3·nh, hs) -> (B, 3·nh, T, hs)`. The attention arithmetic is
# unchanged, it just runs on all heads at once.

# %%
W_qkv = torch.cat([h.query.weight for h in mha.heads]
                  + [h.key.weight for h in mha.heads]
                  + [h.value.weight for h in mha.heads])  # (3C, C): all queries, all keys, all values

qkv = (x @ W_qkv.T).view(B, T, 3 * n_head, hs).transpose(1, 2)  # (B, 3nh, T, hs)
q, k, v = qkv.split(n_head, dim=1)  # each (B, nh, T, hs)
y_heads = causal_attention(q, k, v)  # (B, nh, T, hs)
y_fused = mha.proj(y_heads.transpose(1, 2).reshape(B, T, C))  # (B, T, nh, hs) -> (B, T, C) -> (B, T, C)
assert torch.allclose(y, y_fused, atol=1e-12)

# %% [markdown]
# ## The same in lmforge
#
# That fused layout is exactly lmforge's: `Attention.qkv` holds `W_qkv` (query heads first, then
# key heads, then value heads) and `Attention.proj` is the output projection. Our heads have no
# bias and our projection has one; lmforge's `bias` switch covers both layers, so we take
# `bias=True` and give `qkv` a zero bias.

# %%
cfg = ModelConfig(n_embd=C, n_head=n_head, bias=True, context_length=T)
attn = Attention(cfg)
with torch.no_grad():
    attn.qkv.weight.copy_(W_qkv)
    attn.qkv.bias.zero_()
    attn.proj.load_state_dict(mha.proj.state_dict())
    y_lmforge = attn(x, is_causal=True)  # (B, T, C)
print("max |y - lmforge|", (y - y_lmforge).abs().max().item())
assert torch.allclose(y, y_lmforge, atol=1e-6, rtol=0)

# %% [markdown]
# ## Grouped-query attention
#
# When generating, every past key and value is kept in memory (the KV cache, notebook 07). Llama-style
# models shrink that cache by giving fewer heads to keys and values than to queries: with 4 query
# heads and 2 key/value heads, query heads 0-1 read key/value head 0 and heads 2-3 read head 1
# (`n_kv_head=1` is multi-query attention). By hand: repeat each key/value head for its group.

# %%
n_kv = 2
Wq = torch.randn(n_head * hs, C) / math.sqrt(C)  # (nh*hs, C)
Wk = torch.randn(n_kv * hs, C) / math.sqrt(C)  # (nkv*hs, C): half as many key heads
Wv = torch.randn(n_kv * hs, C) / math.sqrt(C)
Wo = torch.randn(C, n_head * hs) / math.sqrt(C)  # (C, nh*hs)

q = (x @ Wq.T).view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
k = (x @ Wk.T).view(B, T, n_kv, hs).transpose(1, 2)  # (B, nkv, T, hs)
v = (x @ Wv.T).view(B, T, n_kv, hs).transpose(1, 2)  # (B, nkv, T, hs)
group = n_head // n_kv
k = k.repeat_interleave(group, dim=1)  # (B, nh, T, hs): heads 0,0,1,1
v = v.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
y_gqa = causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C) @ Wo.T  # (B, T, C)

cfg = ModelConfig(n_embd=C, n_head=n_head, n_kv_head=n_kv, bias=False, context_length=T)
attn = Attention(cfg)
print("qkv weight", tuple(attn.qkv.weight.shape), "= (nh + 2 nkv) * hs rows")
with torch.no_grad():
    attn.qkv.weight.copy_(torch.cat([Wq, Wk, Wv]))  # ((nh + 2 nkv) * hs, C)
    attn.proj.weight.copy_(Wo)
    y_lmforge = attn(x, is_causal=True)  # (B, T, C)
assert torch.allclose(y_gqa, y_lmforge, atol=1e-6, rtol=0)

# %% [markdown]
# **Next:** [06 · a transformer block](06_block.ipynb): attention plus a per-position MLP, with
# normalisation and residual connections so that many blocks can be stacked.
