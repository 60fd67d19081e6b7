"""The arithmetic of PPO for language models, as small tested functions.

PPO (Schulman et al. 2017) with a learned value function, in the layout InstructGPT and TRL use
for text: a completion is an episode whose actions are its tokens. The reward model's (here: the
reward functions') score arrives at the last completion token; every token also pays
``kl_coef`` times its KL to a frozen reference, so the policy is rewarded for the score and
charged for drifting from where it started. Advantages come from GAE(lambda) (Schulman et al.
2015) over those per-token rewards and the value network's estimates; the policy takes the
clipped surrogate, the value network a clipped squared error to the returns.

Layout: per-token tensors are (N, T) in the shifted frame of the log-probs (position ``t`` holds
what concerns the token at ``t + 1``: its log-prob, and the value of the state that predicts it),
with a ``mask`` (N, T) that is 1 on completion tokens (a contiguous run per row). Everything
here is pure arithmetic; the model forward, rollouts and rewards live elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError, InputError
from lmforge.objectives.grpo_math import importance_ratio, masked_mean

__all__ = ["KL_ESTIMATORS", "kl_penalty", "last_token_index", "token_rewards", "gae", "whiten",
           "clipped_policy_loss", "clipped_value_loss", "PPOLoss", "ppo_loss"]

KL_ESTIMATORS = ("k1", "k3")
WHITEN_EPS = 1e-8  # added to the variance before the square root (TRL, torchtune)


# ------------------------------------------------------------------------------ rewards
def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate at the sampled tokens (N, T).

    ``k1``: ``log pi - log pi_ref`` (InstructGPT, TRL's PPO default; unbiased, can be negative);
    ``k3``: ``exp(-d) + d - 1`` with ``d = log pi - log pi_ref`` (always >= 0, lower variance).
    """
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"kl_estimator: got {estimator!r}, expected one of {', '.join(KL_ESTIMATORS)}")
    d = logps - ref_logps  # (N, T)
    return d if estimator == "k1" else torch.exp(-d) + d - 1


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(N,) position of each row's last masked token (0 for a row with none)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)  # (N, T)
    return (pos * (mask > 0)).amax(dim=1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (N, T): ``-kl_coef * kl`` on every completion token, plus the sequence's
    score (N,) on its last one; 0 outside the mask."""
    if scores.shape != mask.shape[:1] or kl.shape != mask.shape:
        raise InputError(f"token_rewards: scores {tuple(scores.shape)}, kl {tuple(kl.shape)} and mask "
                         f"{tuple(mask.shape)} disagree; expected (N,), (N, T), (N, T)")
    mask = mask.to(kl.dtype)
    r = -kl_coef * kl * mask  # (N, T)
    return r.scatter_add(1, last_token_index(mask).unsqueeze(1), (scores.to(r.dtype) * (mask.sum(1) > 0)).unsqueeze(1))


# ------------------------------------------------------------------------------ advantages
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns, (N, T) each, 0 outside the mask.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``
    (Schulman et al. 2015, eq. 16), run backward over each completion; the state after the last
    token is terminal (``V = 0``). Returns are ``A_t + V_t``, the value network's targets.
    """
    if rewards.shape != values.shape or values.shape != mask.shape:
        raise InputError(f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} disagree; expected the same (N, T)")
    mask = mask.to(values.dtype)
    r, v = rewards * mask, values * mask  # outside the completion: no reward, no value (terminal)
    adv = torch.zeros_like(v)  # (N, T)
    running = torch.zeros_like(v[:, 0])  # (N,)
    for t in reversed(range(v.shape[1])):
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]  # (N,)
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + v) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries (unbiased variance), the mean
    added back unless ``shift_mean`` is False (TRL's and torchtune's advantage whitening keeps
    it); 0 outside the mask."""
    m = mask.to(x.dtype)
    n = m.sum()
    if n < 2:
        raise InputError(f"whiten: needs at least 2 masked values, got {int(n)}")
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if shift_mean:
        out = out + mean
    return out * m


# ------------------------------------------------------------------------------ losses
def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate as a loss (N, T): ``max(-A * ratio, -A * clip(ratio, 1-eps,
    1+eps))`` (Schulman et al. 2017, eq. 7, negated); and where the clipped term won (N, T) bool."""
    if not cliprange >= 0:
        raise ConfigError(f"cliprange: got {cliprange}, expected a number >= 0")
    ratio = importance_ratio(logps, old_logps)  # (N, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss (N, T): ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = old_V + clip(V - old_V, -c, c)`` (OpenAI baselines' PPO2); and where the clipped
    term won (N, T) bool."""
    if not cliprange_value >= 0:
        raise ConfigError(f"cliprange_value: got {cliprange_value}, expected a number >= 0")
    v_clip = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)  # (N, T)
    plain, clipped = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


@dataclass(frozen=True)
class PPOLoss:
    loss: torch.Tensor  # policy + vf_coef * value, a token mean
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    metrics: dict[str, float]


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.1) -> PPOLoss:
    """The PPO loss of one batch, a mean over its completion tokens: clipped policy loss +
    ``vf_coef`` * clipped value loss. ``logps``/``values`` carry gradients; ``old_*`` are the
    rollout's (no gradient), ``advantages``/``returns`` from :func:`gae` (advantages whitened)."""
    shapes = {tuple(t.shape) for t in (logps, old_logps, values, old_values, advantages, returns, mask)}
    if len(shapes) != 1:
        raise InputError(f"ppo_loss: per-token tensors have shapes {sorted(shapes)}; expected one (N, T)")
    m = mask.to(logps.dtype)
    pg, pg_clipped = clipped_policy_loss(logps, old_logps, advantages, cliprange)
    vf, vf_clipped = clipped_value_loss(values, old_values, returns, cliprange_value)
    policy, value = masked_mean(pg, m), masked_mean(vf, m)
    with torch.no_grad():
        d = logps - old_logps
        metrics = {"policy_loss": float(policy), "value_loss": float(value),
                   "clipfrac": float(masked_mean(pg_clipped.to(m.dtype), m)),
                   "value_clipfrac": float(masked_mean(vf_clipped.to(m.dtype), m)),
                   "approx_kl": float(masked_mean(0.5 * d * d, m)),
                   "ratio": float(masked_mean(torch.exp(d), m))}
    return PPOLoss(policy + vf_coef * value, policy, value, metrics)
