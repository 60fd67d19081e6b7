"""The DPO family of preference losses, as plain functions of sequence log-probabilities.

Every loss here sees one batch of preference pairs through a handful of ``(B,)`` tensors:

    policy_chosen, policy_rejected  log pi_theta(y | x)  summed over the completion tokens
    ref_chosen, ref_rejected        log pi_ref(y | x)    (the frozen reference; not for simpo/orpo)
    chosen_tokens, rejected_tokens  how many completion tokens each sum covers

How those numbers are obtained (one forward pass over chosen and rejected stacked, prompt and
padding masked) is :mod:`lmforge.objectives.logprobs`' job; which model is the reference (a frozen
copy, the LoRA base with adapters off, or cached log-probs) is the objective's. The functions
below only do arithmetic, so each can be checked against a closed form on numbers picked by hand.

The implicit reward of a completion is ``beta * (log pi_theta(y|x) - log pi_ref(y|x))``: DPO's
derivation shows that the policy maximising reward-minus-KL defines the reward up to a per-prompt
constant, so the difference of two such rewards for the same prompt is what the losses act on.
Each loss returns a :class:`PreferenceLoss` holding the scalar to minimise and the per-pair
numbers behind the logged metrics (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracy with a strict ``>``, logps/chosen, logps/rejected).

At step 0, when the policy *is* the reference, every log-ratio is 0: the sigmoid loss is
``-log sigmoid(0) = ln 2`` and every margin is 0 (accuracy 0, since ``0 > 0`` is false).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError

__all__ = [
    "PreferenceLoss",
    "PairLogps",
    "LOSS_TYPES",
    "REFERENCE_FREE",
    "sigmoid_loss",
    "robust_loss",
    "hinge_loss",
    "ipo_loss",
    "simpo_loss",
    "orpo_loss",
    "log1mexp",
    "preference_loss",
]


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss and the per-pair numbers its metrics are made of.

    ``loss`` is the scalar to minimise (mean over the batch); ``losses`` the per-pair values (B,).
    ``chosen_rewards`` / ``rejected_rewards`` (B,) are the implicit rewards (detached) and
    ``chosen_logps`` / ``rejected_logps`` (B,) the policy log-probs the loss used (detached).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards  # (B,)

    def metrics(self) -> dict[str, float]:
        """Batch means, named as TRL logs them (accuracy counts strict ``chosen > rejected``)."""
        return {
            "rewards/chosen": float(self.chosen_rewards.mean()),
            "rewards/rejected": float(self.rejected_rewards.mean()),
            "rewards/margins": float(self.margins.mean()),
            "rewards/accuracy": float((self.chosen_rewards > self.rejected_rewards).float().mean()),
            "logps/chosen": float(self.chosen_logps.mean()),
            "logps/rejected": float(self.rejected_logps.mean()),
        }


# --------------------------------------------------------------------------------------------
# Argument checks (one line each: what is wrong, what was expected)
# --------------------------------------------------------------------------------------------

def _check_beta(beta: float, loss: str) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"objective.beta: the {loss} loss needs beta > 0, got {beta!r}")


def _check_pairs(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        listed = ", ".join(f"{k}={v}" for k, v in shapes.items())
        raise InputError(f"preference loss: expected tensors of one shape (B,), got {listed}")


def _check_smoothing(label_smoothing: float, upper: float, loss: str, closed: bool) -> None:
    ok = 0.0 <= label_smoothing <= upper if closed else 0.0 <= label_smoothing < upper
    if not ok:
        bound = f"<= {upper}" if closed else f"< {upper}"
        raise ConfigError(f"objective.label_smoothing: the {loss} loss needs 0 <= label_smoothing "
                          f"{bound}, got {label_smoothing!r}")


def _result(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    return PreferenceLoss(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
    )


# --------------------------------------------------------------------------------------------
# Losses with a reference model
# --------------------------------------------------------------------------------------------

def sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                 label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * h)``, ``h`` the difference of log-ratios.

    ``h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl))``. With ``label_smoothing = e``
    it is conservative DPO (cDPO, Mitchell 2023): the label is taken to be wrong with
    probability ``e``, so the loss is the cross-entropy against the soft target ``1 - e``:
    ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``. Its optimum sits at a finite margin
    (``beta h = log((1 - e) / e)``) instead of pushing ``h`` to infinity.
    """
    _check_beta(beta, "sigmoid")
    _check_smoothing(label_smoothing, 0.5, "sigmoid", closed=True)
    _check_pairs(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _result(losses, beta * chosen_ratio, beta * rejected_ratio, policy_chosen,
                   policy_rejected)


def robust_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                label_smoothing: float = 0.1) -> PreferenceLoss:
    """Robust DPO (Chowdhury et al. 2024): an unbiased loss under label flips of rate ``e``.

    ``((1 - e) * l(h) - e * l(-h)) / (1 - 2e)`` with ``l(h) = -log sigmoid(beta h)``. Where cDPO
    softens the target, this corrects the expected loss so that, averaged over the noise, it
    equals the clean DPO loss; ``e`` must stay below 1/2 (at 1/2 the labels carry no signal).
    """
    _check_beta(beta, "robust")
    _check_smoothing(label_smoothing, 0.5, "robust", closed=False)
    _check_pairs(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    e = label_smoothing
    losses = (-(1 - e) * F.logsigmoid(logits) + e * F.logsigmoid(-logits)) / (1 - 2 * e)
    return _result(losses, beta * chosen_ratio, beta * rejected_ratio, policy_chosen,
                   policy_rejected)


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
               beta: float = 0.1) -> PreferenceLoss:
    """SLiC-style hinge (Zhao et al. 2023): ``max(0, 1 - beta h)``.

    Pairs already separated by a margin ``h >= 1 / beta`` contribute nothing (no gradient).
    """
    _check_beta(beta, "hinge")
    _check_pairs(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))  # (B,)
    return _result(losses, beta * chosen_ratio, beta * rejected_ratio, policy_chosen,
                   policy_rejected)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens,
             rejected_tokens, beta: float = 0.1) -> PreferenceLoss:
    """IPO (Azar et al. 2023, eq. 17), length-normalised as TRL does it.

    ``(h_avg - 1 / (2 beta))^2`` where each log-ratio is divided by its completion's token count
    before taking the difference: ``h_avg = (log pi(yw) - log ref(yw)) / |yw| - (...) / |yl|``.
    A squared loss on token-summed log-probs would grow with length; per token, ``beta`` means the
    same at every length. Counts below 1 are treated as 1. ``beta`` here is the paper's tau: the
    regression target ``1 / (2 beta)`` is the margin IPO aims for, rather than an unbounded one.
    """
    _check_beta(beta, "ipo")
    _check_pairs(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                 chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    chosen_avg = chosen_ratio / chosen_tokens.clamp(min=1)  # (B,)
    rejected_avg = rejected_ratio / rejected_tokens.clamp(min=1)  # (B,)
    losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2  # (B,)
    return _result(losses, beta * chosen_ratio, beta * rejected_ratio, policy_chosen,
                   policy_rejected)


# --------------------------------------------------------------------------------------------
# Reference-free losses (they read average log-probs per token)
# --------------------------------------------------------------------------------------------

def simpo_loss(policy_chosen_avg, policy_rejected_avg, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> PreferenceLoss:
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta (avg_w - avg_l) - gamma)``; no reference.

    The reward of a completion is ``beta`` times its *average* log-prob per token (so long
    completions are not favoured), and ``gamma`` is a target reward margin the chosen one must
    clear. ``label_smoothing`` softens the target as in cDPO (as TRL's CPO trainer does).
    """
    _check_beta(beta, "simpo")
    _check_smoothing(label_smoothing, 0.5, "simpo", closed=True)
    _check_pairs(policy_chosen_avg=policy_chosen_avg, policy_rejected_avg=policy_rejected_avg)
    logits = beta * (policy_chosen_avg - policy_rejected_avg) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _result(losses, beta * policy_chosen_avg, beta * policy_rejected_avg, policy_chosen_avg,
                   policy_rejected_avg)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``x = -ln 2``.

    Near 0 ``1 - exp(x)`` cancels, so ``log(-expm1(x))`` is used; far below 0 ``exp(x)`` is tiny
    and ``log1p(-exp(x))`` keeps its digits (Maechler 2012).
    """
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen_avg, policy_rejected_avg, chosen_nll, beta: float = 0.1
              ) -> PreferenceLoss:
    """ORPO (Hong et al. 2024): supervised NLL on the chosen answer plus an odds-ratio penalty.

    With ``p`` the average per-token probability of a completion (``log p`` = average log-prob),
    ``odds(y) = p / (1 - p)`` and the loss is
    ``chosen_nll - beta * mean(log sigmoid(log odds(yw) - log odds(yl)))``.
    ``log odds = log p - log(1 - p)`` is computed in log space with :func:`log1mexp`. No reference
    model: the NLL term keeps the policy near the data, the odds term pushes the pair apart.
    ``chosen_nll`` is the scalar NLL the caller chose (lmforge: token mean over the chosen
    completions; TRL's ORPO trainer also counts the prompt tokens). The implicit rewards logged
    are ``beta * log p``.
    """
    _check_beta(beta, "orpo")
    _check_pairs(policy_chosen_avg=policy_chosen_avg, policy_rejected_avg=policy_rejected_avg)
    if chosen_nll.dim() != 0:
        raise InputError(f"orpo loss: chosen_nll must be a scalar, got shape {tuple(chosen_nll.shape)}")
    log_odds = (policy_chosen_avg - policy_rejected_avg) - (
        log1mexp(policy_chosen_avg) - log1mexp(policy_rejected_avg))  # (B,)
    odds_term = F.logsigmoid(log_odds)  # (B,)
    losses = chosen_nll - beta * odds_term  # (B,): mean is nll - beta * mean(odds_term)
    return _result(losses, beta * policy_chosen_avg, beta * policy_rejected_avg, policy_chosen_avg,
                   policy_rejected_avg)


# --------------------------------------------------------------------------------------------
# One entry point for an objective
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of chosen and rejected (B,) and their token counts (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_avg(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)  # (B,)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)  # (B,)


REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")


def preference_loss(loss_type: str, policy: PairLogps, reference: PairLogps | None = None, *,
                    beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                    ) -> PreferenceLoss:
    """Dispatch to the loss named ``loss_type`` (one of :data:`LOSS_TYPES`).

    ``reference`` is required unless the loss is reference-free (simpo, orpo). For orpo the NLL
    term is the token mean of ``-log p`` over the chosen completions.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"objective.loss_type: got {loss_type!r}, expected one of "
                          f"{', '.join(LOSS_TYPES)}")
    if loss_type == "simpo":
        return simpo_loss(policy.chosen_avg, policy.rejected_avg, beta, gamma, label_smoothing)
    if loss_type == "orpo":
        nll = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
        return orpo_loss(policy.chosen_avg, policy.rejected_avg, nll, beta)
    if reference is None:
        raise ConfigError(f"objective.loss_type: the {loss_type} loss needs reference log-probs; "
                          f"only {' and '.join(REFERENCE_FREE)} are reference-free")
    args = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    if loss_type == "sigmoid":
        return sigmoid_loss(*args, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "robust":
        return robust_loss(*args, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "hinge":
        return hinge_loss(*args, beta=beta)
    return ipo_loss(*args, policy.chosen_tokens, policy.rejected_tokens, beta=beta)
