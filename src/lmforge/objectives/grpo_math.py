"""The arithmetic of GRPO (Group Relative Policy Optimization), as small tested functions.

GRPO (Shao et al. 2024, DeepSeekMath) trains a policy with rewards and no value network. For each
prompt it samples a *group* of K completions, scores them, and uses the group itself as the
baseline: a completion's advantage is how much better it did than its siblings. The policy is
then pushed up on better-than-average completions and down on worse ones, token by token, with
PPO's clipped importance ratio keeping each update close to the policy that sampled the group.

Layout used throughout: a rollout batch of G prompts x K completions is N = G*K rows, the K
completions of prompt g in rows ``g*K .. g*K + K - 1``. Per-token tensors are (N, T) over the
completion tokens only, with a ``mask`` (N, T) that is 1 on real completion tokens.

Everything here is pure arithmetic: rollout generation, reward functions and the model forward
live elsewhere and the GRPO objective composes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError, InputError

__all__ = [
    "SCALE_REWARDS",
    "LOSS_AGGREGATIONS",
    "GroupAdvantages",
    "group_advantages",
    "importance_ratio",
    "clipped_surrogate",
    "k3_kl",
    "masked_mean",
    "aggregate_loss",
    "token_level_normalizer",
    "mask_truncated",
    "clip_ratio_metrics",
    "entropy_from_logits",
    "GRPOLoss",
    "grpo_policy_loss",
]

SCALE_REWARDS = ("group", "none")
LOSS_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")

# Added to the group std before dividing, so a nearly-constant group does not blow up (TRL: 1e-4).
STD_EPS = 1e-4


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupAdvantages:
    """Per-completion advantages (N,) and per-group reward statistics (G,)."""

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor

    @property
    def zero_std(self) -> torch.Tensor:
        """(G,) True where every completion of the group got the same reward: no signal."""
        return torch.isclose(self.group_std, torch.zeros_like(self.group_std))

    @property
    def frac_zero_std(self) -> float:
        return float(self.zero_std.float().mean())


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group"
                     ) -> GroupAdvantages:
    """Group-relative advantages: ``A_i = r_i - mean(group)``, divided by the group std or not.

    ``rewards`` (N,) holds N = G * K rewards, K = ``group_size`` consecutive rows per prompt.
    ``scale_rewards="group"`` divides by ``std(group) + 1e-4`` (the sample std, with Bessel's
    correction, as TRL computes it), so every group's advantages have about unit spread;
    ``"none"`` keeps raw differences (Dr. GRPO argues the division over-weights groups that are
    nearly solved or nearly failed). A group whose rewards are all equal gets advantage 0
    for every completion either way: it teaches nothing, and is counted in ``frac_zero_std``.
    """
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ConfigError(f"grpo.num_generations: need K >= 2 completions per prompt for a "
                          f"group baseline, got {group_size!r}")
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"grpo.scale_rewards: got {scale_rewards!r}, expected one of "
                          f"{', '.join(SCALE_REWARDS)}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise InputError(f"group_advantages: rewards of shape {tuple(rewards.shape)} do not split "
                         f"into groups of {group_size}; expected (G * {group_size},)")
    grouped = rewards.view(-1, group_size)  # (G, K)
    mean = grouped.mean(dim=1)  # (G,)
    std = grouped.std(dim=1, unbiased=True)  # (G,)
    adv = grouped - mean.unsqueeze(1)  # (G, K)
    if scale_rewards == "group":
        adv = adv / (std.unsqueeze(1) + STD_EPS)
    return GroupAdvantages(adv.reshape(-1), mean, std)


# --------------------------------------------------------------------------------------------
# The clipped surrogate and the KL penalty
# --------------------------------------------------------------------------------------------

def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """``pi_theta(token) / pi_old(token)`` per token, (N, T): ``exp(logp - old_logp)``."""
    return torch.exp(logps - old_logps)


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float = 0.2, epsilon_high: float | None = None) -> torch.Tensor:
    """PPO's clipped objective, negated to a per-token loss (N, T).

    ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`` with the advantage ``A`` of
    the token's completion. Clipping removes the incentive to move a token's probability further
    once the ratio has left the trust region in the direction the advantage favours (above
    ``1 + eps_high`` for ``A > 0``, below ``1 - eps_low`` for ``A < 0``). A larger ``eps_high``
    (DAPO's "clip higher") leaves more room to raise unlikely tokens.

    ``old_logps`` are the log-probs of the policy that sampled the completions, taken without
    gradient. With one update per rollout batch (``num_iterations = 1``) the policy has not moved
    since sampling, so the ratio is exactly 1, nothing is clipped, and the gradient of this loss
    is ``-A * grad log pi(token)``: the plain policy gradient (REINFORCE) with the group mean as
    baseline. Clipping only matters from the second update on the same rollouts.
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if epsilon_low < 0 or eps_high < 0:
        raise ConfigError(f"grpo.epsilon: clip ranges must be >= 0, got epsilon_low={epsilon_low}, "
                          f"epsilon_high={eps_high}")
    if logps.shape != old_logps.shape or advantages.shape != logps.shape[:1]:
        raise InputError(f"clipped_surrogate: logps {tuple(logps.shape)}, old_logps "
                         f"{tuple(old_logps.shape)} and advantages {tuple(advantages.shape)} "
                         f"disagree; expected (N, T), (N, T), (N,)")
    ratio = importance_ratio(logps, old_logps)  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1)
    return -torch.min(ratio * adv, clipped * adv)  # (N, T)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled tokens (Schulman's "k3").

    With ``x = log pi_ref - log pi_theta`` at the sampled token: ``exp(x) - x - 1``. It is >= 0
    for every sample (``e^x >= 1 + x``), unbiased for the KL when tokens are drawn from
    pi_theta, and has lower variance than the naive ``-x``.
    """
    x = ref_logps - logps  # (N, T)
    return torch.exp(x) - x - 1


# --------------------------------------------------------------------------------------------
# Aggregation: how per-token losses become one number
# --------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo",
                   max_completion_length: int | None = None,
                   num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token loss (N, T) over the completion tokens (``mask``) to a scalar.

    - ``grpo``: mean over completions of each completion's token mean. Every completion weighs
      the same, so a token of a short answer weighs more than one of a long answer.
    - ``dr_grpo``: sum over all tokens / (N * ``max_completion_length``): a constant divisor,
      so neither completion length nor the batch's token count changes a token's weight.
    - ``dapo``: sum over all tokens / ``num_tokens``: every token weighs the same. Pass the
      token count of the whole optimizer step (see :func:`token_level_normalizer`) to normalise
      over the global batch; by default it is this batch's own ``mask.sum()``.
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ConfigError(f"grpo.loss_type: got {loss_type!r}, expected one of "
                          f"{', '.join(LOSS_AGGREGATIONS)}")
    if per_token_loss.shape != mask.shape:
        raise InputError(f"aggregate_loss: loss {tuple(per_token_loss.shape)} and mask "
                         f"{tuple(mask.shape)} disagree; expected the same (N, T)")
    mask = mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        per_seq = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (N,)
        return per_seq.mean()
    if loss_type == "dr_grpo":
        if not max_completion_length or max_completion_length < 1:
            raise ConfigError(f"grpo.max_completion_length: dr_grpo divides by it, so it must be "
                              f">= 1, got {max_completion_length!r}")
        return (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
    total = mask.sum() if num_tokens is None else num_tokens
    if isinstance(total, torch.Tensor):
        total = total.clamp(min=1)
    else:
        total = max(float(total), 1.0)
    return (per_token_loss * mask).sum() / total


def token_level_normalizer(global_tokens: int | float, grad_accum: int = 1, world_size: int = 1
                           ) -> float:
    """``num_tokens`` for :func:`aggregate_loss` ("dapo") under gradient accumulation and DDP.

    The trainer divides each micro-batch loss by ``grad_accum`` and DDP averages gradients over
    ``world_size`` ranks. Dividing each micro-batch's token sum by
    ``global_tokens / (grad_accum * world_size)`` (``global_tokens``: completion tokens in the
    whole optimizer step, all micro-batches on all ranks) makes the final gradient that of the
    token sum over the global batch divided by ``global_tokens``: the same per-token weight
    whatever the split.
    """
    if grad_accum < 1 or world_size < 1:
        raise ConfigError(f"token_level_normalizer: grad_accum and world_size must be >= 1, got "
                          f"{grad_accum} and {world_size}")
    return max(float(global_tokens), 1.0) / (grad_accum * world_size)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Zero the loss mask (N, T) of completions cut off by the length budget (``truncated`` (N,)).

    A completion that ran out of tokens before finishing has no reward for its real ending;
    masking it (DAPO's "overlong filtering") keeps that noise out of the gradient.
    """
    if truncated.shape != mask.shape[:1]:
        raise InputError(f"mask_truncated: truncated {tuple(truncated.shape)} does not match "
                         f"mask {tuple(mask.shape)}; expected (N,)")
    return mask * (~truncated.bool()).unsqueeze(1).to(mask.dtype)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def clip_ratio_metrics(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       epsilon_low: float = 0.2, epsilon_high: float | None = None
                       ) -> dict[str, float]:
    """Fraction of completion tokens whose update the clip switched off.

    ``low``: ratio below ``1 - eps_low`` with a negative advantage; ``high``: ratio above
    ``1 + eps_high`` with a positive one; ``region``: either. (A ratio out of range in the other
    direction is not clipped: ``min`` picks the unclipped term there.)
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)  # (N, 1)
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(ratio.dtype)  # (N, T)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(ratio.dtype)  # (N, T)
    mask = mask.to(ratio.dtype)
    return {
        "clip_ratio/low": float(masked_mean(low, mask)),
        "clip_ratio/high": float(masked_mean(high, mask)),
        "clip_ratio/region": float(masked_mean(torch.maximum(low, high), mask)),
    }


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the next-token distribution at every position: (..., V) -> (...).

    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v``.
    """
    logp = torch.log_softmax(logits, dim=-1)  # (..., V)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------------------------
