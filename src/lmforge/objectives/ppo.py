"""PPO with a value model as an objective on the one trainer (InstructGPT / TRL layout).

The model the trainer trains is the policy (a causal decoder) with its value model attached as a
submodule (:func:`lmforge.model.heads.attach_value_model`): ``shared`` (a value head on the
policy's hidden states) or ``separate`` (a critic: a copy of the initial model with a value
head). Both are trained by the trainer's one optimizer and saved in its checkpoints.

Per rollout batch, the task's batch source (``lmforge.tasks.ppo.PPORollouts``) samples one
completion per prompt from the policy, scores it with the reward functions, and calls
:meth:`PPO.score` (no gradient) for the rollout's log-probs, the reference's log-probs and the
values; then::

    kl       = log pi_old - log pi_ref                       (N, T) per completion token
    rewards  = -kl_coef * kl,  + score at the last token     (N, T)
    A, R     = GAE(rewards, values; gamma, lam)               advantages whitened over the batch
    loss     = clipped policy loss(logps, old_logps, A)  + vf_coef * clipped value loss(V, old_V, R)

averaged over completion tokens (``targets_in`` counts them, so the trainer's global
normalisation makes it a token mean over the whole step). ``ppo_epochs`` > 1 reuses one
rollout batch for that many optimizer steps (the batch source keeps it), where the ratio and the
value clip start to bite.
"""

from __future__ import annotations

import copy

import torch

from lmforge.errors import ConfigError
from lmforge.model.heads import captured_hidden_states, value_model_of, values_of
from lmforge.model.lora import adapters_disabled, has_lora
from lmforge.objectives.base import Objective
from lmforge.objectives.logprobs import batch_completion_logprobs
from lmforge.objectives.ppo_math import gae, kl_penalty, ppo_loss, token_rewards, whiten


def _unwrap(model):
    """The module under DDP / torch.compile wrappers (the value model is an attribute of it)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class PPO(Objective):
    name = "ppo"

    def __init__(self, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
                 kl_coef: float = 0.05, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                 whiten_advantages: bool = True):
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.kl_coef, self.kl_estimator, self.gamma, self.lam = kl_coef, kl_estimator, gamma, lam
        self.whiten_advantages = whiten_advantages
        self.policy = None  # the model being trained (set in setup); rollouts are sampled from it
        self.reference = None  # a frozen copy, "adapters" (LoRA: the base with adapters off), or None

    def setup(self, model, device: torch.device) -> None:
        if value_model_of(_unwrap(model)) is None:
            raise ConfigError("task ppo: the model has no value model; expected one attached by the task")
        self.policy = model
        if self.kl_coef > 0:
            if has_lora(model):
                self.reference = "adapters"
            else:  # the policy alone, without its value model
                policy = _unwrap(model)
                held = {k: policy._modules.pop(k) for k in ("value_head", "critic") if k in policy._modules}
                try:
                    self.reference = copy.deepcopy(policy).eval()
                finally:
                    policy._modules.update(held)
                self.reference.__dict__.pop("value_model", None)
                self.reference.requires_grad_(False)

    @torch.no_grad()
    def _ref_logps(self, batch: dict) -> torch.Tensor:
        if self.reference == "adapters":
            was = self.policy.training
            self.policy.eval()
            with adapters_disabled(self.policy):
                logp, _ = batch_completion_logprobs(self.policy, batch)
            self.policy.train(was)
            return logp
        return batch_completion_logprobs(self.reference, batch)[0]  # (N, T-1)

    @staticmethod
    def logps_and_values(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Completion-token log-probs, their mask and the value model's estimates, (N, T-1) each,
        the values in the log-probs' frame (position t: the state that predicts token t+1). A
        shared value head reads the hidden states of the policy's own forward pass (one trunk
        pass for both); a separate critic runs its own trunk."""
        inner = _unwrap(model)
        if value_model_of(inner) == "shared":
            with captured_hidden_states(inner) as got:
                logps, mask = batch_completion_logprobs(model, batch)
            values = inner.value_head(got["hidden"])  # (N, T)
        else:
            logps, mask = batch_completion_logprobs(model, batch)
            values = values_of(inner, batch["input_ids"])  # (N, T)
        return logps.float(), mask.float(), values[:, :-1].float()

    @torch.no_grad()
    def score(self, batch: dict, scores: torch.Tensor) -> dict:
        """The rollout's fixed tensors, (N, T-1) each: ``old_logps``, ``old_values``, per-token
        ``rewards`` (score at the last token, KL penalty on each), GAE ``advantages`` (whitened)
        and ``returns``; and their statistics."""
        mask = batch["completion_mask"][:, 1:].float()  # (N, T-1)
        was = self.policy.training
        self.policy.eval()  # no dropout in the rollout's numbers
        try:
            old_logps, _, old_values = self.logps_and_values(self.policy, batch)
            old_values = old_values * mask
        finally:
            self.policy.train(was)
        if self.kl_coef > 0:
            kl = kl_penalty(old_logps, self._ref_logps(batch).float(), self.kl_estimator) * mask
        else:
            kl = torch.zeros_like(old_logps)
        rewards = token_rewards(scores.float(), kl, mask, self.kl_coef)
        adv, returns = gae(rewards, old_values, mask, self.gamma, self.lam)
        if self.whiten_advantages and mask.sum() > 1:
            adv = whiten(adv, mask)
        per_seq_kl = (kl * mask).sum(1)  # (N,)
        stats = {"kl": float(per_seq_kl.mean()), "non_score_reward": float(-self.kl_coef * per_seq_kl.mean()),
                 "value_mean": float((old_values * mask).sum() / mask.sum().clamp(min=1)),
                 "returns_mean": float((returns * mask).sum() / mask.sum().clamp(min=1))}
        return {"old_logps": old_logps, "old_values": old_values, "rewards": rewards, "advantages": adv,
                "returns": returns, "stats": stats}

    def loss(self, model, batch: dict):
        logps, mask, values = self.logps_and_values(model, batch)  # (N, T-1) each
        out = ppo_loss(logps, batch["old_logps"], values, batch["old_values"], batch["advantages"],
                       batch["returns"], mask, cliprange=self.cliprange,
                       cliprange_value=self.cliprange_value, vf_coef=self.vf_coef)
        return out.loss, {**batch.get("stats", {}), **out.metrics}

    def targets_in(self, batch: dict) -> float:
        return float(batch["completion_mask"][:, 1:].sum())  # completion tokens: the loss is their mean

    def tokens_in(self, batch: dict) -> int:
        cmask = batch["completion_mask"]  # (N, T) right-padded prompt + completion rows
        return int(cmask.sum() + cmask.argmax(1).sum())  # completions + prompts (argmax: a prompt's length)
