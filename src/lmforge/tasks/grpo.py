"""``task: grpo``: reinforcement learning with checkable rewards (GRPO) on prompts with answers.

Data: ``builtin:arithmetic`` (generated problems), GSM8K records (``question`` / ``answer`` with
the final answer after ``####``) or any records with a prompt field and an answer field. The
validation prompts (``data.val_fraction`` or ``data.val_sources``) never appear among the
training prompts. Training samples K completions per prompt from the policy inside the batch
source (:class:`RolloutBatches` below; the loss is :mod:`lmforge.objectives.grpo`); evaluation is
greedy exact match on the held-out
prompts (``val_exact_match``; pass@k with ``objective.eval_pass_k``), with a few completions
appended to ``samples.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch

from lmforge.chat import render
from lmforge.config import RunConfig
from lmforge.data.answer_format import parse_prompt_answer_records
from lmforge.data.builtin import arithmetic
from lmforge.data.splits import split_for_data
from lmforge.data.sampler import StepSampler
from lmforge.data.sources import SourceSpec, iter_records
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.fsutil import atomic_write
from lmforge.statefile import load_state, save_state
from lmforge.model import count_parameters, flops_per_token
from lmforge.generate import SamplingConfig, generate
from lmforge.model.packed import release_packed
from lmforge.objectives.grpo import GRPO
from lmforge.objectives.grpo_math import LOSS_AGGREGATIONS, SCALE_REWARDS, group_advantages
from lmforge.objectives.logprobs import batch_completion_logprobs, shared_prompt_rows
from lmforge.objectives.rewards import RewardSet, build_rewards, exact_match
from lmforge.tasks import Task
from lmforge.tasks.common import (TaskContext, TaskParts, build_model, build_tokenizer, epochs_line,
                                  source_specs)
from lmforge.train.logging import Phase


# ------------------------------------------------------------------------------ options
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
    entropy_coef: float = 0.0  # entropy bonus on the completion tokens (0: none)
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
    if not o.entropy_coef >= 0:
        p.append(f"objective.entropy_coef: got {o.entropy_coef}, expected a number >= 0 (0: no entropy bonus)")
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

    def __init__(self, records: list[dict], tokenizer, options: GRPOOptions, rewards: RewardSet, objective: GRPO,
                 sampler: StepSampler, seed: int, rank: int = 0, run_dir: Path | None = None):
        self.records, self.tok, self.o, self.rewards = records, tokenizer, options, rewards
        self.objective, self.sampler = objective, sampler  # objective.policy: the model being trained
        self.seed, self.rank, self.run_dir = seed, rank, run_dir
        self.last_step = 0  # the trainer's step after the newest batch served (names evaluation samples)
        self.prompt_ids = [tokenizer.encode(r["prompt"]) for r in records]
        self._step, self._global = None, None
        self._cache: dict[tuple[int, int], dict] = {}  # (group, micro) -> rollouts, num_iterations > 1

    def rollout_seed(self, step: int, micro: int) -> int:
        return (self.seed * 1_000_003 + step) * 4099 + micro * 257 + self.rank

    def batch(self, step: int, micro: int) -> dict:
        """The rollouts of optimizer step ``step``: drawn afresh, or with ``num_iterations`` mu > 1
        the ones of rollout group ``step // mu`` (drawn at its first step, kept until it ends)."""
        self.last_step = step + 1
        mu = self.o.num_iterations
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
        return None if self.run_dir is None else Path(self.run_dir) / f"rollouts_rank{self.rank}.safetensors"

    def _save(self, group: int) -> None:
        if (path := self._cache_path) is None:
            return
        data = {"group": group, "batches": {m: b for (_, m), b in self._cache.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: save_state(data, p))

    def _load(self, group: int) -> dict:
        path = self._cache_path
        if path is None or not path.is_file():
            return {}
        data = load_state(path)  # safetensors + JSON: reading it cannot run code
        if not isinstance(data, dict) or not isinstance(data.get("batches"), dict) or "group" not in data:
            raise CheckpointError(f"{path}: not a rollout cache (expected group and batches); delete it to redraw "
                                  f"the rollouts of the current group")
        return {(group, m): b for m, b in data["batches"].items()} if data["group"] == group else {}

    def rollouts(self, step: int, micro: int) -> dict:
        """K completions per prompt of (step, micro) from the current policy, scored: the rows,
        their completion mask, advantages, stats and (``num_iterations`` > 1) the sampler's log-probs."""
        if self._step != step:
            self._global, self._step = self.sampler.global_indices(step), step
        idx = self._global[self.sampler.slice_of(micro, self.rank)].tolist()
        o, K = self.o, self.o.num_generations
        model = self.objective.policy
        prompts = [self.prompt_ids[i] for i in idx for _ in range(K)]  # (B*K) rows, groups of K
        eos = self.tok.eos_id
        outs = generate(model, prompts, sampling(o, eos, self.rollout_seed(step, micro)), tokenizer=self.tok)
        truncated = [len(c) >= o.max_completion_length for c in outs]
        finished = [not t and not o.stop for t in truncated]
        texts = [self.tok.decode(c) for c in outs]
        recs = [self.records[i] for i in idx for _ in range(K)]
        total, per = self.rewards([r["prompt"] for r in recs], texts, [r["answer"] for r in recs],
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


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_prompts(model, batches: Iterable[dict], o: GRPOOptions, tokenizer, samples: Path | None = None,
                     step: int = 0, rewards: RewardSet | None = None) -> dict[str, float]:
    """Greedy exact match (and pass@k with sampling) on held-out prompts, and with ``rewards`` the
    mean of the run's configured reward (``reward``, and each function's ``rewards/NAME``) on the
    same greedy completions; with ``samples``, a few completions are appended to that file
    (``samples.jsonl`` in the run folder), marked ``step``."""
    was_training = model.training
    model.eval()
    try:
        return _evaluate_prompts(model, batches, o, tokenizer, samples, step, rewards)
    finally:
        model.train(was_training)
        release_packed(model, trainable_only=True)  # generation's packed copies of weights about to change


def _evaluate_prompts(model, batches, o: GRPOOptions, tok, samples_path: Path | None, step: int,
                      rewards: RewardSet | None) -> dict:
    eos = tok.eos_id
    correct, n, lengths, passed, samples = 0.0, 0, 0.0, 0.0, []
    reward_sums: dict[str, float] = {}
    for b in batches:
        outs = generate(model, b["prompt_ids"], sampling(o, eos, None, greedy=True), tokenizer=tok)
        texts = [tok.decode(c) for c in outs]
        hits = exact_match(texts, b["answers"])
        if rewards is not None:  # the configured reward of the greedy answers, summed per function
            total, per = rewards(b["prompts"], texts, b["answers"], [len(c) for c in outs])
            for name, r in {"reward": total, **{f"rewards/{k}": v for k, v in per.items()}}.items():
                reward_sums[name] = reward_sums.get(name, 0.0) + float(r.sum())
        correct += sum(hits)
        n += len(hits)
        lengths += sum(len(tok.encode(t)) for t in texts)
        for p, t, a, h in zip(b["prompts"], texts, b["answers"], hits):
            if len(samples) < o.sample_completions:
                samples.append({"prompt": p, "completion": t, "answer": a, "correct": bool(h)})
        if o.eval_pass_k > 1:
            k = o.eval_pass_k
            rows = [p for p in b["prompt_ids"] for _ in range(k)]
            outs = generate(model, rows, sampling(o, eos, 12345 + n), tokenizer=tok)
            hit = exact_match([tok.decode(c) for c in outs], [a for a in b["answers"] for _ in range(k)])
            passed += sum(max(hit[i * k:(i + 1) * k]) for i in range(len(b["answers"])))
    if n == 0:
        return {}
    out = {"exact_match": correct / n, "completion_length": lengths / n,
           **{name: total / n for name, total in reward_sums.items()}}
    if o.eval_pass_k > 1:
        out[f"pass_at_{o.eval_pass_k}"] = passed / n
    if samples_path is not None and samples:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "a", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
    return out


def held_out_batches(records: list[dict], tokenizer, batch_size: int):
    """A callable giving the held-out prompts in fixed batches (ids, texts, answers)."""
    ids = [tokenizer.encode(r["prompt"]) for r in records]

    def batches():
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            yield {"prompt_ids": ids[s:s + batch_size], "prompts": [r["prompt"] for r in chunk],
                   "answers": [r["answer"] for r in chunk]}
    return batches


# ------------------------------------------------------------------------------ records
def source_records(spec: SourceSpec, o: GRPOOptions) -> list[dict]:
    if spec.path.startswith("builtin:"):
        if spec.path != "builtin:arithmetic":
            raise DataError(f"{spec.path}: task grpo has no such built-in prompts; expected builtin:arithmetic")
        return arithmetic(spec.limit or spec.num_docs, spec.seed, **spec.builtin_options())
    records = [{k: v for k, v in r.items() if k != "_where"} for r in iter_records(spec)]
    return parse_prompt_answer_records(records, o.prompt_field, o.answer_field, o.format, spec.path)


def read_records(specs, o: GRPOOptions) -> list[dict]:
    out = []
    for spec in specs or []:
        out.extend(source_records(spec, o))
    return out


def split_for_run(cfg: RunConfig) -> dict[str, list[dict]]:
    """train/val prompts; training prompts that also appear in the validation set are dropped."""
    o, d = cfg.objective, cfg.data
    records = read_records(source_specs(d.sources), o)
    train, val, _ = split_for_data(records, replace(d, test_fraction=0.0), cfg.run.seed)  # held-out = val
    if d.val_sources:
        val = read_records(source_specs(d.val_sources), o)
    held = {r["prompt"] for r in val}
    train = [r for r in train if r["prompt"] not in held]
    if not train:
        raise DataError("task grpo: no training prompts left after removing the held-out ones")
    if not val:
        raise ConfigError("data.val_fraction: the validation split is empty; raise val_fraction or give val_sources")
    return {"train": train, "val": val}


def render_prompts(records: list[dict], tokenizer, o: GRPOOptions) -> list[dict]:
    """``template: chat``: each prompt becomes one user turn (after the system prompt, if any) in
    the model's chat template, ending where the assistant's reply starts; ``none``: unchanged."""
    if o.template == "none":
        return records
    system = [{"role": "system", "content": o.system_prompt}] if o.system_prompt else []
    return [{**r, "prompt": render(system + [{"role": "user", "content": r["prompt"]}], tokenizer,
                                   add_generation_prompt=True)} for r in records]


# ------------------------------------------------------------------------------ builder
def rollout_setup(ctx: TaskContext, task: str):
    """What every rollout task (grpo, ppo) builds first: the train/held-out prompts (rendered in
    the chat template when asked), the tokenizer and the model, with every prompt checked to
    leave room for a completion. Returns (splits, tokenizer, model)."""
    cfg, o = ctx.cfg, ctx.cfg.objective
    splits = split_for_run(cfg)
    tokenizer = build_tokenizer(ctx, lambda: (f"{r['prompt']} {r['answer']}" for r in splits["train"]))
    splits = {s: render_prompts(recs, tokenizer, o) for s, recs in splits.items()}
    model = build_model(ctx, tokenizer.vocab_size)
    mcfg = model.config
    if mcfg.arch != "decoder":
        raise ConfigError(f"task: {task} trains a causal decoder; model.arch is {mcfg.arch!r}")
    for split, recs in splits.items():
        for i, r in enumerate(recs):
            n = len(tokenizer.encode(r["prompt"]))
            if n + o.max_completion_length > mcfg.context_length:
                raise DataError(f"task {task}: {split} prompt {i} ({r['prompt'][:40]!r}...) has {n} tokens; with "
                                f"objective.max_completion_length {o.max_completion_length} that exceeds the model's "
                                f"context_length {mcfg.context_length}; expected shorter prompts or completions")
    return splits, tokenizer, model


def held_out_evaluation(ctx: TaskContext, tokenizer, val: list[dict], train_data: RolloutBatches, rewards: RewardSet):
    """The rollout tasks' ``evaluate`` (held-out prompts during training, samples.jsonl) and
    ``finish`` (the best model on every held-out prompt, eval_report.json)."""
    o, t, dist = ctx.cfg.objective, ctx.cfg.train, ctx.dist
    samples = ctx.run_dir / "samples.jsonl" if dist.is_main else None

    def evaluate(model, batches) -> dict:
        return evaluate_prompts(model, batches, o, tokenizer, samples, train_data.last_step, rewards)

    def finish(best_model, summary: dict) -> dict:
        if not dist.is_main:
            return {}
        phase = Phase("held-out evaluation of the best model", len(val), ctx.say, unit="prompts")
        report = evaluate(best_model, phase.track(held_out_batches(val, tokenizer, t.eval_batch_size)(),
                                                  size=lambda b: len(b["prompts"])))
        report["prompts"] = len(val)
        ctx.say("held-out: " + "  ".join(f"{k} {v:.4f}" for k, v in report.items()))
        text = json.dumps({"val": report}, indent=2)
        atomic_write(ctx.run_dir / "eval_report.json", lambda p: p.write_text(text))
        return {"eval_report": {"val": report}}

    return evaluate, finish


def _build(ctx: TaskContext) -> TaskParts:
    cfg, o, t, dist = ctx.cfg, ctx.cfg.objective, ctx.cfg.train, ctx.dist
    splits, tokenizer, model = rollout_setup(ctx, "grpo")
    mcfg = model.config
    rewards = build_rewards(o.rewards)
    objective = GRPO(o.loss_type, o.epsilon_low, o.epsilon_high, o.beta, o.max_completion_length, o.mask_truncated,
                     o.entropy_coef)
    sampler = StepSampler(len(splits["train"]), t.batch_size, t.grad_accum, dist.world_size, cfg.run.seed)
    train_data = RolloutBatches(splits["train"], tokenizer, o, rewards, objective, sampler, cfg.run.seed, dist.rank,
                                ctx.run_dir)
    val = splits["val"]
    evaluate, finish = held_out_evaluation(ctx, tokenizer, val, train_data, rewards)

    K = o.num_generations
    epochs = epochs_line(ctx, len(splits["train"]) / sampler.global_batch)  # sets max_steps with train.epochs
    return TaskParts(
        model=model, tokenizer=tokenizer, objective=objective, train_data=train_data,
        eval_data=held_out_batches(val, tokenizer, t.eval_batch_size), evaluate=evaluate,
        flops_per_token=flops_per_token(mcfg, mcfg.context_length), finish=finish,
        describe=[f"data: train {len(splits['train'])} prompts, held-out {len(val)}; rewards "
                  f"{', '.join(f.name for f in rewards.functions)}",
                  f"model: {mcfg.arch} {count_parameters(model):,} parameters; K {K}, max_completion_length "
                  f"{o.max_completion_length}, temperature {o.temperature}, loss {o.loss_type}, beta {o.beta}",
                  f"batch: {t.batch_size} prompts x {K} completions x {t.grad_accum} accum x {dist.world_size} procs "
                  f"= {sampler.global_batch * K} completions/step ({epochs}) on {dist.device}"])


def rollout_problems(cfg: RunConfig, task: str) -> list[str]:
    """What every rollout task (grpo, ppo) checks beside its options: the metric it evaluates, a
    causal decoder with room for a prompt, and reward functions that build."""
    o, p = cfg.objective, []
    if cfg.train.best_metric == "val_loss":
        p.append(f"train.best_metric: task {task} evaluates val_exact_match (greedy), not val_loss; expected "
                 f"val_exact_match with best_mode max, or null")
    if not cfg.init_from:
        mcfg = cfg.model_config(vocab_size=cfg.model.get("vocab_size") or 1)
        if mcfg.arch != "decoder":
            p.append(f"model.arch: task {task} trains a causal decoder; got {mcfg.arch!r}")
        elif o.max_completion_length >= mcfg.context_length:
            p.append(f"objective.max_completion_length: {o.max_completion_length} leaves no room for a prompt within "
                     f"model.context_length {mcfg.context_length}")
    try:
        build_rewards(o.rewards)
    except ConfigError as e:
        p += e.problems
    return p


def _check(cfg: RunConfig) -> list[str]:
    return option_problems(cfg.objective) + rollout_problems(cfg, "grpo")


GRPO_TASK = Task("grpo", "reinforcement learning with checkable rewards (GRPO): K sampled completions per prompt",
                 GRPOOptions, _build, _check)
