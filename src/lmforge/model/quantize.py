"""Linear weights in fewer bytes (fp16 or int8), for faster decoding on a CPU.

Decoding one token at a time is bound by memory, not arithmetic: every step reads every weight
once (SmolLM2-135M in fp32: ~540 MB per token) and does little work with each. Storing the
linear layers' weights as int8 -- one byte instead of four -- with one fp32 scale per output row
cuts those reads by about 4x (fp16 weights, :class:`HalfLinear`, by 2x). On a CPU the int8
product runs in PyTorch's int8 GEMM (fbgemm), which also rounds each call's activations to 8 bits
(one scale per call): the outputs differ from fp32 by about 1% of their range, so greedy text
can part from fp32's after a while.

    w (out, in) fp32  ->  q = round(w / s) in [-127, 127] (int8),  s = max|w_row| / 127  (out,)
    y = x @ w^T  ~=  (x @ q^T) * s

The weight error is at most s / 2 (half a step of its row's grid). It is for inference
(``lmforge generate/chat --quantize int8``): the int8 weights are buffers, not parameters, so
nothing trains them. Embedding lookups stay fp32 (they read one row per token, not the matrix);
a tied LM head gets its own int8 copy.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import InputError

METHODS = ("none", "fp16", "int8")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``w`` (out, in) -> q (out, in) int8, scales (out,) fp32."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def _prepacked(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """``w`` packed for PyTorch's x86 int8 GEMM (fbgemm: the activations are quantized to 8 bits
    on the fly, per call, and the product accumulates in int32), or None where this PyTorch has no
    such kernel (then the layer dequantizes its weight at each call: slower, weight-only error)."""
    try:
        with warnings.catch_warnings():  # quantized tensor creation is flagged for a future removal
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w.detach().float().cpu(), scale.double().cpu(),
                                            torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float().cpu())
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored as int8 rows with fp32 scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q.to(linear.weight.device))  # (out, in)
        self.register_buffer("scale", scale.to(linear.weight.device))  # (out,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        on_cpu = linear.weight.device.type == "cpu"
        self._packed = _prepacked(linear.weight, scale, linear.bias) if on_cpu else None

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (N, in)
        if self._packed is not None and x2.device.type == "cpu":
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._packed)  # (N, out), bias included
        else:
            y = F.linear(x2, self.weight_int8.float()) * self.scale  # (N, out)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "fbgemm int8 GEMM" if self._packed is not None else "dequantized per call"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, {kernel}"


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


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by an ``Int8Linear`` ("int8") or a
    ``HalfLinear`` ("fp16"), or leave it as it is ("none"). Merge LoRA adapters first
    (``lmforge.model.lora.merge_lora``): an adapter-carrying layer is refused, since quantizing its
    base would quietly change what the adapter was trained against. Returns the model, in eval mode."""
    if method not in METHODS:
        raise InputError(f"unknown quantization {method!r}; expected one of {', '.join(METHODS)}")
    if method == "none":
        return model
    from lmforge.model.lora import LoraLinear

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, LoraLinear) for _, m in targets):
        raise InputError("quantize: the model carries LoRA adapters; merge them first (merge_lora)")
    layer = Int8Linear if method == "int8" else HalfLinear
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer(m))
    return model.eval()
