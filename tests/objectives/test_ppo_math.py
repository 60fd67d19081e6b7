"""PPO's arithmetic (lmforge.objectives.ppo_math) against two references on identical inputs:
the published formulas written as plain per-element loops here (GAE: Schulman et al. 2015,
eq. 16; the clipped surrogate: Schulman et al. 2017, eq. 7; the clipped value loss of OpenAI
baselines' PPO2), and torchtune's RLHF functions (get_rewards_ppo, estimate_advantages, whiten,
PPOLoss) as an independent implementation."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.objectives.ppo_math import (clipped_policy_loss, clipped_value_loss, gae, kl_penalty,
                                         last_token_index, ppo_loss, token_rewards, whiten)


def _case(seed=0, N=4, T=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N, T)
    starts, lengths = [1, 0, 3, 2], [4, 7, 2, 5]
    for i in range(N):
        mask[i, starts[i]:starts[i] + lengths[i]] = 1
    mask = mask[:N, :T]
    logps = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    ref = logps + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)
    values = torch.randn(N, T, generator=g, dtype=torch.float64)
    old_values = values + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    scores = torch.randn(N, generator=g, dtype=torch.float64)
    return mask.double(), logps, old, ref, values, old_values, scores


# ------------------------------------------------------------------------------ the formulas, as loops
def gae_loops(rewards, values, mask, gamma, lam):
    """GAE (Schulman et al. 2015, eq. 16) per completion: A_t = sum_l (gamma lam)^l delta_{t+l} over the
    completion's own tokens, delta_t = r_t + gamma V_{t+1} - V_t, V = 0 after the last token."""
    N, T = mask.shape
    adv, ret = torch.zeros(N, T, dtype=torch.float64), torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        pos = [t for t in range(T) if mask[i, t] > 0]
        for k, t in enumerate(pos):
            total = 0.0
            for l, u in enumerate(pos[k:]):
                v_next = float(values[i, pos[k + l + 1]]) if k + l + 1 < len(pos) else 0.0
                delta = float(rewards[i, u]) + gamma * v_next - float(values[i, u])
                total += (gamma * lam) ** l * delta
            adv[i, t] = total
            ret[i, t] = total + float(values[i, t])
    return adv, ret


def test_gae_matches_the_formula_with_loops():
    mask, _, _, _, values, _, _ = _case()
    rewards = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * mask
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        want_adv, want_ret = gae_loops(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, want_adv)
        torch.testing.assert_close(ret, want_ret)


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    """With gamma = lam = 1, A_t = (sum of the rewards from t on) - V_t: the Monte Carlo return."""
    mask, _, _, _, values, _, _ = _case()
    rewards = torch.rand(mask.shape, dtype=torch.float64) * mask
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    togo = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, togo * mask)
    torch.testing.assert_close(adv, (togo - values) * mask)


def test_token_rewards_put_the_score_on_the_last_token_and_charge_kl_everywhere():
    mask, logps, _, ref, _, _, scores = _case()
    kl = kl_penalty(logps, ref) * mask
    r = token_rewards(scores, kl, mask, 0.1)
    last = last_token_index(mask)
    assert last.tolist() == [4, 6, 4, 6]
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            want = (-0.1 * float(kl[i, t]) if mask[i, t] else 0.0) + (float(scores[i]) if t == last[i] else 0.0)
            assert math.isclose(float(r[i, t]), want, abs_tol=1e-12)


def test_kl_estimators():
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    d = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(kl_penalty(logps, ref, "k3"), torch.exp(-d) + d - 1)
    assert (kl_penalty(logps, ref, "k3") >= 0).all()
    with pytest.raises(ConfigError, match="kl_estimator"):
        kl_penalty(logps, ref, "k2")


def test_clipped_losses_match_the_formulas_with_loops():
    mask, logps, old, _, values, old_values, _ = _case()
    adv = torch.randn(mask.shape, dtype=torch.float64)
    ret = torch.randn(mask.shape, dtype=torch.float64)
    pg, pg_clip = clipped_policy_loss(logps, old, adv, 0.2)
    vf, vf_clip = clipped_value_loss(values, old_values, ret, 0.2)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            ratio = math.exp(float(logps[i, t] - old[i, t]))
            a = float(adv[i, t])
            surrogate = min(ratio * a, min(max(ratio, 0.8), 1.2) * a)  # eq. 7
            assert math.isclose(float(pg[i, t]), -surrogate, rel_tol=1e-12, abs_tol=1e-12)
            assert bool(pg_clip[i, t]) == (min(max(ratio, 0.8), 1.2) * a < ratio * a)
            v, ov, R = float(values[i, t]), float(old_values[i, t]), float(ret[i, t])
            vc = ov + min(max(v - ov, -0.2), 0.2)
            assert math.isclose(float(vf[i, t]), 0.5 * max((v - R) ** 2, (vc - R) ** 2), rel_tol=1e-12, abs_tol=1e-12)


