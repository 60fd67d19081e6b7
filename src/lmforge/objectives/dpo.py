"""The DPO family as an objective on the one trainer: chosen and rejected in one forward pass,
a frozen reference, one of the preference losses.

A batch (from :func:`lmforge.objectives.logprobs.preference_collate`) holds B pairs as 2B rows,
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
  first step and cached in the run folder (no second model in memory during training);
* ``none``: reference-free losses (simpo, orpo).

``targets_in`` is the number of pairs, so the trainer's global normalisation makes a step's loss
the mean over every pair of the global batch however they fall into micro-batches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from lmforge.errors import ConfigError
from lmforge.model.lora import adapters_disabled, has_lora
from lmforge.objectives.base import Objective
from lmforge.objectives.logprobs import completion_logits, sequence_logprobs, split_chosen_rejected
from lmforge.objectives.preference_losses import LOSS_TYPES, REFERENCE_FREE, PairLogps, preference_loss

REFERENCES = ("auto", "copy", "precompute", "none")


@dataclass
class DPOOptions:
    """``objective:`` options of ``task: dpo``."""

    loss_type: str = "sigmoid"  # sigmoid (DPO), robust, hinge, ipo, simpo, orpo
    beta: float = 0.1  # strength of the implicit KL to the reference (simpo: reward scale)
    label_smoothing: float = 0.0  # cDPO / robust DPO: assumed rate of flipped labels
    gamma: float = 0.5  # simpo: target reward margin
    average_logps: bool = False  # average completion log-probs per token instead of summing
    reference: str = "auto"  # auto (copy, or none for simpo/orpo), copy, precompute, none
    format: str = "auto"  # record layout: auto, prompt, instruction (the book's), hh (HH-RLHF)
    prompt_field: str = "prompt"  # record field names (renamed to prompt/chosen/rejected)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_length: int | None = None  # prompt + completion tokens (null: the model's context length)
    max_prompt_length: int | None = None  # longer prompts keep their last tokens (null: no limit)
    add_eos: bool = True  # end each completion with the tokenizer's eos (scored too)
    skip_identical: bool = False  # drop pairs whose chosen == rejected instead of failing
    skip_empty: bool = False  # drop pairs with an empty completion instead of failing


def option_problems(o: DPOOptions) -> list[str]:
    """Every bad option, each one line naming its key."""
    p = []
    if o.loss_type not in LOSS_TYPES:
        p.append(f"objective.loss_type: got {o.loss_type!r}, expected one of {', '.join(LOSS_TYPES)}")
    if not o.beta > 0:
        p.append(f"objective.beta: got {o.beta}, expected a number > 0")
    upper_ok = o.label_smoothing < 0.5 if o.loss_type == "robust" else o.label_smoothing <= 0.5
    if not (0 <= o.label_smoothing and upper_ok):
        p.append(f"objective.label_smoothing: got {o.label_smoothing}, expected a number in [0, 0.5"
                 f"{')' if o.loss_type == 'robust' else ']'}")
    if o.label_smoothing and o.loss_type in ("hinge", "ipo", "orpo"):
        p.append(f"objective.label_smoothing: the {o.loss_type} loss has none; expected 0")
    if o.reference not in REFERENCES:
        p.append(f"objective.reference: got {o.reference!r}, expected one of {', '.join(REFERENCES)}")
    elif o.reference == "none" and o.loss_type not in REFERENCE_FREE:
        p.append(f"objective.reference: the {o.loss_type} loss needs a reference; none is only for "
                 f"{' and '.join(REFERENCE_FREE)}")
    if o.max_length is not None and o.max_length < 2:
        p.append(f"objective.max_length: got {o.max_length}, expected an integer >= 2 or null")
    if o.max_prompt_length is not None and o.max_prompt_length < 1:
        p.append(f"objective.max_prompt_length: got {o.max_prompt_length}, expected an integer >= 1 or null")
    if (o.max_length is not None and o.max_prompt_length is not None and o.max_prompt_length >= o.max_length):
        p.append(f"objective.max_prompt_length: {o.max_prompt_length} leaves no room for a completion within "
                 f"max_length {o.max_length}")
    return p


def reference_kind(o: DPOOptions) -> str:
    """``auto`` resolved: no reference for the reference-free losses, else a frozen copy."""
    if o.reference != "auto":
        return "none" if o.loss_type in REFERENCE_FREE else o.reference
    return "none" if o.loss_type in REFERENCE_FREE else "copy"


class DPO(Objective):
    name = "dpo"

    def __init__(self, options: DPOOptions, precompute: dict | None = None):
        """``precompute``: for ``reference: precompute``, ``{"batches": {split: callable giving
        batches}, "path": cache file}``: every pair's reference log-probs are computed once."""
        if problems := option_problems(options):
            raise ConfigError(problems)
        self.o = options
        self.kind = reference_kind(options)
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
            self.cached = precompute_reference(self, model, device, **self._precompute)

    def _pair_logps(self, model, batch: dict) -> PairLogps:
        # chosen and rejected rows (2B, T) in one pass (each prompt once when the batch has shared-prompt
        # rows); the LM head only where a completion token is predicted
        logps, counts = sequence_logprobs(None, batch["input_ids"], batch["completion_mask"],
                                          average=self.o.average_logps, model=model,
                                          logits_and_keep=completion_logits(model, batch))  # (2B,), (2B,)
        if self.o.average_logps:  # already per token: the losses must not divide again
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
        out = preference_loss(self.o.loss_type, policy, ref, beta=self.o.beta,
                              label_smoothing=self.o.label_smoothing, gamma=self.o.gamma)
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


@torch.no_grad()
def precompute_reference(objective: DPO, model, device, batches: dict, path: Path | None = None
                         ) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair of every split, ``{split: (N, 2)}``, in eval mode.

    Read from ``path`` when it holds a cache for the same splits and sizes (a resumed run must
    not score the pairs with the trained model), else computed with ``model`` and saved there.
    """
    sizes = {s: b["size"] for s, b in batches.items()}
    if path is not None and Path(path).is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if {s: int(t.shape[0]) for s, t in saved.items()} == sizes:
            return saved
    was_training = model.training
    model.eval()
    out = {}
    for split, spec in batches.items():
        table = torch.zeros(spec["size"], 2)
        for batch in spec["batches"]():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            lp = objective._pair_logps(model, batch)
            idx = batch["pair_index"].cpu()
            table[idx, 0], table[idx, 1] = lp.chosen.cpu(), lp.rejected.cpu()
        out[split] = table
    model.train(was_training)
    if path is not None:
        from lmforge.fsutil import atomic_write

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), lambda p: torch.save(out, p))
    return out
