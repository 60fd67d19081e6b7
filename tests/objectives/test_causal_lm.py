"""lmforge.objectives.causal_lm: masked targets skip the LM head and give the same loss and gradients
as full-logits cross-entropy."""

from __future__ import annotations

import pytest
import torch


import torch.nn.functional as F

from lmforge.model import ModelConfig, build


@pytest.mark.parametrize("arch", ["decoder", "bigram"])
def test_masked_targets_skip_the_lm_head_and_give_the_same_loss_and_gradients(arch):
    """Fine-tuning targets (-100 at prompt and padding): the LM head runs only where a target is,
    and the loss and every gradient equal the full-logits cross-entropy with ignore_index."""
    from lmforge.objectives.causal_lm import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=37, context_length=16, n_layer=2, n_head=2, n_embd=16) \
        if arch != "bigram" else ModelConfig(arch="bigram", vocab_size=37, context_length=16)
    model = build(cfg).double()
    ids = torch.randint(0, 37, (3, 12))
    targets = torch.randint(0, 37, (3, 12))
    targets[:, :5] = -100  # prompts
    targets[2, 9:] = -100  # padding
    loss, _ = CausalLM().loss(model, {"input_ids": ids, "targets": targets})
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)  # (B, T, V)
    ref = F.cross_entropy(logits.reshape(-1, 37).float(), targets.reshape(-1), ignore_index=-100)  # fp32, as the loss
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=0, msg=n)
    keep = targets != -100
    torch.testing.assert_close(model(ids, keep=keep), logits[keep])  # (N, V)
    nothing = torch.full_like(targets, -100)  # a micro-batch with nothing to predict: 0, not NaN
    assert CausalLM().loss(model, {"input_ids": ids, "targets": nothing})[0].item() == 0.0
