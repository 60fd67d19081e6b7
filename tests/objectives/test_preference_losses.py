"""DPO-family losses: hand-computed closed forms, TRL's own code on the same log-probs, step 0."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.objectives.preference_losses import (
    LOSS_TYPES, PairLogps, hinge_loss, ipo_loss, log1mexp, orpo_loss, preference_loss,
    robust_loss, sigmoid_loss, simpo_loss,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL is only an oracle here

# Two pairs picked by hand: summed log-probs of policy and reference, completion lengths.
PC = [-12.0, -30.5]   # policy chosen
PR = [-15.0, -28.0]   # policy rejected
RC = [-13.0, -30.0]   # reference chosen
RR = [-14.0, -29.5]   # reference rejected
NC = [4, 10]          # chosen completion tokens
NR = [6, 7]           # rejected completion tokens


def t(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def h(i: int) -> float:
    """Difference of log-ratios of pair i."""
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


def test_sigmoid_closed_form_and_metrics():
    beta = 0.1
    out = sigmoid_loss(t(PC), t(PR), t(RC), t(RR), beta=beta)
    expect = [-logsig(beta * h(i)) for i in range(2)]
    assert h(0) == 2.0 and h(1) == -2.0
    assert out.losses.tolist() == pytest.approx(expect, abs=1e-12)
    assert float(out.loss) == pytest.approx(sum(expect) / 2, abs=1e-12)
    m = out.metrics()
    chosen_r = [beta * (PC[i] - RC[i]) for i in range(2)]    # 0.1, -0.05
    rejected_r = [beta * (PR[i] - RR[i]) for i in range(2)]  # -0.1, 0.15
    assert m["rewards/chosen"] == pytest.approx(sum(chosen_r) / 2)
    assert m["rewards/rejected"] == pytest.approx(sum(rejected_r) / 2)
    assert m["rewards/margins"] == pytest.approx((0.2 - 0.2) / 2, abs=1e-12)
    assert m["rewards/accuracy"] == 0.5
    assert m["logps/chosen"] == pytest.approx(sum(PC) / 2)
    assert m["logps/rejected"] == pytest.approx(sum(PR) / 2)


def test_cdpo_label_smoothing_closed_form():
    beta, e = 0.5, 0.2
    out = sigmoid_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=e)
    expect = [-(1 - e) * logsig(beta * h(i)) - e * logsig(-beta * h(i)) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expect, abs=1e-12)
    # cDPO's minimum over the margin is where sigmoid(beta h) = 1 - e.
    best = math.log((1 - e) / e) / beta
    grid = torch.linspace(best - 1, best + 1, 201, dtype=torch.float64)
    vals = sigmoid_loss(grid, torch.zeros_like(grid), torch.zeros_like(grid),
                        torch.zeros_like(grid), beta=beta, label_smoothing=e).losses
    assert float(grid[vals.argmin()]) == pytest.approx(best, abs=0.011)


def test_robust_closed_form():
    beta, e = 0.3, 0.25
    out = robust_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=e)
    expect = [((1 - e) * -logsig(beta * h(i)) - e * -logsig(-beta * h(i))) / (1 - 2 * e)
              for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expect, abs=1e-12)
    # Unbiased: averaged over a flip of rate e, it equals the clean DPO loss.
    flipped = robust_loss(t(PR), t(PC), t(RR), t(RC), beta=beta, label_smoothing=e).losses
    clean = sigmoid_loss(t(PC), t(PR), t(RC), t(RR), beta=beta).losses
    assert ((1 - e) * out.losses + e * flipped).tolist() == pytest.approx(clean.tolist(), abs=1e-12)


def test_hinge_closed_form():
    beta = 0.6
    out = hinge_loss(t(PC), t(PR), t(RC), t(RR), beta=beta)
    assert out.losses.tolist() == pytest.approx([max(0.0, 1 - 0.6 * 2.0), 1 + 0.6 * 2.0])
    # The first pair clears the margin 1/beta: no gradient flows from it.
    pc = t(PC).requires_grad_()
    hinge_loss(pc, t(PR), t(RC), t(RR), beta=beta).loss.backward()
    assert pc.grad.tolist() == pytest.approx([0.0, -beta / 2])


def test_ipo_length_normalised_closed_form():
    beta = 0.1
    out = ipo_loss(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), beta=beta)
    expect = []
    for i in range(2):
        d = (PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]
        expect.append((d - 1 / (2 * beta)) ** 2)
    assert out.losses.tolist() == pytest.approx(expect, abs=1e-12)
    # Zero-length completions count as one token (no division by zero).
    z = ipo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-2.0]), t([0]), t([0]), beta=beta)
    assert float(z.loss) == pytest.approx((0.5 - 5.0) ** 2)


def test_simpo_closed_form():
    beta, gamma = 2.0, 0.5
    ca = [PC[i] / NC[i] for i in range(2)]
    ra = [PR[i] / NR[i] for i in range(2)]
    out = simpo_loss(t(ca), t(ra), beta=beta, gamma=gamma)
    expect = [-logsig(beta * (ca[i] - ra[i]) - gamma) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expect, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * c for c in ca])


def test_orpo_closed_form():
    beta = 0.1
    ca = [PC[i] / NC[i] for i in range(2)]  # -3.0, -3.05
    ra = [PR[i] / NR[i] for i in range(2)]  # -2.5, -4.0
    nll = torch.tensor(2.75, dtype=torch.float64)
    out = orpo_loss(t(ca), t(ra), nll, beta=beta)
    expect = []
    for i in range(2):
        log_odds = (ca[i] - math.log(1 - math.exp(ca[i]))) - (ra[i] - math.log(1 - math.exp(ra[i])))
        expect.append(2.75 - beta * logsig(log_odds))
    assert out.losses.tolist() == pytest.approx(expect, abs=1e-12)


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-10, -1e-3, -0.5, -0.7, -2.0, -40.0], dtype=torch.float64)
    ref = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(ref, rel=1e-12)
    assert float(log1mexp(torch.tensor(-40.0, dtype=torch.float64))) == pytest.approx(-math.exp(-40.0))


# ---------------------------------------------------------------------------------------------
# Step 0: policy == reference
# ---------------------------------------------------------------------------------------------


def test_step0_policy_equals_reference_gives_ln2_and_zero_margins():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(2, 16, generator=g, dtype=torch.float64) * 50
    policy = PairLogps(logps[0], logps[1], torch.full((16,), 5), torch.full((16,), 7))
    out = preference_loss("sigmoid", policy, policy, beta=0.1)
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-12)
    m = out.metrics()
    assert m["rewards/margins"] == 0.0 and m["rewards/chosen"] == 0.0
    assert m["rewards/accuracy"] == 0.0  # strict >: a tie is not a win


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ConfigError, match="beta > 0"):
        sigmoid_loss(t(PC), t(PR), t(RC), t(RR), beta=beta)


def test_shape_and_option_errors():
    with pytest.raises(InputError, match=r"shape \(B,\)"):
        sigmoid_loss(t(PC), t(PR[:1]), t(RC), t(RR))
    with pytest.raises(ConfigError, match="label_smoothing"):
        robust_loss(t(PC), t(PR), t(RC), t(RR), label_smoothing=0.5)
    with pytest.raises(ConfigError, match="expected one of sigmoid"):
        preference_loss("dpo", PairLogps(t(PC), t(PR), t(NC), t(NR)))
    with pytest.raises(ConfigError, match="needs reference"):
        preference_loss("ipo", PairLogps(t(PC), t(PR), t(NC), t(NR)))


def test_dispatcher_matches_the_functions():
    pol = PairLogps(t(PC), t(PR), t(NC), t(NR))
    ref = PairLogps(t(RC), t(RR), t(NC), t(NR))
    assert float(preference_loss("ipo", pol, ref, beta=0.2).loss) == pytest.approx(
        float(ipo_loss(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), beta=0.2).loss))
    nll = -(PC[0] + PC[1]) / (NC[0] + NC[1])
    assert float(preference_loss("orpo", pol, beta=0.2).loss) == pytest.approx(
        float(orpo_loss(pol.chosen_avg, pol.rejected_avg, torch.tensor(nll, dtype=torch.float64),
                        beta=0.2).loss))
    for name in LOSS_TYPES:  # every loss runs through the dispatcher and gives a finite scalar
        out = preference_loss(name, pol, ref, beta=0.2, label_smoothing=0.1)
        assert out.loss.dim() == 0 and math.isfinite(float(out.loss))


# ---------------------------------------------------------------------------------------------
# TRL's own code on identical log-probs (skipped without trl)
# ---------------------------------------------------------------------------------------------


def _random_pairs(seed: int, n: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ntok_c = torch.randint(1, 20, (n,), generator=g)
    ntok_r = torch.randint(1, 20, (n,), generator=g)
    pc = -torch.rand(n, generator=g, dtype=dtype) * 3 * ntok_c
    pr = -torch.rand(n, generator=g, dtype=dtype) * 3 * ntok_r
    rc = pc + torch.randn(n, generator=g, dtype=dtype) * 2
    rr = pr + torch.randn(n, generator=g, dtype=dtype) * 2
    return pc, pr, rc, rr, ntok_c, ntok_r


def _trl_dpo(loss_type, pc, pr, rc, rr, ntok_c, ntok_r, beta, label_smoothing=0.0):
    """Run TRL's DPOTrainer._compute_loss on a stand-in model whose per-token log-probs sum to
    the given sequence log-probs; reference log-probs come in as precomputed (TRL's option)."""
    from trl import DPOTrainer

    n = pc.shape[0]
    counts = torch.cat([ntok_c, ntok_r])  # (2B,) batch is [chosen, rejected]
    width = int(counts.max()) + 2  # one prompt token in front, one pad at the end at least
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for row, c in enumerate(counts.tolist()):
        completion_mask[row, 1:1 + c] = 1
    shifted = completion_mask[:, 1:].to(pc.dtype)  # (2B, W-1)
    per_token = shifted * (torch.cat([pc, pr]) / counts.to(pc.dtype)).unsqueeze(1)  # (2B, W-1)

    def fake_model(**kwargs):
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token),
                               is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(),
    )
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(stub, fake_model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return float(loss), metrics


@pytest.mark.parametrize("loss_type,beta,smoothing", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.1, 0.2), ("hinge", 0.3, 0.0),
    ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0),
])
def test_matches_trl_dpo_trainer(loss_type, beta, smoothing):
    pytest.importorskip("trl")
    for seed in range(3):
        pc, pr, rc, rr, ntok_c, ntok_r = _random_pairs(seed)
        ref_loss, ref_m = _trl_dpo(loss_type, pc, pr, rc, rr, ntok_c, ntok_r, beta, smoothing)
        ours = preference_loss(loss_type, PairLogps(pc, pr, ntok_c, ntok_r),
                               PairLogps(rc, rr, ntok_c, ntok_r), beta=beta,
                               label_smoothing=smoothing)
        assert float(ours.loss) == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
        m = ours.metrics()
        for ours_key, trl_key in [("rewards/chosen", "rewards/chosen"),
                                  ("rewards/rejected", "rewards/rejected"),
                                  ("rewards/margins", "rewards/margins"),
                                  ("rewards/accuracy", "rewards/accuracies"),
                                  ("logps/chosen", "logps/chosen"),
                                  ("logps/rejected", "logps/rejected")]:
            assert m[ours_key] == pytest.approx(ref_m[trl_key], rel=1e-10, abs=1e-12), ours_key


