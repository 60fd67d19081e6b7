"""GRPO as an objective on the one trainer: rollouts come from the batch source, the loss is the
group-relative clipped surrogate of :mod:`lmforge.objectives.grpo_math`.

Per optimizer step and micro-batch, :class:`RolloutBatches` takes this rank's prompts of the
step (the step sampler: a pure function of (seed, step)), samples K completions per prompt with
lmforge's KV-cache generation from the current policy (seeded from (seed, step, micro, rank), so
a resumed run draws exactly the completions a straight run drew), scores them with the reward
functions and turns the rewards into group-relative advantages. The batch it returns holds the
prompt+completion rows, their completion mask and advantages; :class:`GRPO` then computes::

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
the ratio moves away from 1 and the clip (epsilon_low / epsilon_high) bounds each update. The
rollouts of the current group are also saved in the run folder (``rollouts_rank{r}.pt``), so a
run resumed in the middle of a group reuses them (exact resume).

``targets_in`` counts what the aggregation averages over (completions for grpo/dr_grpo,
completion tokens for dapo), so the trainer's global normalisation makes dapo a token mean over
the whole global batch, whatever the micro-batching or number of ranks.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from lmforge.data.sampler import StepSampler
from lmforge.errors import ConfigError
from lmforge.generate import SamplingConfig, generate
from lmforge.model.lora import adapters_disabled, has_lora
from lmforge.model.packed import packed_linears
from lmforge.objectives.base import Objective
from lmforge.objectives.grpo_math import (LOSS_AGGREGATIONS, SCALE_REWARDS, entropy_from_logits, group_advantages,
                                          grpo_policy_loss, mask_truncated)
from lmforge.objectives.logprobs import (batch_completion_logprobs, completion_logits, model_completion_logprobs,
                                         shared_prompt_rows)
from lmforge.objectives.rewards import RewardSet, exact_match


@dataclass
class GRPOOptions:
    """``objective:`` options of ``task: grpo``."""

    num_generations: int = 4  # K completions per prompt (a group)
    max_completion_length: int = 16  # new tokens per completion
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)  # stop strings end a completion early
    rewards: Any = field(default_factory=lambda: ["exact_match"])  # names / module:function / {name, weight, ...}
    scale_rewards: str = "group"  # group (divide by the group std) or none (Dr. GRPO)
    loss_type: str = "grpo"  # grpo, dr_grpo, dapo
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # null: epsilon_low
    beta: float = 0.0  # KL to a frozen reference (k3); 0: no reference model
    num_iterations: int = 1  # optimizer steps per rollout batch (1: ratio 1; > 1: clipped ratio to the sampler)
    min_completion_length: int = 0  # rollouts cannot end (eos) before this many tokens
    shared_prompt: bool = True  # the loss runs each prompt once, its K completions packed after it
    mask_truncated: bool = False  # no loss on completions cut off by max_completion_length
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    template: str = "none"  # none: the prompt text as it is; chat: one user turn in the model's chat template
    system_prompt: str | None = None  # template chat: a system turn first
    format: str = "auto"  # auto, gsm8k, fields
    eval_pass_k: int = 0  # > 1: also pass@k with sampling on the held-out prompts
    sample_completions: int = 4  # held-out completions written to samples.jsonl at each evaluation


def option_problems(o: GRPOOptions) -> list[str]:
    p = []
    if o.num_generations < 2:
        p.append(f"objective.num_generations: got {o.num_generations}, expected K >= 2 (a group baseline needs two)")
    if o.max_completion_length < 1:
        p.append(f"objective.max_completion_length: got {o.max_completion_length}, expected an integer >= 1")
    if o.temperature <= 0:
        p.append(f"objective.temperature: got {o.temperature}, expected a number > 0 (rollouts are sampled)")
    if o.scale_rewards not in SCALE_REWARDS:
        p.append(f"objective.scale_rewards: got {o.scale_rewards!r}, expected one of {', '.join(SCALE_REWARDS)}")
    if o.loss_type not in LOSS_AGGREGATIONS:
        p.append(f"objective.loss_type: got {o.loss_type!r}, expected one of {', '.join(LOSS_AGGREGATIONS)}")
    if o.epsilon_low < 0 or (o.epsilon_high is not None and o.epsilon_high < 0):
        p.append(f"objective.epsilon_low/epsilon_high: got {o.epsilon_low}/{o.epsilon_high}, expected numbers >= 0")
    if o.beta < 0:
        p.append(f"objective.beta: got {o.beta}, expected a number >= 0 (0: no KL term)")
    if not (isinstance(o.num_iterations, int) and o.num_iterations >= 1):
        p.append(f"objective.num_iterations: got {o.num_iterations!r}, expected an integer >= 1 (optimizer steps "
                 f"per rollout batch)")
    if not (isinstance(o.min_completion_length, int) and 0 <= o.min_completion_length <= o.max_completion_length):
        p.append(f"objective.min_completion_length: got {o.min_completion_length!r}, expected an integer from 0 to "
                 f"max_completion_length ({o.max_completion_length})")
    if o.eval_pass_k < 0 or o.eval_pass_k == 1:
        p.append(f"objective.eval_pass_k: got {o.eval_pass_k}, expected 0 (off) or k >= 2")
    if o.template not in ("none", "chat"):
        p.append(f"objective.template: got {o.template!r}, expected none (the prompt as it is) or chat (the "
                 f"model's chat template)")
    if o.system_prompt is not None and o.template != "chat":
        p.append("objective.system_prompt: only used with objective.template: chat")
    if o.format not in ("auto", "gsm8k", "fields"):
        p.append(f"objective.format: got {o.format!r}, expected auto, gsm8k or fields")
    return p


# ------------------------------------------------------------------------------ rollouts
def sampling(o: GRPOOptions, eos_id, seed: int | None, greedy: bool = False) -> SamplingConfig:
    """Rollout sampling (``greedy``: the evaluation's, without the minimum length)."""
    return SamplingConfig(max_new_tokens=o.max_completion_length, temperature=0.0 if greedy else o.temperature,
                          top_k=o.top_k, top_p=o.top_p, seed=seed, stop=tuple(o.stop), eos_id=eos_id,
                          min_new_tokens=0 if greedy else o.min_completion_length)


def rollout_rows(prompts: list[list[int]], completions: list[list[int]], finished: list[bool], eos_id,
                 pad: int) -> dict:
    """Right-padded prompt+completion rows (N, T) with a mask on the completion tokens; a
    completion that ended with eos is scored on its eos too (the policy learns to stop)."""
    rows = []
    for p, c, done in zip(prompts, completions, finished):
        c = c + ([eos_id] if done and eos_id is not None else [])
        rows.append((p, c))
    width = max(len(p) + max(len(c), 1) for p, c in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (N, T)
    cmask = torch.zeros(len(rows), width, dtype=torch.long)  # (N, T)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        cmask[i, len(p):len(p) + len(c)] = 1
    return {"input_ids": ids, "completion_mask": cmask}


class RolloutBatches:
    """The GRPO batch source: this rank's prompts of each (step, micro-step), K sampled
    completions each from the current policy, their rewards and group advantages."""

    def __init__(self, records: list[dict], tokenizer, objective: "GRPO", sampler: StepSampler, seed: int,
                 rank: int = 0):
        self.records, self.tok, self.objective, self.sampler = records, tokenizer, objective, sampler
        self.seed, self.rank = seed, rank
        self.prompt_ids = [tokenizer.encode(r["prompt"]) for r in records]
        self._step, self._global = None, None
        self._cache: dict[tuple[int, int], dict] = {}  # (group, micro) -> rollouts, num_iterations > 1

    def rollout_seed(self, step: int, micro: int) -> int:
        return (self.seed * 1_000_003 + step) * 4099 + micro * 257 + self.rank

    def batch(self, step: int, micro: int) -> dict:
        """The rollouts of optimizer step ``step``: drawn afresh, or with ``num_iterations`` mu > 1
        the ones of rollout group ``step // mu`` (drawn at its first step, kept until it ends)."""
        mu = self.objective.o.num_iterations
        if mu == 1:
            return {**self.rollouts(step, micro), "step": step}
        group = step // mu
        if any(g != group for g, _ in self._cache):
            self._cache = {}  # a new group: the old rollouts are done with
        if (group, micro) not in self._cache and step % mu:  # resumed in the middle of a group
            self._cache.update(self._load(group))
        if (group, micro) not in self._cache:
            self._cache[(group, micro)] = self.rollouts(group, micro)
            self._save(group)
        return {**self._cache[(group, micro)], "step": step}

    @property
    def _cache_path(self) -> Path | None:
        run_dir = self.objective.run_dir
        return None if run_dir is None else Path(run_dir) / f"rollouts_rank{self.rank}.pt"

    def _save(self, group: int) -> None:
        if (path := self._cache_path) is None:
            return
        from lmforge.fsutil import atomic_write

        data = {"group": group, "batches": {m: b for (_, m), b in self._cache.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: torch.save(data, p))

    def _load(self, group: int) -> dict:
        path = self._cache_path
        if path is None or not path.is_file():
            return {}
        data = torch.load(path, map_location="cpu", weights_only=True)
        return {(group, m): b for m, b in data["batches"].items()} if data["group"] == group else {}

    def rollouts(self, step: int, micro: int) -> dict:
        """K completions per prompt of (step, micro) from the current policy, scored: the rows,
        their completion mask, advantages, stats and (``num_iterations`` > 1) the sampler's log-probs."""
        if self._step != step:
            self._global, self._step = self.sampler.global_indices(step), step
        idx = self._global[self.sampler.slice_of(micro, self.rank)].tolist()
        o, K = self.objective.o, self.objective.o.num_generations
        model = self.objective.policy
        prompts = [self.prompt_ids[i] for i in idx for _ in range(K)]  # (B*K) rows, groups of K
        eos = self.tok.eos_id
        outs = generate(model, prompts, sampling(o, eos, self.rollout_seed(step, micro)), tokenizer=self.tok)
        truncated = [len(c) >= o.max_completion_length for c in outs]
        finished = [not t and not o.stop for t in truncated]
        texts = [self.tok.decode(c) for c in outs]
        recs = [self.records[i] for i in idx for _ in range(K)]
        total, per = self.objective.rewards([r["prompt"] for r in recs], texts, [r["answer"] for r in recs],
                                            [len(c) for c in outs])
        adv = group_advantages(total, K, o.scale_rewards)
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        batch = rollout_rows(prompts, outs, finished, eos, pad)
        if o.shared_prompt:  # one row per prompt, its K completions after it
            groups = [range(g * K, (g + 1) * K) for g in range(len(idx))]
            batch.update(shared_prompt_rows(batch["input_ids"], batch["completion_mask"], groups, pad))
        batch["advantages"] = adv.advantages  # (N,)
        batch["truncated"] = torch.tensor(truncated)  # (N,)
        if o.num_iterations > 1:  # the sampling policy's log-probs, for the ratio of the later updates
            with torch.no_grad():
                batch["old_logps"] = batch_completion_logprobs(model, batch)[0]  # (N, T-1)
        lengths = torch.tensor([len(c) for c in outs], dtype=torch.float32)
        stats = {"reward": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
                 "frac_zero_std": adv.frac_zero_std, "completion_length": float(lengths.mean()),
                 "completion_length_max": float(lengths.max()), "truncated": float(sum(truncated) / len(outs))}
        for name, r in per.items():
            stats[f"rewards/{name}"] = float(r.mean())
            stats[f"rewards/{name}_std"] = float(r.std()) if len(r) > 1 else 0.0
        if "exact_match" not in per:
            stats["accuracy"] = float(torch.tensor(exact_match(texts, [r["answer"] for r in recs])).mean())
        else:
            stats["accuracy"] = stats["rewards/exact_match"]
        batch["stats"] = stats
        return batch


# ------------------------------------------------------------------------------ objective
class GRPO(Objective):
    name = "grpo"

    def __init__(self, options: GRPOOptions, rewards: RewardSet, tokenizer, run_dir: Path | None = None,
                 is_main: bool = True):
        if problems := option_problems(options):
            raise ConfigError(problems)
        self.o, self.rewards, self.tok = options, rewards, tokenizer
        self.run_dir, self.is_main = run_dir, is_main
        self.policy = None  # the model rollouts are sampled from (set in setup)
        self.reference = None
        self.last_step = 0  # the trainer's step after the newest training batch (names evaluation samples)

    def setup(self, model, device: torch.device) -> None:
        self.policy = model
        if self.o.beta > 0:
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
        if self.o.mask_truncated:
            mask = mask_truncated(mask, batch["truncated"])
        return mask

    def loss(self, model, batch: dict):
        if "step" in batch:
            self.last_step = int(batch["step"]) + 1
        ids, cmask = batch["input_ids"], batch["completion_mask"]
        # the LM head runs only where a completion token is predicted (prompts and padding skip it);
        # frozen linears (a LoRA base) run forward from the packed weights the rollouts already hold
        with packed_linears(model, train_frozen=True):
            logits, keep = completion_logits(model, batch)  # (M, V), (N, T-1)
        logps, _ = model_completion_logprobs(model, ids, cmask, (logits, keep))  # (N, T-1)
        mask = self._mask(batch)
        ref = self._ref_logps(batch) if self.o.beta > 0 else None
        out = grpo_policy_loss(logps, batch.get("old_logps"), batch["advantages"], mask, ref_logps=ref,
                               beta=self.o.beta, epsilon_low=self.o.epsilon_low, epsilon_high=self.o.epsilon_high,
                               loss_type=self.o.loss_type, max_completion_length=self.o.max_completion_length)
        with torch.no_grad():
            ent = entropy_from_logits(logits.detach().float())  # (M,)
            entropy = float((ent * mask[keep]).sum() / mask.sum().clamp(min=1))
        return out.loss, {**batch.get("stats", {}), **out.metrics, "entropy": entropy}

    def targets_in(self, batch: dict) -> float:
        if self.o.loss_type == "dapo":
            return float(self._mask(batch).sum())
        return int(batch["input_ids"].shape[0])  # completions

    def tokens_in(self, batch: dict) -> int:
        """Tokens the policy's forward pass runs (throughput, MFU): no padding, and with shared
        prompts each prompt once per group (counting it K times gave an MFU above 100%)."""
        if "shared_segment_ids" in batch:
            return int((batch["shared_segment_ids"] != 0).sum())  # 0 marks padding
        cmask = batch["completion_mask"]  # (N, T) right-padded prompt + completion rows
        return int(cmask.sum() + cmask.argmax(1).sum())  # completions + prompts (argmax: a prompt's length)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict]) -> dict[str, float]:
        """Greedy exact match (and pass@k with sampling) on held-out prompts; a few completions
        are appended to ``samples.jsonl`` in the run folder."""
        o, eos = self.o, self.tok.eos_id
        correct, n, lengths, passed, samples = 0.0, 0, 0.0, 0.0, []
        for b in batches:
            texts = [self.tok.decode(c) for c in generate(model, b["prompt_ids"], sampling(o, eos, None, greedy=True),
                                                          tokenizer=self.tok)]
            hits = exact_match(texts, b["answers"])
            correct += sum(hits)
            n += len(hits)
            lengths += sum(len(self.tok.encode(t)) for t in texts)
            for p, t, a, h in zip(b["prompts"], texts, b["answers"], hits):
                if len(samples) < o.sample_completions:
                    samples.append({"prompt": p, "completion": t, "answer": a, "correct": bool(h)})
            if o.eval_pass_k > 1:
                k = o.eval_pass_k
                rows = [p for p in b["prompt_ids"] for _ in range(k)]
                outs = generate(model, rows, sampling(o, eos, 12345 + n), tokenizer=self.tok)
                hit = exact_match([self.tok.decode(c) for c in outs], [a for a in b["answers"] for _ in range(k)])
                passed += sum(max(hit[i * k:(i + 1) * k]) for i in range(len(b["answers"])))
        if n == 0:
            return {}
        out = {"exact_match": correct / n, "completion_length": lengths / n}
        if o.eval_pass_k > 1:
            out[f"pass_at_{o.eval_pass_k}"] = passed / n
        if self.run_dir is not None and self.is_main and samples:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps({"step": self.last_step, **s}) + "\n")
        return out


def eval_batches(records: list[dict], tokenizer, batch_size: int):
    """A callable giving the held-out prompts in fixed batches (ids, texts, answers)."""
    ids = [tokenizer.encode(r["prompt"]) for r in records]

    def batches():
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            yield {"prompt_ids": ids[s:s + batch_size], "prompts": [r["prompt"] for r in chunk],
                   "answers": [r["answer"] for r in chunk]}
    return batches
