# %% [markdown]
# # 07 · The decoder: a complete GPT
#
# Everything is in place. A decoder-only language model is:
#
# 1. **embeddings**: a learned vector per token id plus a learned vector per position (attention
#    itself is blind to order: it sums over positions),
# 2. a stack of **blocks** (notebook 06),
# 3. a final **norm** and the **LM head**, a linear layer from width `C` to one logit per vocabulary
#    entry. GPT-2 *ties* it to the token embedding: the same matrix reads tokens in and out.
#
# At every position the logits are the model's guess for the *next* token. We build it by hand,
# with module names chosen to match lmforge's `DecoderLM`, so a `state_dict` moves between them.

# %%
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model import DecoderLM, KVCache, ModelConfig, count_parameters
from lmforge.model.layers import Attention, RotaryEmbedding

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # compare to 1e-6 without fp32 rounding in the way


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


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_embd)  # notebook 06 checked our LayerNorm against this one
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.norm2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, context_length, n_embd, n_layer, n_head):
        super().__init__()
        self.context_length = context_length
        self.transformer = nn.ModuleDict(dict(
            tok_emb=nn.Embedding(vocab_size, n_embd),
            pos_emb=nn.Embedding(context_length, n_embd),
            blocks=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
            norm=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.tok_emb.weight  # tied: one (V, C) matrix, in and out
        self.apply(self._init)

    @staticmethod
    def _init(m):  # GPT-2's: small normal weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids):
        B, T = ids.shape
        t = self.transformer
        x = t.tok_emb(ids) + t.pos_emb(torch.arange(T))  # (B, T, C) + (T, C) -> (B, T, C)
        for block in t.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(t.norm(x))  # (B, T, V)


V, T, C, n_layer, n_head = 65, 16, 32, 2, 4
gpt = GPT(V, T, C, n_layer, n_head)
ids = torch.randint(V, (3, T))  # (B, T)
logits = gpt(ids)  # (B, T, V)
print(logits.shape, sum(p.numel() for p in gpt.parameters()), "parameters")

# %% [markdown]
# An untrained model should be maximally unsure: its loss on random targets is about `ln V`. That
# is why the weights start small (`N(0, 0.02)`, GPT-2's choice): with PyTorch's default `N(0, 1)`
# embeddings, the tied head would start with huge logits and a loss many times `ln V`. (lmforge
# also shrinks the residual projections by `1/sqrt(2 n_layer)`, so deep stacks start calm.)

# %%
targets = torch.randint(V, (3, T))  # (B, T)
print("hand GPT loss", F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).item(), " ln V =", math.log(V))

# %% [markdown]
# ## The same model in lmforge
#
# `DecoderLM(ModelConfig(...))` with the same sizes has the same parameter names and shapes, so
# `load_state_dict(strict=True)` takes our weights. (`bias=True`, `activation="gelu_tanh"`,
# `norm="layernorm"`, `positional="learned"` and `tie_embeddings=True` are the GPT-2 choices.)

# %%
cfg = ModelConfig(vocab_size=V, context_length=T, n_layer=n_layer, n_head=n_head, n_embd=C,
                  activation="gelu_tanh", norm="layernorm", positional="learned", bias=True,
                  tie_embeddings=True)
model = DecoderLM(cfg)
print(sorted(model.state_dict())[:6], "...")
model.load_state_dict(gpt.state_dict(), strict=True)
assert model.lm_head.weight is model.transformer.tok_emb.weight  # still tied after loading
model.eval()
with torch.no_grad():
    logits_lmforge = model(ids)  # (B, T, V)
print("max |logits - lmforge|", (logits - logits_lmforge).abs().max().item())
assert torch.allclose(logits, logits_lmforge, atol=1e-6, rtol=0)
assert count_parameters(model) == sum(p.numel() for p in gpt.parameters())

# %% [markdown]
# ## Generating, and why a KV cache
#
# Generation appends one token at a time: run the model, take the logits at the last position,
# sample, append, repeat (cropping to the last `context_length` tokens). Written plainly, each step
# recomputes every earlier position. But under the causal mask, earlier positions' keys and values
# never change, so a **KV cache** stores them and each step computes only the new token's. lmforge's
# `KVCache` does that; its step-by-step logits equal the full forward pass's.

# %%
@torch.no_grad()
def generate(model, ids, n_new, generator):
    for _ in range(n_new):
        logits = model(ids[:, -T:])[:, -1]  # (B, V): the next-token logits
        next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)  # (B, T+1)
    return ids


