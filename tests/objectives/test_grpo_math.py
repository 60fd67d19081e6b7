"""GRPO arithmetic: hand-made groups, ratio/clip cases, aggregation, and TRL's own loss code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.objectives.grpo_math import (
    aggregate_loss, clip_ratio_metrics, clipped_surrogate, entropy_from_logits, group_advantages,
    grpo_policy_loss, k3_kl, mask_truncated, masked_mean, token_level_normalizer,
)

D = torch.float64


def t(xs):
    return torch.tensor(xs, dtype=D)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    # Group 0: one right of four. Group 1: all right (zero std). Group 2: rewards 0, 1, 2, 3.
    rewards = t([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 2, 3])
    out = group_advantages(rewards, 4, "group")
    std0 = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # sample std (divide by K - 1)
    std2 = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)
    expect = [0.75 / (std0 + 1e-4)] + [-0.25 / (std0 + 1e-4)] * 3 + [0.0] * 4 + [
        d / (std2 + 1e-4) for d in (-1.5, -0.5, 0.5, 1.5)]
    assert out.advantages.tolist() == pytest.approx(expect, abs=1e-12)
    assert out.group_mean.tolist() == [0.25, 1.0, 1.5]
    assert out.group_std.tolist() == pytest.approx([std0, 0.0, std2])
    assert out.zero_std.tolist() == [False, True, False] and out.frac_zero_std == pytest.approx(1 / 3)


def test_group_advantages_unscaled_and_properties():
    rewards = t([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 2, 3])
    out = group_advantages(rewards, 4, "none")
    assert out.advantages.tolist() == [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -1.5, -0.5, 0.5, 1.5]
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6 * 5, generator=g, dtype=D)
    a = group_advantages(r, 5, "group").advantages.view(6, 5)
    assert a.sum(1).abs().max() < 1e-12  # zero mean per group
    assert a.std(1).tolist() == pytest.approx([1.0] * 6, abs=1e-3)  # ~unit spread per group
    # Shifting or scaling a group's rewards does not change its scaled advantages (up to eps).
    b = group_advantages(3 * r + 7, 5, "group").advantages.view(6, 5)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_group_advantages_errors():
    with pytest.raises(ConfigError, match="K >= 2"):
        group_advantages(t([1.0]), 1)
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_advantages(t([1.0, 0.0]), 2, "batch")
    with pytest.raises(InputError, match="groups of 4"):
        group_advantages(t([1.0, 0.0, 1.0]), 4)


# ---------------------------------------------------------------------------------------------
# Ratio and clip
# ---------------------------------------------------------------------------------------------


def test_one_iteration_is_the_group_baseline_policy_gradient():
    """Ratio 1: loss value is -A per token and its gradient is -A * grad log pi."""
    logps = t([[-1.0, -2.0], [-0.5, -3.0]]).requires_grad_()
    adv = t([0.7, -1.3])
    per_token = clipped_surrogate(logps, logps.detach(), adv)
    assert per_token.tolist() == [[-0.7, -0.7], [1.3, 1.3]]
    per_token.sum().backward()
    assert logps.grad.tolist() == [[-0.7, -0.7], [1.3, 1.3]]


def test_clip_cases_by_hand():
    old = torch.zeros(4, 1, dtype=D)
    ratios = t([1.5, 0.5, 1.5, 0.5])  # two positive- and two negative-advantage tokens
    logps = ratios.log().unsqueeze(1).requires_grad_()
    adv = t([1.0, 1.0, -1.0, -1.0])
    loss = clipped_surrogate(logps, old, adv, epsilon_low=0.2, epsilon_high=0.28)
    # A>0, r=1.5: clipped to 1.28 (no gradient). A>0, r=0.5: min picks 0.5 (unclipped).
    # A<0, r=1.5: -min(-1.5, -1.28) = 1.5 (unclipped). A<0, r=0.5: -min(-0.5, -0.8) = 0.8 (clipped).
    assert loss.squeeze(1).tolist() == pytest.approx([-1.28, -0.5, 1.5, 0.8])
    loss.sum().backward()
    assert logps.grad.squeeze(1).tolist() == pytest.approx([0.0, -0.5, 1.5, 0.0])
    m = clip_ratio_metrics(ratios.unsqueeze(1), adv, torch.ones(4, 1), 0.2, 0.28)
    assert m == {"clip_ratio/low": 0.25, "clip_ratio/high": 0.25, "clip_ratio/region": 0.5}


def test_k3_kl_closed_form_and_nonnegative():
    logps, ref = t([[-1.0, -2.0]]), t([[-1.5, -2.0]])
    assert k3_kl(logps, ref)[0].tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, 0.0])
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=g, dtype=D), torch.randn(50, generator=g, dtype=D)
    assert (k3_kl(a, b) >= 0).all()
    # Unbiased: the mean over tokens sampled from p approaches KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=D)
    exact = float((p * (p / q).log()).sum())
    expected_k3 = float((p * k3_kl(p.log(), q.log())).sum())  # expectation under p, exactly
    assert expected_k3 == pytest.approx(exact, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Aggregation and masking
# ---------------------------------------------------------------------------------------------

LOSS = t([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
MASK = t([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_aggregation_by_hand():
    assert float(aggregate_loss(LOSS, MASK, "grpo")) == pytest.approx((2.0 + 4.0) / 2)
    assert float(aggregate_loss(LOSS, MASK, "dapo")) == pytest.approx(10.0 / 4)
    assert float(aggregate_loss(LOSS, MASK, "dapo", num_tokens=20)) == pytest.approx(0.5)
    assert float(aggregate_loss(LOSS, MASK, "dr_grpo", max_completion_length=5)) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="max_completion_length"):
        aggregate_loss(LOSS, MASK, "dr_grpo")
    with pytest.raises(ConfigError, match="expected one of grpo"):
        aggregate_loss(LOSS, MASK, "bnpo")


def test_token_level_normalizer_makes_the_global_batch_token_mean():
    """Split a batch over 2 ranks x 2 micro-batches: the trainer's scaling gives the token mean."""
    g = torch.Generator().manual_seed(2)
    loss = torch.rand(8, 6, generator=g, dtype=D)
    mask = (torch.rand(8, 6, generator=g) > 0.4).to(D)
    full = aggregate_loss(loss, mask, "dapo")
    n = token_level_normalizer(float(mask.sum()), grad_accum=2, world_size=2)
    ranks = []
    for rank in range(2):
        step = 0.0
        for micro in range(2):
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            step += aggregate_loss(loss[rows], mask[rows], "dapo", num_tokens=n) / 2  # / grad_accum
        ranks.append(step)
    assert float(sum(ranks) / 2) == pytest.approx(float(full), abs=1e-12)  # DDP averages ranks


