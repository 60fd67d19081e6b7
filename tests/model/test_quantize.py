"""Inference weights in fewer bytes (lmforge.model.quantize, lmforge.model.qmatmul): int8/int4
groups within half a step of their stored scale, the layers' products within the bound that
step implies (kernel and fp32-fallback paths), the fp16 layer, whole models decoding like fp32,
the int4 -> int8 fallback and the refusals (LoRA layers, unknown method, impossible shapes)."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.generate import generate
from lmforge.model import build, qmatmul
from lmforge.model.lora import LoraConfig, apply_lora, merge_lora
from lmforge.model.quantize import (GROUP, HalfLinear, Int4Linear, Int8Embedding, Int8Linear, quantize_int4,
                                    quantize_int8, quantize_model)

EPS = torch.finfo(torch.float32).eps


def _model():
    torch.manual_seed(0)
    return build({"preset": "llama-baby", "n_layer": 2, "n_embd": 64, "n_head": 4, "context_length": 64,
                  "vocab_size": 97, "tie_embeddings": True}).eval()


def _per_weight(scale: torch.Tensor, k: int) -> torch.Tensor:
    return scale.float().repeat_interleave(k // scale.shape[1], dim=1)  # (N, K): each weight's group scale


def test_int8_groups_are_within_half_a_step():
    w = torch.randn(16, 64) * torch.logspace(-6, 1, 16)[:, None]  # rows of very different sizes, some tiny
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (16, 2)
    assert q.abs().max() <= 127
    err = (q.float() * _per_weight(s, 64) - w).abs()  # (16, 64)
    assert (err <= _per_weight(s, 64) / 2 * (1 + 4 * EPS)).all()
    assert (s.float() >= w.abs().view(16, 2, 32).amax(2) / 127).all()  # scales rounded up: nothing clipped


def test_int4_groups_are_within_half_a_step():
    w = torch.randn(16, 96) * torch.logspace(-6, 1, 16)[:, None] + 0.3 * torch.logspace(-6, 1, 16)[:, None]
    codes, s, o = quantize_int4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (16, 48) and s.shape == o.shape == (16, 3)
    got = qmatmul.dequantize_int4(codes, s, o)  # (16, 96)
    step = _per_weight(s, 96)
    assert ((got - w).abs() <= step / 2 + 4 * EPS * w.abs()).all()
    # the nibble order is GGUF's: byte i of a group holds weight i (low) and weight i + 16 (high)
    q = torch.round((w[0, :32] - o[0, 0].float()) / s[0, 0].float()).clamp(0, 15).to(torch.uint8)
    assert torch.equal(codes[0, :16], q[:16] | (q[16:] << 4))


def _product_bound(x, layer, k):
    """|x @ W^T - x @ W_q^T| <= sum_k |x_k| * step_k / 2 (+ fp32 sums of both products)."""
    half_step = _per_weight(layer.scale, k) / 2  # (N, K)
    w = layer.dequantized().abs()
    return x.abs() @ half_step.T + 2 * k * EPS * (x.abs() @ w.T) + 1e-6  # (M, N)


@pytest.mark.parametrize("rows", [1, 3, 9])  # kernel paths (<= KERNEL_ROWS), blockwise F.linear beyond
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
def test_quantized_linear_is_close_to_fp32(kind, rows, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(qmatmul, "kernel", lambda: None)  # as where no C compiler is found
    elif qmatmul.kernel() is None:
        pytest.skip("the quantized-matmul kernel did not build here")
    torch.manual_seed(rows)
    lin = nn.Linear(96, 80, bias=True)
    q = (Int8Linear if kind == "int8" else Int4Linear).from_linear(lin)
    x = torch.randn(rows, 96)
    got, want = q(x), lin(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got - want).abs() <= _product_bound(x, q, 96)).all()
    # and it is the fp32 product of the dequantized weight, up to summation order
    exact = F.linear(x, q.dequantized(), lin.bias)
    assert ((got - exact).abs() <= 2 * 96 * EPS * (x.abs() @ q.dequantized().abs().T) + 1e-6).all()


def test_int8_takes_rows_not_a_multiple_of_32_with_one_scale_per_row():
    torch.manual_seed(0)
    lin = nn.Linear(48, 8, bias=False)
    q = Int8Linear.from_linear(lin)
    assert q.scale.shape == (8, 1)
    x = torch.randn(2, 48)
    assert ((q(x) - lin(x)).abs() <= _product_bound(x, q, 48)).all()


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 64)])  # a decode step (fp16 product), a prefill (fp32)
def test_half_linear_is_close_to_fp32(shape):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    h = HalfLinear(lin)
    x = torch.randn(*shape)
    want = lin(x)
    got = h(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=5e-3)


def test_half_linear_takes_inputs_beyond_fp16_range():
    lin = nn.Linear(4, 2, bias=False)
    h = HalfLinear(lin)
    x = torch.tensor([[1e5, 0.0, 0.0, 1.0]])  # 1e5 would be inf in fp16
    got = h(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, x @ lin.weight.half().float().T)


@pytest.mark.parametrize("method", ["fp16", "int8", "int4"])
def test_quantized_model_replaces_every_linear_and_decodes(method):
    model = _model()
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)[0]  # (24, 97)
    prompt = ids[0, :8].tolist()
    greedy = generate(model, prompt, max_new_tokens=16, temperature=0)
    quantize_model(model, method)
    assert not any(type(m) is nn.Linear for m in model.modules())
    block = Int4Linear if method == "int4" else Int8Linear if method == "int8" else HalfLinear
    assert isinstance(model.transformer.blocks[0].attn.qkv, block)
    assert isinstance(model.lm_head, HalfLinear if method == "fp16" else Int8Linear)  # the head keeps 8 bits
    if method != "fp16":  # the tied embedding reads the head's codes: one table
        assert isinstance(model.transformer.tok_emb, Int8Embedding)
        assert not any(isinstance(b, torch.Tensor) and b.dtype == torch.float32 and b.numel() >= 97 * 64
                       for b in model.buffers())
    with torch.no_grad():
        got = model(ids)[0]  # (24, 97)
    err = (got - want).abs().max()
    # teacher-forced next tokens: where fp32's top two logits are further apart than twice the
    # largest logit change, the quantized model must pick the same token
    top2 = want.topk(2, dim=-1).values  # (24, 2)
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75  # and mostly everywhere
    out = generate(model, prompt, max_new_tokens=16, temperature=0)
    assert len(out) == 16 and sum(a == b for a, b in zip(out, greedy)) >= 4  # greedy starts alike


def test_int4_falls_back_to_int8_where_32_does_not_divide_and_says_which():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) kept in int8.*2 \(in_features 48\)"):
        quantize_model(model, "int4")
    assert isinstance(model[0], Int4Linear) and isinstance(model[2], Int8Linear)
    with pytest.raises(InputError, match=r"quantize int8: 0: .*divisible by 16, got 40"):
        quantize_model(nn.Sequential(nn.Linear(40, 8)), "int8")
    assert GROUP == 32


def test_refuses_lora_layers_and_unknown_methods():
    model = apply_lora(_model(), LoraConfig(rank=2, alpha=4))
    with pytest.raises(InputError, match="merge them first"):
        quantize_model(model, "int8")
    quantize_model(merge_lora(model), "int4")  # merged: plain linear layers
    with pytest.raises(InputError, match="unknown quantization 'int3'"):
        quantize_model(_model(), "int3")
    assert quantize_model(m := _model(), "none") is m
