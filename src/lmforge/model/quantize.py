"""Linear weights in fewer bytes (fp16, int8 or int4), for faster decoding on a CPU.

Decoding one token at a time is bound by memory, not arithmetic: every step reads every weight
once (SmolLM2-135M in fp32: ~540 MB per token) and does little work with each. Storing weights
as 8- or 4-bit codes with one fp16 scale per group of 32 cuts those reads by ~3.8x or ~6.4x;
the activations stay fp32 (weight-only quantization: :mod:`lmforge.model.qmatmul` dequantizes
each weight exactly and multiplies in fp32).

    int8 (group of 32):   d = max|w_g| / 127 (fp16, rounded up)     q = round(w / d) in [-127, 127]
                          w ~= q * d                                  error <= d / 2
    int4 (group of 32):   o = min w_g (fp16, rounded down)            s = (max w_g - o) / 15 (fp16, up)
                          q = round((w - o) / s) in [0, 15]           w ~= q * s + o,  error <= s / 2

These are GGUF's Q8_0 and Q4_1 formats (same block size and arithmetic), so a GGUF file's blocks
load without re-rounding (:func:`lmforge.interop.gguf.load_gguf` with ``quantize``).

``quantize_model(model, "int4")`` replaces every ``nn.Linear`` in place: the blocks' layers by
:class:`Int4Linear`; the LM head by :class:`Int8Linear` (the output matrix is the most sensitive
to rounding; llama.cpp keeps it at 6-8 bits too), and, when the head is tied to the token
embedding, the embedding by an :class:`Int8Embedding` reading the same codes (one copy, not an
fp32 table plus an int8 head). A layer whose in_features is not a multiple of 32 falls back to
int8 with one scale per row (said in one warning naming the layers); one that int8 cannot hold
either (in_features not a multiple of 16) is an InputError. It is for inference (``lmforge
generate/chat --quantize int4``): codes are buffers, not parameters, so nothing trains them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.model.lora import LoraLinear
from lmforge.model.qmatmul import dequantize_int4, dequantize_int8, int4_matmul, int8_matmul

METHODS = ("none", "fp16", "int8", "int4")
GROUP = 32  # weights sharing one scale (GGUF's block size)


def _fp16_up(v: torch.Tensor) -> torch.Tensor:
    """``v`` (>= 0) in fp16, rounded up: the stored scale is never below the one asked for."""
    h = v.half()
    return torch.where(h.float() < v, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _fp16_down(v: torch.Tensor) -> torch.Tensor:
    h = v.half()
    return torch.where(h.float() > v, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def int8_group(in_features: int) -> int:
    """The int8 group size for a layer: 32, or the whole row where 32 does not divide it."""
    if in_features % GROUP == 0:
        return GROUP
    if in_features % 16 == 0:
        return in_features
    raise InputError(f"int8 quantization needs in_features divisible by 16, got {in_features}")


def quantize_int8(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in groups along the rows: ``w`` (N, K) -> codes (N, K) int8, scale (N, K/group) fp16."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)  # (N, G, group)
    scale = _fp16_up(g.abs().amax(dim=2) / 127.0)  # (N, G)
    s = scale.float()[..., None]
    q = torch.where(s > 0, torch.round(g / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-127, 127)
    return q.to(torch.int8).reshape(n, k), scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of 32: ``w`` (N, K) -> codes (N, K/2) uint8 (GGUF nibble order),
    scale (N, K/32) fp16, offset (N, K/32) fp16."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)  # (N, G, 32)
    offset = _fp16_down(g.amin(dim=2))  # (N, G)
    scale = _fp16_up((g.amax(dim=2) - offset.float()) / 15.0)  # (N, G)
    s, o = scale.float()[..., None], offset.float()[..., None]
    q = torch.where(s > 0, torch.round((g - o) / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, 15).to(torch.uint8)
    codes = q[..., :16] | (q[..., 16:] << 4)  # (N, G, 16): byte i = code i (low), code i + 16 (high)
    return codes.reshape(n, k // 2), scale, offset


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights in groups (fp16 scales); fp32 activations."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.contiguous())  # (out, in) int8
        self.register_buffer("scale", scale.contiguous())  # (out, in / group) fp16
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        codes, scale = quantize_int8(linear.weight, int8_group(linear.in_features))
        return cls(codes, scale, linear.bias)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.codes, self.scale)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.codes, self.scale)  # (..., out)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        group = self.in_features // self.scale.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, groups of {group}"


class Int4Linear(nn.Module):
    """A frozen linear layer with int4 weights in groups of 32 (fp16 scale and offset); fp32 activations."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 2
        self.register_buffer("codes", codes.contiguous())  # (out, in / 2) uint8
        self.register_buffer("scale", scale.contiguous())  # (out, in / 32) fp16
        self.register_buffer("offset", offset.contiguous())  # (out, in / 32) fp16
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        if linear.in_features % GROUP:
            raise InputError(f"int4 quantization needs in_features divisible by {GROUP}, got {linear.in_features}")
        return cls(*quantize_int4(linear.weight), linear.bias)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.codes, self.scale, self.offset)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self.codes, self.scale, self.offset)  # (..., out)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights, groups of {GROUP}"


