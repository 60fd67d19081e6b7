"""The DPO family as an objective on the one trainer: chosen and rejected in one forward pass,
a frozen reference, one of the preference losses.

A batch (from :func:`lmforge.tasks.dpo.preference_collate`) holds B pairs as 2B rows,
chosen first; prompt and padding are 0 in ``completion_mask``. Per micro-batch::

    policy logits   = model(input_ids)                        (2B, T, V), one forward pass
    policy logps    = completion log-probs, summed per row    (2B,) -> chosen (B,), rejected (B,)
    reference logps = the same under the reference, no grad   (B,), (B,)
    loss            = preference_loss(loss_type, policy, reference)   mean over the B pairs

The reference model, held here, is one of:

* ``copy``: a frozen deep copy of the model as it is when training starts (the SFT or pretrained
  checkpoint of ``model.init_from``), built in :meth:`DPO.setup`;
* the model itself with its adapters switched off (``lmforge.model.lora.adapters_disabled``), when
  it has LoRA adapters (a LoRA model: the frozen base *is* the reference, so no copy is made);
* ``precompute``: the reference log-probs of every pair, computed once in eval mode before the
  first step by a function the task gives (``lmforge.tasks.dpo`` caches them in the run folder),
  so no second model is in memory during training;
* ``none``: reference-free losses (simpo, orpo).

``targets_in`` is the number of pairs, so the trainer's global normalisation makes a step's loss
the mean over every pair of the global batch however they fall into micro-batches.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

from lmforge.errors import ConfigError
from lmforge.model.lora import adapters_disabled, has_lora
from lmforge.objectives.base import Objective
from lmforge.objectives.logprobs import completion_logits, sequence_logprobs, split_chosen_rejected
from lmforge.objectives.preference_losses import LOSS_TYPES, PairLogps, preference_loss

class DPO(Objective):
    name = "dpo"

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 gamma: float = 0.5, average_logps: bool = False, reference: str = "copy",
                 precompute: Callable | None = None):
        """``reference``: copy, precompute or none (see the module doc). ``precompute``: for
        ``reference="precompute"``, a function ``(objective, model, device) -> {split: (N, 2)}``
        giving every pair's reference log-probs (chosen, rejected), called once in ``setup``."""
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type: got {loss_type!r}, expected one of {', '.join(LOSS_TYPES)}")
        if reference not in ("copy", "precompute", "none"):
            raise ConfigError(f"reference: got {reference!r}, expected copy, precompute or none")
        self.loss_type, self.beta, self.label_smoothing, self.gamma = loss_type, beta, label_smoothing, gamma
        self.average_logps = average_logps
        self.kind = reference
        self.reference = None  # a frozen model ("copy"), or the policy itself ("adapters")
        self.cached: dict[str, torch.Tensor] = {}  # "precompute": split -> (N, 2) [chosen, rejected]
        self._precompute = precompute

    # ------------------------------------------------------------------------------ reference
    def setup(self, model, device: torch.device) -> None:
        """Build the reference once, from the model as it is before the first step."""
        if self.kind == "copy":
            if has_lora(model):  # LoRA: the frozen base (adapters off) is the reference, no copy
                self.kind = "adapters"
                self.reference = model
            else:
                self.reference = copy.deepcopy(model).eval()
                self.reference.requires_grad_(False)
        elif self.kind == "precompute":
            if self._precompute is None:
                raise ConfigError("objective.reference: precompute needs the task's batches to score")
            self.cached = self._precompute(self, model, device)

    def _pair_logps(self, model, batch: dict) -> PairLogps:
        # chosen and rejected rows (2B, T) in one pass (each prompt once when the batch has shared-prompt
        # rows); the LM head only where a completion token is predicted
        logps, counts = sequence_logprobs(None, batch["input_ids"], batch["completion_mask"],
                                          average=self.average_logps, model=model,
                                          logits_and_keep=completion_logits(model, batch))  # (2B,), (2B,)
        if self.average_logps:  # already per token: the losses must not divide again
            counts = torch.ones_like(counts)
        (c, r), (nc, nr) = split_chosen_rejected(logps), split_chosen_rejected(counts)
        return PairLogps(c.float(), r.float(), nc.float(), nr.float())

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> PairLogps | None:
        if self.kind == "none":
            return None
        if self.kind == "precompute":
            rows = self.cached[batch["split"]][batch["pair_index"].cpu()].to(batch["input_ids"].device)  # (B, 2)
            ones = torch.ones_like(rows[:, 0])
            return PairLogps(rows[:, 0], rows[:, 1], ones, ones)  # token counts only feed ipo: the policy's
        if self.kind == "adapters":
            was = self.reference.training
            self.reference.eval()
            with adapters_disabled(self.reference):
                out = self._pair_logps(self.reference, batch)
            self.reference.train(was)
            return out
        return self._pair_logps(self.reference, batch)

    # ------------------------------------------------------------------------------ loss
    def loss(self, model, batch: dict):
        policy = self._pair_logps(model, batch)
        ref = self.reference_logps(batch)
        if ref is not None and self.kind == "precompute":
            ref = PairLogps(ref.chosen, ref.rejected, policy.chosen_tokens, policy.rejected_tokens)
        out = preference_loss(self.loss_type, policy, ref, beta=self.beta, label_smoothing=self.label_smoothing,
                              gamma=self.gamma)
        return out.loss, out.metrics()

    def targets_in(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0] // 2)  # pairs

    def tokens_in(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict]) -> dict[str, float]:
        """Pair-weighted means of the loss and every preference metric over ``batches``."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        pairs = 0
        for batch in batches:
            loss, metrics = self.loss(model, batch)
            n = self.targets_in(batch)
            for k, v in {"loss": float(loss), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v * n
            pairs += n
        model.train(was_training)
        return {k: v / pairs for k, v in sums.items()} if pairs else {}
