# %% [markdown]
# # 06 · A transformer block
#
# Attention lets positions talk to each other; then each position needs to *think* about what it
# gathered, on its own. A block is those two steps:
#
# 1. `x = x + attention(norm1(x))`: communicate,
# 2. `x = x + mlp(norm2(x))`: compute, per position (a two-layer network, 4x wider inside).
#
# Two details make deep stacks trainable. The **residual** `x + ...` lets each step add a
# correction instead of replacing `x`, so gradients flow straight down the stack. The **norm**
# before each step (pre-LN, as GPT-2 and Llama do it) keeps the input of every sub-layer at unit
# scale. We write LayerNorm, the MLP and the block by hand, then load them into lmforge's `Block`;
# at the end, Llama's variants: RMSNorm and the SwiGLU MLP.

# %%
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model import ModelConfig
from lmforge.model.layers import MLP, Block, RMSNorm

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # compare to 1e-6 without fp32 rounding in the way
B, T, C, n_head = 2, 8, 32, 4
x = torch.randn(B, T, C)  # (B, T, C)

# %% [markdown]
# ## LayerNorm
#
# Per position: subtract the mean over the `C` channels, divide by their standard deviation, then
# scale and shift by learned `weight` and `bias` (which start at 1 and 0).

# %%
class LayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)  # (B, T, 1)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # (B, T, 1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias  # (B, T, C)


ln = LayerNorm(C)
h = ln(x)
print("mean", h.mean(-1).abs().max().item(), "std", h.std(-1, unbiased=False).mean().item())
assert torch.allclose(h, nn.LayerNorm(C)(x), atol=1e-6)

# %% [markdown]
# ## The MLP, the attention and the block
#
# The attention is notebook 05's fused form; the MLP widens to `4C`, applies GELU (a smooth ReLU)
# and projects back to `C`.

# %%
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.n_head
        qkv = self.qkv(x).view(B, T, 3 * self.n_head, hs).transpose(1, 2)  # (B, 3nh, T, hs)
        q, k, v = qkv.split(self.n_head, dim=1)  # (B, nh, T, hs) each
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        y = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.norm1 = LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.norm2 = LayerNorm(n_embd)
        self.mlp = FeedForward(n_embd)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # (B, T, C): communicate
        return x + self.mlp(self.norm2(x))  # (B, T, C): compute, per position


block = TransformerBlock(C, n_head)
with torch.no_grad():  # random norm parameters, so the comparison below also checks them
    for norm in (block.norm1, block.norm2):
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
y = block(x)  # (B, T, C)
print(y.shape, sum(p.numel() for p in block.parameters()), "parameters")

# %% [markdown]
# ## The same in lmforge
#
# lmforge's `Block` has the same four parts under the same names (`norm1`, `attn.qkv`, `attn.proj`,
# `norm2`, `mlp.fc`, `mlp.proj`): we chose ours to match, so its `state_dict` loads as it is, and
# `strict=True` checks that every name and shape lines up. `activation="gelu"` is the exact GELU we
# used (GPT-2 presets use its tanh approximation, `gelu_tanh`).

# %%
cfg = ModelConfig(n_embd=C, n_head=n_head, activation="gelu", norm="layernorm", bias=True, context_length=T)
lm_block = Block(cfg)
lm_block.load_state_dict(block.state_dict(), strict=True)
with torch.no_grad():
    y_lmforge = lm_block(x, is_causal=True)  # (B, T, C)
print("max |y - lmforge|", (y - y_lmforge).abs().max().item())
assert torch.allclose(y, y_lmforge, atol=1e-6, rtol=0)

# %% [markdown]
# ## Llama's variants: RMSNorm and SwiGLU
#
# **RMSNorm** drops the mean subtraction and the bias: `x / sqrt(mean(x²) + eps) * weight`. It is
# cheaper and works as well. **SwiGLU** replaces `gelu(x W1)` by a gate: `silu(x Wg) * (x Wu)`,
# then the output projection; its hidden width is about `8/3 C` so the parameter count stays that of
# the `4C` MLP. lmforge fuses `Wg` and `Wu` into one `fc` layer (gate rows first).

# %%
eps = 1e-6
weight = torch.randn(C)
rms = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight  # (B, T, C)
norm = RMSNorm(C, eps)
with torch.no_grad():
    norm.weight.copy_(weight)
assert torch.allclose(rms, norm(x), atol=1e-6, rtol=0)

cfg = ModelConfig(n_embd=C, n_head=n_head, activation="swiglu", bias=False, context_length=T)
hidden = cfg.mlp_hidden  # 64 * ceil(8/3 * C / 64)
Wg, Wu = torch.randn(hidden, C) / math.sqrt(C), torch.randn(hidden, C) / math.sqrt(C)  # (H, C) each
Wo = torch.randn(C, hidden) / math.sqrt(hidden)  # (C, H)
swiglu = (F.silu(x @ Wg.T) * (x @ Wu.T)) @ Wo.T  # (B, T, H) * (B, T, H) -> (B, T, C)
mlp = MLP(cfg)
with torch.no_grad():
    mlp.fc.weight.copy_(torch.cat([Wg, Wu]))  # (2H, C): gate, then up
    mlp.proj.weight.copy_(Wo)
    assert torch.allclose(swiglu, mlp(x), atol=1e-6, rtol=0)
print("swiglu hidden width", hidden, "for n_embd", C)

# %% [markdown]
# **Next:** [07 · the decoder](07_decoder.ipynb): embeddings, a stack of these blocks and a head
# that reads next-token logits: a complete GPT.
