"""Inference weights in fewer bytes (lmforge.model.quantize): int8 rows within half a grid step,
the int8 and fp16 layers against fp32 ``nn.Linear``, whole models decoding like fp32, and the
refusals (LoRA layers, unknown method)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmforge.errors import InputError
from lmforge.generate import generate
from lmforge.model import build
from lmforge.model.lora import LoraConfig, apply_lora, merge_lora
from lmforge.model.quantize import HalfLinear, Int8Linear, quantize_model, quantize_rows


def _model():
    torch.manual_seed(0)
    return build({"preset": "llama-baby", "n_layer": 2, "n_embd": 64, "n_head": 4, "context_length": 64,
                  "vocab_size": 97}).eval()


def test_int8_rows_are_within_half_a_step():
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different sizes
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (16,)
    assert q.abs().max() <= 127 and (q.abs().amax(1) == 127).all()  # each row's largest weight uses the full grid
    err = (q.float() * s[:, None] - w).abs()  # (16, 40)
    assert (err <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_close_to_fp32(bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 64)
    want = lin(x)
    got = q(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.03 * want.abs().max()  # weights and activations both rounded to 8 bits


def test_int8_fallback_is_the_dequantized_product():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    q = Int8Linear(lin)
    q._packed = None  # as on a device without the int8 kernel
    x = torch.randn(4, 32)
    torch.testing.assert_close(q(x), x @ q.dequantized().T + lin.bias, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("method", ["fp16", "int8"])
def test_quantized_model_replaces_every_linear_and_decodes(method):
    model = _model()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)  # (1, 12, 97)
    quantize_model(model, method)
    assert not any(type(m) is nn.Linear for m in model.modules())
    kind = Int8Linear if method == "int8" else HalfLinear
    assert isinstance(model.lm_head, kind) and isinstance(model.transformer.blocks[0].attn.qkv, kind)
    with torch.no_grad():
        got = model(ids)
    tol = 5e-3 if method == "fp16" else 0.1
    assert (got - want).abs().max() < tol * want.abs().max()
    out = generate(model, ids[0].tolist(), max_new_tokens=5, temperature=0)
    assert len(out) == 5 and all(0 <= t < 97 for t in out)


def test_fp16_decoding_gives_the_fp32_tokens():
    model = _model()
    prompt = list(range(1, 9))
    want = generate(model, prompt, max_new_tokens=16, temperature=0)
    got = generate(quantize_model(model, "fp16"), prompt, max_new_tokens=16, temperature=0)
    assert got == want


def test_refuses_lora_layers_and_unknown_methods():
    model = apply_lora(_model(), LoraConfig(rank=2, alpha=4))
    with pytest.raises(InputError, match="merge them first"):
        quantize_model(model, "int8")
    quantize_model(merge_lora(model), "int8")  # merged: plain linear layers
    with pytest.raises(InputError, match="unknown quantization 'int4'"):
        quantize_model(_model(), "int4")
    assert quantize_model(m := _model(), "none") is m