def test_mask_truncated_and_masked_mean():
    m = mask_truncated(MASK, torch.tensor([True, False]))
    assert m.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    assert float(masked_mean(LOSS, m)) == 4.0
    assert float(masked_mean(LOSS, torch.zeros_like(MASK))) == 0.0
    with pytest.raises(InputError, match="expected \\(N,\\)"):
        mask_truncated(MASK, torch.tensor([True]))


def test_entropy_closed_forms():
    V = 7
    assert entropy_from_logits(torch.zeros(2, 3, V, dtype=D)).flatten().tolist() == pytest.approx(
        [math.log(V)] * 6)
    onehot = torch.full((1, V), -1e4, dtype=D)
    onehot[0, 2] = 0
    assert float(entropy_from_logits(onehot)) == pytest.approx(0.0, abs=1e-12)
    p = [0.5, 0.25, 0.25]
    assert float(entropy_from_logits(t(p).log())) == pytest.approx(-sum(x * math.log(x) for x in p))


def test_policy_loss_errors():
    lp = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ConfigError, match="needs reference"):
        grpo_policy_loss(lp, None, t([1.0, -1.0]), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ConfigError, match=">= 0"):
        grpo_policy_loss(lp, None, t([1.0, -1.0]), torch.ones(2, 3), beta=-1.0)
    with pytest.raises(InputError, match="disagree"):
        clipped_surrogate(lp, lp, t([1.0]))


# ---------------------------------------------------------------------------------------------
# TRL's own code (skipped without trl)
# ---------------------------------------------------------------------------------------------


