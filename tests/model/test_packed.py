"""oneDNN-packed fp32 linears for inference (lmforge.model.packed): the same products as
``F.linear`` within float rounding, only while autograd is off, the model unchanged after the
context, the packed copy reused while a frozen weight is unchanged and rebuilt when it changes,
LoRA's base product packed with its adapters on top, and generation giving the same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lmforge.model.packed as packed
from lmforge.generate import generate
from lmforge.model import build
from lmforge.model.lora import LoraConfig, apply_lora
from lmforge.model.packed import packed_linears, release_packed

pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN packed linear")


def _model():
    torch.manual_seed(0)
    return build({"preset": "llama-baby", "n_layer": 2, "n_embd": 64, "n_head": 4, "context_length": 64,
                  "vocab_size": 97}).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_matches_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias).requires_grad_(False)
    for shape in [(1, 96), (7, 96), (2, 5, 96)]:
        x = torch.randn(shape)
        want = lin(x)
        with packed_linears(lin, min_elements=0), torch.inference_mode():
            got = lin(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_without_autograd_and_model_restored():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    with packed_linears(lin, min_elements=0):
        y = lin(x)  # autograd on: the plain F.linear, differentiable
        y.sum().backward()
        assert lin.weight.grad is not None
        assert torch.equal(y, nn.functional.linear(x, lin.weight, lin.bias))
        with torch.no_grad():
            lin(x)  # packed: builds the copy
        assert packed._CACHE in vars(lin)
    assert "forward" not in vars(lin) and "_lmforge_packing" not in vars(lin)
    assert packed._CACHE not in vars(lin)  # a trainable weight's copy is dropped on exit


def test_frozen_weight_packed_once_and_repacked_when_changed():
    lin = nn.Linear(32, 16).requires_grad_(False)
    x = torch.randn(2, 32)
    with packed_linears(lin, min_elements=0), torch.inference_mode():
        lin(x)
    first = vars(lin)[packed._CACHE][1]
    with packed_linears(lin, min_elements=0), torch.inference_mode():
        lin(x)
        assert vars(lin)[packed._CACHE][1] is first  # kept across contexts while unchanged
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place update bumps the version counter
    with packed_linears(lin, min_elements=0), torch.inference_mode():
        y = lin(x)
    assert vars(lin)[packed._CACHE][1] is not first
    torch.testing.assert_close(y, nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    release_packed(lin)
    assert packed._CACHE not in vars(lin)


def test_small_weights_stay_plain():
    lin = nn.Linear(8, 8)
    with packed_linears(lin, min_elements=65):  # 64 weights: below the threshold
        assert "forward" not in vars(lin) and "_lmforge_packing" not in vars(lin)


def test_lora_base_packed_adapters_on_top():
    model = apply_lora(_model(), LoraConfig(rank=4, alpha=8, targets=("q", "v", "mlp_in")))
    for n, p in model.named_parameters():
        if n.endswith(".B"):
            nn.init.normal_(p, std=0.1)  # a trained-looking adapter
    ids = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        want = model(ids)
        with packed_linears(model, min_elements=0):
            got = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generation_same_tokens_packed_or_not(monkeypatch):
    model = _model()
    prompts = [[5, 6, 7, 8], [9, 10]]
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 10**12)  # nothing packed
    want = generate(model, prompts, max_new_tokens=12, temperature=0)
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)  # everything packed
    got = generate(model, prompts, max_new_tokens=12, temperature=0)
    assert got == want
    assert all("forward" not in vars(m) for m in model.modules())


def test_keep_holds_a_trainable_weights_copy_and_release_can_spare_frozen_ones():
    trainable, frozen = nn.Linear(32, 16), nn.Linear(16, 8).requires_grad_(False)
    both = nn.Sequential(trainable, frozen)
    x = torch.randn(2, 32)
    with packed_linears(both, min_elements=0, keep=True), torch.inference_mode():
        both(x)
    assert packed._CACHE in vars(trainable) and packed._CACHE in vars(frozen)
    release_packed(both, trainable_only=True)
    assert packed._CACHE not in vars(trainable) and packed._CACHE in vars(frozen)


def test_generation_keeps_copies_in_eval_mode_only(monkeypatch):
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    model = _model()  # eval mode, trainable weights: a model being used
    generate(model, [[5, 6, 7]], max_new_tokens=3, temperature=0)
    assert packed._CACHE in vars(model.lm_head)
    release_packed(model)
    model.train()  # a model being trained (GRPO rollouts): the next step changes its weights
    generate(model, [[5, 6, 7]], max_new_tokens=3, temperature=0)
    assert model.training and all(packed._CACHE not in vars(m) for m in model.modules())


def test_packed_rows_hint_any_row_count():
    """The weight is laid out for PACK_ROWS rows; other row counts give the same products."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).requires_grad_(False)
    for rows in (1, packed.PACK_ROWS, 3 * packed.PACK_ROWS + 1):
        x = torch.randn(rows, 64)
        with packed_linears(lin, min_elements=0), torch.inference_mode():
            got = lin(x)
        torch.testing.assert_close(got, nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_train_frozen_runs_a_frozen_base_packed_with_the_same_gradients():
    """GRPO's loss: a LoRA base runs packed with autograd on; adapters and the input get the
    gradients F.linear gives, and a trainable layer is untouched."""
    model = apply_lora(_model(), LoraConfig(rank=4, alpha=8, targets=("q", "v", "mlp_in")))
    for n, p in model.named_parameters():
        if n.endswith(".B"):
            nn.init.normal_(p, std=0.1)
    model.lm_head.weight.requires_grad_(True)  # tied / trainable: stays on F.linear
    ids = torch.randint(0, 97, (2, 9))

    def grads(**ctx):
        model.zero_grad()
        with packed_linears(model, min_elements=0, **ctx):
            loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = grads()
    got_loss, got = grads(train_frozen=True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and any(".A" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_frozen_product_gives_the_inputs_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40).requires_grad_(False)
    x = torch.randn(3, 5, 48, requires_grad=True)
    with packed_linears(lin, min_elements=0, train_frozen=True):
        y = lin(x)
    assert "FrozenProduct" in type(y.grad_fn.next_functions[0][0]).__name__  # (under the reshape back)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    torch.testing.assert_close(gx, gy @ lin.weight)
    torch.testing.assert_close(y, nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
