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
    a float64 model stays in float64).

    ``unit_offset`` (Gemma): the scale is ``1 + weight`` with ``weight`` starting at zero, applied
    before rounding back to the input dtype (Gemma's order; Llama rounds first)."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        n = F.rms_norm(x.to(torch.promote_types(dtype, torch.float32)), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (n * (1.0 + self.weight.to(n.dtype))).to(dtype)
        return self.weight * n.to(dtype)


def dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)``, skipped when it is the identity (p == 0 or eval mode): a module call saved per
    use, which shows in one-token decode steps."""
    return drop(x) if drop.training and drop.p > 0 else x


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over ``dim`` features (default n_embd; a head size for q/k norms)."""
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, unit_offset=cfg.norm_unit_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


# ------------------------------------------------------------------------------------- rotary
def scale_frequencies(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """RoPE inverse frequencies (hs/2,) after ``rope_scaling`` (float32, as transformers computes them).

    linear (Gemma 3 4B+ global layers): every frequency divided by ``factor``.
    llama3 (Llama 3.1/3.2): wavelengths longer than original_len / low_freq_factor are stretched by
    ``factor``, those shorter than original_len / high_freq_factor kept, and those between blended
    smoothly, so local word order keeps its resolution while long range positions spread out.
    """
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return inv_freq / factor
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq  # (hs/2,) tokens per full turn
    stretched = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    between = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(between, blended, stretched)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), the "rotate half" layout used by Llama checkpoints.
    ``scaling`` rescales the frequencies (``ModelConfig.rope_scaling``: Llama 3, Gemma 3)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", scale_frequencies(inv_freq, scaling), persistent=False)

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
def explicit_attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0, scale=None, softcap=None):
    """What scaled_dot_product_attention computes, written out so the weights can be kept.

    q (B, nh, T, hs), k and v (B, nkv, S, hs); key/value heads are repeated for grouped queries.
    ``mask`` is a bool (True = may attend) or additive float mask broadcastable to (B, nh, T, S).
    Returns y (B, nh, T, hs) and the attention weights softmax(q k^T * scale + mask) (B, nh, T, S),
    scale defaulting to 1/sqrt(hs). ``softcap`` (Gemma) squashes the scores into (-cap, cap) with
    cap * tanh(scores / cap) before the mask. Slower than SDPA: used when asked
    (``Attention.record_weights``, lmforge.inspect) and for soft-capped scores, which SDPA lacks.
    """
    nh, nkv = q.shape[1], k.shape[1]
    if nkv != nh:  # query head h reads key/value head h // (nh / nkv)
        k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
        v = v.repeat_interleave(nh // nkv, dim=1)
    T, S = q.shape[2], k.shape[2]
    if scale is None:
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    else:
        scores = q.float() @ k.float().transpose(-2, -1) * scale  # (B, nh, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
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

    Family options (ModelConfig fields): ``qkv_bias`` (Qwen2.5: biases on q/k/v, none on the
    output), ``qk_norm`` (Qwen3, Gemma 3: a norm over each query/key head before RoPE),
    ``attn_scale`` (Gemma 3: query_pre_attn_scalar**-0.5) and ``attn_softcap``. A local layer
    (``layer_types``) differs only in the mask and RoPE the transformer hands it.
    """

    record_weights = False

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.local = cfg.layer_type(layer_idx) == "local"  # a sliding-window layer (its mask says so)
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_has_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_proj = True  # scaled init
        # Qwen3, Gemma 3: a norm per head; OLMoE (qk_norm_span "all"): one over all query, one over all key heads
        self.qk_norm_all = cfg.qk_norm and cfg.qk_norm_span == "all"
        q_dim, k_dim = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim) if self.qk_norm_all else \
            (cfg.head_dim, cfg.head_dim)
        self.q_norm = make_norm(cfg, q_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, k_dim) if cfg.qk_norm else None
        self.scale = cfg.attn_scale  # None: 1/sqrt(head size)
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, mask=None, is_causal=False, cache: KVCache | None = None):
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        h = self.qkv(x)  # (B, T, (nh+2nkv)*hs)
        if self.qk_norm_all:  # OLMoE: all query heads normed together, all key heads together
            q, k, v = h.split([nh * self.head_dim, nkv * self.head_dim, nkv * self.head_dim], dim=-1)
            h = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        qkv = h.view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hs)
        qk, v = qkv.split([nh + nkv, nkv], dim=1)  # v: (B, nkv, T, hs)
        if self.q_norm is not None and not self.qk_norm_all:  # each head's query and key normed on its own
            q, k = qk.split([nh, nkv], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)  # (B, nh+nkv, T, hs)
        if rope is not None:  # rotate queries and keys together: one pass instead of two
            qk = apply_rotary(qk, *rope)
        q, k = qk.split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs)
        if self.record_weights or self.softcap is not None:
            y, weights = explicit_attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0,
                                            self.scale, self.softcap)
            if self.record_weights:
                self.last_weights = weights
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.proj(y)


# ---------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Position-wise feed-forward: act(x W_in) W_out, or gated act(x W_g) * (x W_u) W_out with
    silu (SwiGLU: Llama, Qwen) or tanh-approximated GELU (GeGLU: Gemma). ``hidden`` overrides
    cfg.mlp_hidden (an expert of a mixture, moe.py)."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        self.gated = cfg.gated
        hidden = hidden or cfg.mlp_hidden
        n_in = 2 * hidden if self.gated else hidden  # gate and up fused in one matmul
        self.fc = nn.Linear(cfg.n_embd, n_in, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_proj = True
        self.activation = cfg.activation
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            gate = F.silu(gate) if self.activation == "swiglu" else F.gelu(gate, approximate="tanh")
            h = gate * up
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
    Llama) or after the residual sum (post-LN: BERT). ``sandwich_norm`` (Gemma 3) also norms each
    sublayer's output before it joins the residual: four norms per block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, mlp: nn.Module | None = None):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = make_norm(cfg)
        self.mlp = mlp if mlp is not None else MLP(cfg)  # mlp: a mixture of experts (moe.py) in its place
        self.post_attn_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.post_mlp_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, mask=None, is_causal=False, cache=None):
        if self.post_attn_norm is not None:  # x + norm(sublayer(norm(x))), twice
            x = x + dropout(self.drop, self.post_attn_norm(self.attn(self.norm1(x), rope, mask, is_causal, cache)))
            return x + self.post_mlp_norm(self.mlp(self.norm2(x)))
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