# The whole policy loss
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GRPOLoss:
    loss: torch.Tensor
    per_token_loss: torch.Tensor
    metrics: dict[str, float]


def grpo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None,
                     advantages: torch.Tensor, mask: torch.Tensor, *,
                     ref_logps: torch.Tensor | None = None, beta: float = 0.0,
                     epsilon_low: float = 0.2, epsilon_high: float | None = None,
                     loss_type: str = "grpo", max_completion_length: int | None = None,
                     num_tokens: float | torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                     entropy_coef: float = 0.0) -> GRPOLoss:
    """Clipped surrogate + ``beta`` * k3 KL to the reference - ``entropy_coef`` * entropy,
    aggregated by ``loss_type``.

    ``logps`` (N, T): completion-token log-probs under the policy being trained (with gradient);
    ``old_logps``: the sampling policy's (None means "this very policy": one update per rollout
    batch, ratio 1); ``ref_logps``: the frozen reference's, needed when ``beta > 0``;
    ``entropy`` (N, T): the policy's entropy at each completion token (with gradient), needed when
    ``entropy_coef > 0``: the bonus keeps the policy from collapsing onto one answer too early
    (the entropy term of PPO's objective, Schulman et al. 2017, eq. 9, with the sign of a loss).
    """
    if beta < 0 or not math.isfinite(beta):
        raise ConfigError(f"grpo.beta: the KL coefficient must be >= 0, got {beta!r}")
    if beta > 0 and ref_logps is None:
        raise ConfigError("grpo.beta: beta > 0 needs reference log-probs (a frozen reference model)")
    if entropy_coef < 0 or not math.isfinite(entropy_coef):
        raise ConfigError(f"grpo.entropy_coef: the entropy bonus must be >= 0, got {entropy_coef!r}")
    if entropy_coef > 0 and entropy is None:
        raise ConfigError("grpo.entropy_coef: entropy_coef > 0 needs the policy's per-token entropy")
    old = logps.detach() if old_logps is None else old_logps
    per_token = clipped_surrogate(logps, old, advantages, epsilon_low, epsilon_high)  # (N, T)
    metrics = clip_ratio_metrics(importance_ratio(logps.detach(), old), advantages, mask,
                                 epsilon_low, epsilon_high)
    if beta > 0:
        kl = k3_kl(logps, ref_logps)  # (N, T)
        per_token = per_token + beta * kl
        metrics["kl"] = float(masked_mean(kl.detach(), mask.to(kl.dtype)))
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, num_tokens)
    return GRPOLoss(loss, per_token, metrics)
