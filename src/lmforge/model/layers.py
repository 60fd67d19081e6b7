"""The building blocks every lmforge model is made of.

Read top to bottom: norms, rotary positions, the key/value cache, attention, the MLP, and the
block that puts them together. Shapes: B batch, T new tokens, S keys (past + new), C n_embd,
nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig


# --------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in at least fp32 (as Llama does for fp16/bf16;
    a float64 model stays in float64)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.to(torch.promote_types(dtype, torch.float32)), (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)


def dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)``, skipped when it is the identity (p == 0 or eval mode): a module call saved per
    use, which shows in one-token decode steps."""
    return drop(x) if drop.training and drop.p > 0 else x


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


# ------------------------------------------------------------------------------------- rotary
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), the "rotate half" layout used by Llama checkpoints."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, 1, T, hs), broadcast over heads."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by the angles in cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------- KV cache
class KVCache:
    """Pre-allocated keys and values for every layer, so a decode step costs the same at any length.

    ``length`` counts the positions already stored. Each attention layer calls ``update`` with the
    keys/values of the new tokens and gets back everything stored so far; the model calls
    ``advance`` once all layers have written.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.context_length, cfg.head_dim,
                   device=p.device, dtype=p.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} positions; {t1} requested")
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def advance(self, n: int) -> None:
        self.length += n

    def drop_front(self, n: int) -> None:
        """Forget the oldest n positions (sliding window for RoPE models)."""
        keep = self.length - n
        for buf in (*self.k, *self.v):
            buf[:, :, :keep] = buf[:, :, n:self.length].clone()
        self.length = keep

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. when some sequences finished)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]


# ---------------------------------------------------------------------------------- attention
def explicit_attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    """What scaled_dot_product_attention computes, written out so the weights can be kept.

    q (B, nh, T, hs), k and v (B, nkv, S, hs); key/value heads are repeated for grouped queries.
    ``mask`` is a bool (True = may attend) or additive float mask broadcastable to (B, nh, T, S).
    Returns y (B, nh, T, hs) and the attention weights softmax(q k^T / sqrt(hs) + mask) (B, nh, T, S).
    Slower than SDPA: used only when asked (``Attention.record_weights``, lmforge.inspect).
    """
    nh, nkv = q.shape[1], k.shape[1]
    if nkv != nh:  # query head h reads key/value head h // (nh / nkv)
        k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
        v = v.repeat_interleave(nh // nkv, dim=1)
    T, S = q.shape[2], k.shape[2]
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    if is_causal and mask is None:  # query t (at position S - T + t) sees keys up to itself
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1)  # (B, nh, T, S), each row sums to 1
    probs = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return (probs @ v.float()).to(q.dtype), weights  # (B, nh, T, hs)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (MHA when nkv == nh, MQA when nkv == 1).

    One fused projection makes q, k and v; scaled_dot_product_attention does the rest, so GPU
    flash / memory-efficient kernels apply. A decoder passes ``is_causal`` (no mask tensor) when
    it can, which is the fast path. With ``record_weights`` set (lmforge.inspect does this) the
    explicit path runs instead and keeps its weights (B, nh, T, S) in ``last_weights``.
    """

    record_weights = False

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_proj = True  # scaled init
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, mask=None, is_causal=False, cache: KVCache | None = None):
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hs)
        qk, v = qkv.split([nh + nkv, nkv], dim=1)  # v: (B, nkv, T, hs)
        if rope is not None:  # rotate queries and keys together: one pass instead of two
            qk = apply_rotary(qk, *rope)
        q, k = qk.split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs)
        if self.record_weights:
            y, self.last_weights = explicit_attention(q, k, v, mask, is_causal,
                                                      self.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.proj(y)


# ---------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Position-wise feed-forward: act(x W_in) W_out, or SwiGLU silu(x W_g) * (x W_u) W_out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        n_in = 2 * cfg.mlp_hidden if self.gated else cfg.mlp_hidden  # gate and up fused in one matmul
        self.fc = nn.Linear(cfg.n_embd, n_in, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_proj = True
        self.activation = cfg.activation
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return dropout(self.drop, self.proj(h))


# -------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """Attention then MLP, each with a residual connection; the norm goes before (pre-LN: GPT-2,
    Llama) or after the residual sum (post-LN: BERT)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, mask=None, is_causal=False, cache=None):
        if self.pre_norm:
            x = x + dropout(self.drop, self.attn(self.norm1(x), rope, mask, is_causal, cache))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + dropout(self.drop, self.attn(x, rope, mask, is_causal, cache)))
        return self.norm2(x + self.mlp(x))


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 initialisation: N(0, std) weights, zero biases, residual projections scaled by
    1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth."""
    std = cfg.init_std
    for m in module.modules():
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * cfg.n_layer) if getattr(m, "is_residual_proj", False) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