def test_step0_matches_trl_dpo_trainer():
    pytest.importorskip("trl")
    pc, pr, _, _, ntok_c, ntok_r = _random_pairs(7)
    ref_loss, ref_m = _trl_dpo("sigmoid", pc, pr, pc, pr, ntok_c, ntok_r, 0.1)
    assert ref_loss == pytest.approx(math.log(2), abs=1e-12)
    assert ref_m["rewards/margins"] == pytest.approx(0.0, abs=1e-12)


def test_cdpo_matches_trl_cpo_sigmoid_on_log_ratios():
    """TRL's CPO 'sigmoid' loss is cDPO on the log-probs it gets: fed the log-ratios, it is ours."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, rc, rr, _, _ = _random_pairs(3)
    for beta, e in [(0.1, 0.0), (0.2, 0.1), (1.0, 0.3)]:
        stub = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=e, loss_type="sigmoid",
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
        losses, _, _ = CPOTrainer.cpo_loss(stub, pc - rc, pr - rr)
        ours = sigmoid_loss(pc, pr, rc, rr, beta=beta, label_smoothing=e)
        torch.testing.assert_close(ours.losses, losses, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta,gamma,e", [(2.0, 0.5, 0.0), (2.5, 1.0, 0.0), (1.0, 0.3, 0.1)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma, e):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, _, _, ntok_c, ntok_r = _random_pairs(4)
    ca, ra = pc / ntok_c, pr / ntok_r  # CPO reads average log-probs for simpo
    stub = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=e, loss_type="simpo",
                           simpo_gamma=gamma, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(stub, ca, ra)
    ours = simpo_loss(ca, ra, beta=beta, gamma=gamma, label_smoothing=e)
    torch.testing.assert_close(ours.losses, losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, chosen_r, rtol=0, atol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl_orpo_trainer(beta):
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, _, _, ntok_c, ntok_r = _random_pairs(5)
    ca, ra = (pc / ntok_c).float(), (pr / ntok_r).float()  # TRL computes ORPO in float32
    ca[0] = -1e-3  # near-certain completions exercise the log1mexp branch near 0
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    or_losses, chosen_r, rejected_r, _, _ = ORPOTrainer.odds_ratio_loss(stub, ca, ra)
    nll = torch.tensor(1.7)
    trl_loss = nll - or_losses.mean()  # TRL: policy_nll_loss - losses.mean()
    ours = orpo_loss(ca, ra, nll, beta=beta)
    assert float(ours.loss) == pytest.approx(float(trl_loss), rel=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, chosen_r)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r)