class Int8Embedding(nn.Module):
    """Token embedding read from an :class:`Int8Linear`'s codes (a tied LM head's): each looked-up
    row is dequantized on the fly, so the table exists once, in int8."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.head = [head]  # a plain list: the codes stay registered once, under the head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = ids.reshape(-1)
        w = dequantize_int8(head.codes[rows], head.scale[rows])  # (B*T, C)
        return w.view(*ids.shape, self.embedding_dim)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows shared with the tied LM head"


class HalfLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in fp16: half the bytes of fp32, and about
    three significant decimal digits per weight. The input is rounded to fp16 for the product
    (PyTorch's CPU fp16 matrix-vector kernel accumulates in fp32) and the output returns in the
    input's dtype. Activations beyond fp16's range (65,504) would overflow: such an input runs
    the product in fp32 instead."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp16", linear.weight.detach().half().clone())  # (out, in)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().half().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() > 1 or x.abs().max() > 6e4:  # prefill (a matrix) or out of range: fp32
            b = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight_fp16.float(), b).to(x.dtype)
        return F.linear(x.half(), self.weight_fp16, self.bias).to(x.dtype)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weights"


def quantized_layer(linear: nn.Linear, method: str, name: str = "layer") -> nn.Module:
    """One ``nn.Linear`` as a :class:`HalfLinear`, :class:`Int8Linear` or :class:`Int4Linear`;
    int4 on an in_features that 32 does not divide gives int8 (the caller reports it)."""
    if method == "fp16":
        return HalfLinear(linear)
    try:
        if method == "int4" and linear.in_features % GROUP == 0:
            return Int4Linear.from_linear(linear)
        return Int8Linear.from_linear(linear)
    except InputError as e:
        raise InputError(f"quantize {method}: {name}: {e}") from None


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place (see the module doc for what each method
    does with the blocks, the LM head and a tied embedding), or leave it as it is ("none"). Merge
    LoRA adapters first (``lmforge.model.lora.merge_lora``): an adapter-carrying layer is refused,
    since quantizing its base would quietly change what the adapter was trained against. Returns
    the model, in eval mode."""
    if method not in METHODS:
        raise InputError(f"unknown quantization {method!r}; expected one of {', '.join(METHODS)}")
    if method == "none":
        return model

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, LoraLinear) for _, m in targets):
        raise InputError("quantize: the model carries LoRA adapters; merge them first (merge_lora)")
    head = getattr(model, "lm_head", None)
    emb = getattr(getattr(model, "transformer", None), "tok_emb", None)
    tied = isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight
    fallback = []
    for name, m in targets:
        kind = "int8" if method == "int4" and m is head else method  # the output matrix keeps 8 bits
        if kind == "int4" and m.in_features % GROUP:
            fallback.append(f"{name} (in_features {m.in_features})")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, quantized_layer(m, kind, name))
    if tied and method in ("int8", "int4"):
        model.transformer.tok_emb = Int8Embedding(model.lm_head)
    if fallback:
        warnings.warn(f"quantize int4: {len(fallback)} layer(s) kept in int8, in_features not a multiple of "
                      f"{GROUP}: {', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}", stacklevel=2)
    return model.eval()