out = generate(gpt, ids[:1, :4], 8, torch.Generator().manual_seed(0))  # (1, 12)
print(out.tolist())

cache = KVCache.for_model(model, batch_size=1)
steps = []
with torch.no_grad():
    for t in range(out.shape[1]):
        steps.append(model(out[:, t:t + 1], cache=cache)[:, -1])  # (1, V): one new token per step
    full = model(out)  # (1, T', V): everything at once
assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-6, rtol=0)
print("cache holds", cache.length, "positions")

# %% [markdown]
# ## Rotary positions (RoPE), the Llama way
#
# Learned position vectors are added to the tokens once, at the bottom. Llama instead *rotates*
# each query and key inside every attention layer by an angle proportional to its position: the
# head's channels are taken in pairs `(x_i, x_{i+hs/2})`, pair `i` turning at frequency
# `theta^(-2i/hs)`. A rotated query and key then have a dot product that depends only on how far
# apart they are, not where they sit, and nothing caps the length at a table's size. We rotate by
# hand and compare with lmforge's `Attention` fed by its `RotaryEmbedding`.

# %%
def rope_by_hand(x, positions, theta=10000.0):
    """Rotate x (B, nh, T, hs) by its positions (T,): pairs (x_i, x_{i+hs/2}) turn by pos * freq_i."""
    hs = x.shape[-1]
    freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    angle = positions[:, None].double() * freq  # (T, hs/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)  # (T, hs): the same angle for both halves
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (B, nh, T, hs)


rcfg = ModelConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_kv_head=2, n_embd=C,
                   positional="rope", bias=False)
attn = Attention(rcfg)
hs, nh, nkv = rcfg.head_dim, rcfg.n_head, rcfg.n_kv_head
x = torch.randn(2, T, C)  # (B, T, C)
with torch.no_grad():
    qkv = attn.qkv(x).view(2, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh+2nkv, T, hs)
    q, k, v = qkv.split([nh, nkv, nkv], dim=1)
    pos = torch.arange(T)
    q, k = rope_by_hand(q, pos), rope_by_hand(k, pos)  # rotate queries and keys, never values
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    y = scores.masked_fill(future, float("-inf")).softmax(-1) @ v  # (B, nh, T, hs)
    y = attn.proj(y.transpose(1, 2).reshape(2, T, C))  # (B, T, C)

    cos_sin = RotaryEmbedding(hs, rcfg.rope_theta)(pos[None])  # cos, sin (1, 1, T, hs)
    y_lmforge = attn(x, rope=cos_sin, is_causal=True)  # (B, T, C)
print("max |y - lmforge|", (y - y_lmforge).abs().max().item())
assert torch.allclose(y, y_lmforge, atol=1e-6, rtol=0)

# the score between a query at m and a key at n depends on n - m only
qv, kv = torch.randn(1, 1, 1, hs), torch.randn(1, 1, 1, hs)
score = lambda m, n: (rope_by_hand(qv, torch.tensor([m])) * rope_by_hand(kv, torch.tensor([n]))).sum().item()
print(score(3, 1), score(13, 11), score(103, 101))
assert abs(score(3, 1) - score(103, 101)) < 1e-9

# %% [markdown]
# lmforge's presets are these same fields: `ModelConfig.from_preset("gpt2")` is GPT-2 small, and
# `"llama-baby"` swaps in RMSNorm, SwiGLU, rotary positions instead of `pos_emb`, grouped key/value
# heads and an untied head: the same `DecoderLM` class.

# %%
for name in ("baby", "gpt2", "llama-baby"):
    c = ModelConfig.from_preset(name)
    print(f"{name:10s} layers {c.n_layer:2d}  width {c.n_embd:4d}  heads {c.n_head:2d}/{c.n_kv_head:2d} kv  "
          f"{c.activation:9s} {c.norm:9s} {c.positional}")

# %% [markdown]
# **Next:** [08 · pretraining](08_pretraining.ipynb): train this model on text.