def _trl_grpo_loss(loss_type, logps, old_logps, ref_logps, advantages, mask, beta, eps_low,
                   eps_high, max_completion_length, num_items):
    """TRL's GRPOTrainer._compute_loss on a stand-in whose per-token log-probs are ``logps``."""
    from trl import GRPOTrainer

    n, width = logps.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x,
                                    reduce=lambda x, reduction="sum": x),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long),
              "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, width, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": advantages,
              "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": torch.tensor(float(num_items))}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,beta,eps_low,eps_high", [
    ("grpo", 0.0, 0.2, 0.2), ("grpo", 0.04, 0.2, 0.28), ("dr_grpo", 0.0, 0.2, 0.28),
    ("dapo", 0.1, 0.1, 0.3),
])
def test_matches_trl_grpo_trainer(loss_type, beta, eps_low, eps_high):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(3)
    N, T, L = 6, 5, 8
    base = -torch.rand(N, T, generator=g, dtype=D) * 3
    old = base + torch.randn(N, T, generator=g, dtype=D) * 0.3  # ratios well outside the clip range
    ref = base + torch.randn(N, T, generator=g, dtype=D) * 0.5
    adv = group_advantages(torch.randint(0, 3, (N,), generator=g).to(D), 3).advantages
    mask = torch.ones(N, T, dtype=D)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    num_items = float(mask.sum()) + 7  # a "global" token count larger than this batch's

    ours_lp = base.clone().requires_grad_()
    ours = grpo_policy_loss(ours_lp, old, adv, mask, ref_logps=ref, beta=beta,
                            epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type,
                            max_completion_length=L, num_tokens=num_items)
    ours.loss.backward()
    trl_lp = base.clone().requires_grad_()
    trl_loss, trl_m = _trl_grpo_loss(loss_type, trl_lp, old, ref, adv, mask, beta, eps_low,
                                     eps_high, L, num_items)
    trl_loss.backward()
    assert float(ours.loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad, rtol=1e-12, atol=1e-14)
    assert ours.metrics["clip_ratio/low"] == pytest.approx(trl_m["clip_ratio/low_mean"])
    assert ours.metrics["clip_ratio/high"] == pytest.approx(trl_m["clip_ratio/high_mean"])
    assert ours.metrics["clip_ratio/region"] == pytest.approx(trl_m["clip_ratio/region_mean"])
    assert 0 < ours.metrics["clip_ratio/region"] < 1  # the case does exercise the clip
    if beta > 0:
        assert ours.metrics["kl"] == pytest.approx(trl_m["kl"], rel=1e-12)


def test_entropy_and_std_match_trl_utils():
    pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits as trl_entropy
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 50, generator=g, dtype=D) * 4
    torch.testing.assert_close(entropy_from_logits(logits), trl_entropy(logits), rtol=1e-12, atol=1e-12)
    rewards = torch.randn(12, generator=g, dtype=D)
    out = group_advantages(rewards, 4)
    torch.testing.assert_close(out.group_std, nanstd(rewards.view(3, 4), dim=1))


def test_one_iteration_gradient_is_reinforce_with_group_baseline_on_a_toy_policy():
    """A one-token policy over 4 answers, K = 8 samples, answer 2 rewarded: the loss gradient is
    -(1/K) sum_i A_i (onehot_i - p) in the logits, and a step makes answer 2 more likely."""
    logits = torch.zeros(1, 4, dtype=D, requires_grad=True)
    samples = torch.tensor([0, 2, 1, 2, 3, 0, 2, 1])
    rewards = (samples == 2).to(D)
    adv = group_advantages(rewards, 8).advantages  # (8,)
    logp = torch.log_softmax(logits, -1)[0, samples].unsqueeze(1)  # (8, 1) one token each
    out = grpo_policy_loss(logp, None, adv, torch.ones(8, 1, dtype=D))
    out.loss.backward()
    p = torch.softmax(logits.detach(), -1)[0]
    onehot = torch.nn.functional.one_hot(samples, 4).to(D)
    expect = -(adv.unsqueeze(1) * (onehot - p)).mean(0)
    torch.testing.assert_close(logits.grad[0], expect)
    assert out.metrics["clip_ratio/region"] == 0.0  # ratio 1: nothing clipped
    stepped = torch.softmax(logits.detach() - 1.0 * logits.grad, -1)[0]
    assert stepped[2] > p[2] and stepped.argmax() == 2
