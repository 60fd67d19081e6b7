"""Linear layers run from a oneDNN-packed copy of their fp32 weights, for inference on a CPU.

PyTorch's CPU ``F.linear`` in fp32 calls MKL's matrix product, which reads the weight in its
plain row-major layout at every call. oneDNN (also inside PyTorch) can *reorder* a weight once
into the blocked layout its kernels stream fastest, and then multiply by that copy. The layout
depends on the number of input rows oneDNN is told to expect (:data:`PACK_ROWS`); any number of
rows can then be multiplied. On this project's AMD EPYC CPU (2 threads), one pass over
SmolLM2-135M's linear weights (lmforge's fused layout) is about 2.5x faster packed than with
``F.linear`` at 1 or 8 rows (decoding) and 2x at 512 (a prompt)
(``benchmarks/bench_packed_linear.py``; on an Intel CPU, where MKL is at home, the gain may be
smaller).

The product is the same fp32 arithmetic in another summation order: outputs differ from
``F.linear`` by float rounding (about 1e-6 of the output's scale), so greedy text can part only
where two tokens tie to within rounding.

    with packed_linears(model):      # every large nn.Linear (and LoRA's base product) packed
        model(ids)                   # under torch.inference_mode() / no_grad: packed
                                     # with autograd on: the plain F.linear, as always

The packed op has no backward, so a layer runs packed only while autograd is off (generation);
a forward that records gradients inside the context is unchanged, except that with
``train_frozen=True`` a frozen layer runs its forward packed and takes its input's gradient from
the plain weight (a custom autograd function): GRPO's loss does this for a LoRA base. Small
weights stay as they are (:data:`MIN_ELEMENTS`): oneDNN's call costs ~10 us more than MKL's,
which a small product does not win back (one row: 192 x 192 takes 1.2x as long packed, 256 x 256
is 1.2x faster).

A packed copy is cached on its layer and reused while the weight is unchanged (same storage,
same version counter): a frozen weight (a LoRA base, a model loaded for inference) is packed
once and kept for as long as the layer lives (memory: a second copy of those weights;
:func:`release_packed` frees it); a trainable weight's copy is dropped when the context exits,
since the next optimizer step changes it, unless the caller says the model is only being used
(``keep=True``: :func:`lmforge.generate.generate` on a model in eval mode). Nothing is packed off
the CPU, for other dtypes, or where this PyTorch has no oneDNN.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["packed_linears", "packed_product", "release_packed", "available", "MIN_ELEMENTS", "PACK_ROWS"]

MIN_ELEMENTS = 1 << 16  # fewer weights stay plain: 256 x 256 is 1.17x faster packed, 192 x 192 0.86x
# The row count oneDNN lays the weight out for. Telling it 1 (one decoded token) gives the layout
# it streams *slowest* here: one row through SmolLM2's 576 x 1536 down projection, from memory,
# takes ~175 us packed for 1 against ~105 us packed for 8 (8 is as good as 2..128 at 1 and 8 rows).
PACK_ROWS = 8
_CACHE = "_lmforge_packed"  # layer attribute: (key, packed weight)


def available() -> bool:
    """Whether this PyTorch can reorder and multiply oneDNN-packed fp32 weights."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packable(m: nn.Linear, min_elements: int) -> bool:
    w = m.weight
    return (w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= min_elements
            and (m.bias is None or m.bias.dtype == torch.float32))


def _packed_weight(m: nn.Linear) -> torch.Tensor:
    """The layer's packed weight, reordered again only when the weight has changed."""
    w = m.weight
    key = (w.data_ptr(), w._version, tuple(w.shape))
    cached = m.__dict__.get(_CACHE)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS))  # (out, in) blocked
        m.__dict__[_CACHE] = cached
    return cached[1]


class _FrozenProduct(torch.autograd.Function):
    """``x W^T + b`` from the packed W for a frozen layer while autograd is on: the forward runs
    packed, and the input's gradient ``gy W`` comes from the plain weight (the packed op has no
    backward of its own; a frozen W and b need no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, packed, bias):
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        return gy @ weight, None, None, None  # (..., out) @ (out, in) -> (..., in)


def _frozen(m: nn.Linear) -> bool:
    return not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad)


def packed_product(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` (..., out): from the packed weight while ``m`` is packed (inside
    :func:`packed_linears`) and autograd is off, or, with ``train_frozen``, while ``m`` is frozen;
    else ``F.linear``."""
    mode = m.__dict__.get("_lmforge_packing")
    if not mode or x.dtype != torch.float32:
        return F.linear(x, m.weight, m.bias)
    if not torch.is_grad_enabled():
        return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(m), m.bias, "none", [], "")
    if mode == "train_frozen" and _frozen(m):
        # rows flattened, so the output is not a view made inside the function: LoRA adds to
        # slices of it in place, which autograd forbids on such views
        y = _FrozenProduct.apply(x.reshape(-1, x.shape[-1]), m.weight, _packed_weight(m), m.bias)  # (N, out)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)
    return F.linear(x, m.weight, m.bias)


@contextlib.contextmanager
def packed_linears(model: nn.Module, min_elements: int | None = None, keep: bool = False,
                   train_frozen: bool = False) -> Iterator[nn.Module]:
    """Inside the context, every ``nn.Linear`` of ``model`` with at least ``min_elements``
    weights (fp32, CPU; :data:`MIN_ELEMENTS` by default) runs from its packed copy whenever
    autograd is off, and with ``train_frozen`` a frozen one also while autograd is on (a LoRA
    base in a training forward: GRPO's loss, whose rollouts hold the packed copies anyway).
    Leaves the model as it was on exit, except that packed copies stay cached on their layers for
    the next call: a frozen weight's always, a trainable one's with ``keep`` (:func:`release_packed`
    frees them)."""
    min_elements = MIN_ELEMENTS if min_elements is None else min_elements
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and _packable(m, min_elements)]
    if not available():
        layers = []
    for m in layers:
        m.__dict__["_lmforge_packing"] = "train_frozen" if train_frozen else True
        if not getattr(m, "calls_packed_product", False):  # a LoraLinear calls it for its base itself
            m.forward = types.MethodType(packed_product, m)
    try:
        yield model
    finally:
        for m in layers:
            m.__dict__.pop("_lmforge_packing", None)
            m.__dict__.pop("forward", None)
            if m.weight.requires_grad and not keep:
                m.__dict__.pop(_CACHE, None)


def release_packed(model: nn.Module, trainable_only: bool = False) -> None:
    """Drop the cached packed weights of ``model`` (every one, or those of trainable weights);
    they are rebuilt when next needed."""
    for m in model.modules():
        if not trainable_only or getattr(getattr(m, "weight", None), "requires_grad", False):
            m.__dict__.pop(_CACHE, None)