def test_whiten_is_unit_variance_keeping_the_mean():
    mask, _, _, _, values, _, _ = _case()
    w = whiten(values * 3 + 1, mask)
    m = mask.bool()
    x = (values * 3 + 1)[m]
    assert math.isclose(float(w[m].mean()), float(x.mean()), rel_tol=1e-9)
    assert math.isclose(float(w[m].std()), 1.0, rel_tol=1e-6)
    assert (w[~m] == 0).all()
    w0 = whiten(values, mask, shift_mean=False)
    assert abs(float(w0[m].mean())) < 1e-9


def test_bad_shapes_are_one_line_errors():
    mask, logps, old, _, values, old_values, scores = _case()
    with pytest.raises(InputError, match="gae"):
        gae(values[:, :3], values, mask)
    with pytest.raises(InputError, match="ppo_loss"):
        ppo_loss(logps, old[:, :3], values, old_values, values, values, mask)
    with pytest.raises(InputError, match="token_rewards"):
        token_rewards(scores[:2], logps, mask, 0.1)


def test_one_update_on_fresh_rollouts_is_the_policy_gradient_and_unclipped():
    """ratio 1 and values at their rollout values: nothing clips; the policy gradient is -A / n per token."""
    mask, logps, _, _, values, _, _ = _case()
    adv, ret = torch.randn(mask.shape, dtype=torch.float64), torch.randn(mask.shape, dtype=torch.float64)
    lp = logps.clone().requires_grad_(True)
    out = ppo_loss(lp, logps, values, values, adv, ret, mask, vf_coef=0.5)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, -adv * mask / mask.sum())
    assert out.metrics["clipfrac"] == 0 and out.metrics["value_clipfrac"] == 0 and out.metrics["ratio"] == 1


# ------------------------------------------------------------------------------ torchtune as the oracle
rlhf = pytest.importorskip("torchtune.rlhf", reason="torchtune (dev extra) is the oracle for these tests")


def test_rewards_and_gae_and_whitening_match_torchtune():
    """Right-aligned completions (what torchtune's layout assumes: padding after the response)."""
    N, T = 4, 6
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(T) < lengths[:, None]).double()
    logps, ref = -torch.rand(N, T, generator=g, dtype=torch.float64), -torch.rand(N, T, generator=g, dtype=torch.float64)
    values = torch.randn(N, T, generator=g, dtype=torch.float64) * mask
    scores = torch.randn(N, generator=g, dtype=torch.float64)
    kl = kl_penalty(logps, ref) * mask
    r = token_rewards(scores, kl, mask, 0.05)
    tt_r, tt_kl, _ = rlhf.get_rewards_ppo(scores, logps * mask, ref * mask, 0.05, valid_score_idxs=lengths - 1)
    torch.testing.assert_close(r, tt_r * mask)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.7)]:
        adv, ret = gae(r, values, mask, gamma, lam)
        tt_adv, tt_ret = rlhf.estimate_advantages(values, tt_r * mask, gamma, lam, masks=mask.bool())
        torch.testing.assert_close(whiten(adv, mask), tt_adv)
        torch.testing.assert_close(ret, tt_ret * mask)


def test_ppo_loss_matches_torchtune_ppoloss():
    from torchtune.rlhf.loss import PPOLoss as TorchtunePPOLoss

    mask, logps, old, _, values, old_values, _ = _case(seed=5)
    adv, ret = torch.randn(mask.shape, dtype=torch.float64), torch.randn(mask.shape, dtype=torch.float64)
    for eps, cv, vf in [(0.2, 0.2, 0.1), (0.1, 0.5, 1.0)]:
        lp, v = logps.clone().requires_grad_(True), values.clone().requires_grad_(True)
        ours = ppo_loss(lp, old, v, old_values, adv, ret, mask, cliprange=eps, cliprange_value=cv, vf_coef=vf)
        ours.loss.backward()
        lp2, v2 = logps.clone().requires_grad_(True), values.clone().requires_grad_(True)
        theirs = TorchtunePPOLoss(epsilon=eps, value_clip_range=cv, value_coeff=vf)(
            old, lp2, adv, old_values, v2, ret, padding_masks=mask.bool(), value_padding_masks=mask.bool())
        theirs[0].backward()
        torch.testing.assert_close(ours.loss, theirs[0])
        torch.testing.assert_close(ours.policy_loss, theirs[1])
        torch.testing.assert_close(ours.value_loss, theirs[2])
        assert math.isclose(ours.metrics["clipfrac"], float(theirs[4]), abs_tol=1e-7)
        torch.testing.assert_close(lp.grad, lp2.grad)
        torch.testing.assert_close(v.grad, v2.grad)
