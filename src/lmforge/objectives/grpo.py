"""GRPO as an objective on the one trainer: rollouts come from the batch source, the loss is the
group-relative clipped surrogate of :mod:`lmforge.objectives.grpo_math`.

Per optimizer step and micro-batch, the task's batch source (``lmforge.tasks.grpo.RolloutBatches``) takes this rank's prompts of the
step (the step sampler: a pure function of (seed, step)), samples K completions per prompt with
lmforge's KV-cache generation from the current policy (seeded from (seed, step, micro, rank), so
a resumed run draws exactly the completions a straight run drew), scores them with the reward
functions and turns the rewards into group-relative advantages. The batch it returns holds the
prompt+completion rows, their completion mask and advantages (and, with ``num_iterations`` > 1,
the sampling policy's log-probs); :class:`GRPO` then computes::

    logps   = log pi_theta(completion tokens)              (N, T-1), with gradient
    loss    = clipped surrogate(logps, old_logps, advantages)  [+ beta * k3 KL to the reference]
    reduced by loss_type: grpo (mean of per-completion means), dr_grpo, dapo (token mean)

With one update per rollout batch (``num_iterations: 1``, the default) the sampling policy is
the policy being updated: ``old_logps = logps.detach()``, the importance ratio is exactly 1,
nothing is clipped, and the gradient is the policy gradient with the group mean as baseline
(REINFORCE with a group baseline, optionally scaled by the group's reward std).

With ``num_iterations: mu > 1`` each rollout batch serves mu optimizer steps in a row (steps
``g*mu .. g*mu+mu-1`` share the prompts and completions of rollout group ``g``); ``old_logps`` are
the sampling policy's, computed once when the rollouts are drawn, so from the second update on
the ratio moves away from 1 and the clip (epsilon_low / epsilon_high) bounds each update (the
task keeps each group's rollouts, in the run folder too, so a resumed run reuses them).

``targets_in`` counts what the aggregation averages over (completions for grpo/dr_grpo,
completion tokens for dapo), so the trainer's global normalisation makes dapo a token mean over
the whole global batch, whatever the micro-batching or number of ranks.
"""

from __future__ import annotations

import copy

import torch

from lmforge.errors import ConfigError
from lmforge.model.lora import adapters_disabled, has_lora
from lmforge.model.packed import packed_linears
from lmforge.objectives.base import Objective
from lmforge.objectives.grpo_math import LOSS_AGGREGATIONS, entropy_from_logits, grpo_policy_loss, mask_truncated
from lmforge.objectives.logprobs import batch_completion_logprobs, completion_logits, model_completion_logprobs


# ------------------------------------------------------------------------------ objective
class GRPO(Objective):
    name = "grpo"

    def __init__(self, loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, max_completion_length: int | None = None, mask_truncated: bool = False,
                 entropy_coef: float = 0.0):
        """The clipped surrogate of :func:`~lmforge.objectives.grpo_math.grpo_policy_loss` with
        these settings; ``beta`` > 0 adds the k3 KL to a frozen reference (built in ``setup``),
        ``entropy_coef`` > 0 an entropy bonus on the completion tokens."""
        if loss_type not in LOSS_AGGREGATIONS:
            raise ConfigError(f"loss_type: got {loss_type!r}, expected one of {', '.join(LOSS_AGGREGATIONS)}")
        self.loss_type, self.epsilon_low, self.epsilon_high = loss_type, epsilon_low, epsilon_high
        self.beta, self.max_completion_length, self.mask_truncated = beta, max_completion_length, mask_truncated
        self.entropy_coef = entropy_coef
        self.policy = None  # the model being trained (set in setup); the rollouts are sampled from it
        self.reference = None

    def setup(self, model, device: torch.device) -> None:
        self.policy = model
        if self.beta > 0:
            if has_lora(model):  # the base with its adapters off: no copy
                self.reference = "adapters"
            else:
                self.reference = copy.deepcopy(model).eval()
                self.reference.requires_grad_(False)

    @torch.no_grad()
    def _ref_logps(self, batch: dict) -> torch.Tensor:
        if self.reference == "adapters":
            was = self.policy.training
            self.policy.eval()
            with adapters_disabled(self.policy):
                logp, _ = batch_completion_logprobs(self.policy, batch)
            self.policy.train(was)
        else:
            logp, _ = batch_completion_logprobs(self.reference, batch)
        return logp  # (N, T-1)

    def _mask(self, batch: dict) -> torch.Tensor:
        mask = batch["completion_mask"][:, 1:].float()  # (N, T-1) aligned with the shifted log-probs
        if self.mask_truncated:
            mask = mask_truncated(mask, batch["truncated"])
        return mask

    def loss(self, model, batch: dict):
        ids, cmask = batch["input_ids"], batch["completion_mask"]
        # the LM head runs only where a completion token is predicted (prompts and padding skip it);
        # frozen linears (a LoRA base) run forward from the packed weights the rollouts already hold
        with packed_linears(model, train_frozen=True):
            logits, keep = completion_logits(model, batch)  # (M, V), (N, T-1)
        logps, _ = model_completion_logprobs(model, ids, cmask, (logits, keep))  # (N, T-1)
        mask = self._mask(batch)
        ref = self._ref_logps(batch) if self.beta > 0 else None
        # the policy's entropy where a completion token is predicted (M,): with its gradient only for the bonus
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.entropy_coef > 0):
            ent = entropy_from_logits(logits.float())
        per_token_ent = None
        if self.entropy_coef > 0:  # laid out as the log-probs (N, T-1)
            per_token_ent = torch.zeros(keep.shape, dtype=ent.dtype, device=ent.device).masked_scatter(keep, ent)
        out = grpo_policy_loss(logps, batch.get("old_logps"), batch["advantages"], mask, ref_logps=ref,
                               beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                               loss_type=self.loss_type, max_completion_length=self.max_completion_length,
                               entropy=per_token_ent, entropy_coef=self.entropy_coef)
        with torch.no_grad():
            entropy = float((ent.detach() * mask[keep]).sum() / mask.sum().clamp(min=1))
        return out.loss, {**batch.get("stats", {}), **out.metrics, "entropy": entropy}

    def targets_in(self, batch: dict) -> float:
        if self.loss_type == "dapo":
            return float(self._mask(batch).sum())
        return int(batch["input_ids"].shape[0])  # completions

    def tokens_in(self, batch: dict) -> int:
        """Tokens the policy's forward pass runs (throughput, MFU): no padding, and with shared
        prompts each prompt once per group (counting it K times gave an MFU above 100%)."""
        if "shared_segment_ids" in batch:
            return int((batch["shared_segment_ids"] != 0).sum())  # 0 marks padding
        cmask = batch["completion_mask"]  # (N, T) right-padded prompt + completion rows
        return int(cmask.sum() + cmask.argmax(1).sum())  # completions + prompts (argmax: a prompt's length)
