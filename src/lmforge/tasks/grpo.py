"""``task: grpo``: reinforcement learning with checkable rewards (GRPO) on prompts with answers.

Data: ``builtin:arithmetic`` (generated problems), GSM8K records (``question`` / ``answer`` with
the final answer after ``####``) or any records with a prompt field and an answer field. The
validation prompts (``data.val_fraction`` or ``data.val_sources``) never appear among the
training prompts. Training samples K completions per prompt from the policy inside the batch
source (see :mod:`lmforge.objectives.grpo`); evaluation is greedy exact match on the held-out
prompts (``val_exact_match``; pass@k with ``objective.eval_pass_k``), with a few completions
appended to ``samples.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import replace

from lmforge.chat import render
from lmforge.config import RunConfig
from lmforge.data.answer_format import parse_prompt_answer_records
from lmforge.data.builtin import arithmetic
from lmforge.data.formats import split_for_data
from lmforge.data.sampler import StepSampler
from lmforge.data.sources import SourceSpec, iter_records
from lmforge.errors import ConfigError, DataError
from lmforge.fsutil import atomic_write
from lmforge.model import count_parameters, flops_per_token
from lmforge.objectives.grpo import GRPO, GRPOOptions, RolloutBatches, eval_batches, option_problems
from lmforge.objectives.rewards import build_rewards
from lmforge.tasks import Task
from lmforge.tasks.common import TaskContext, TaskParts, build_model, build_tokenizer, source_specs


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
def _build(ctx: TaskContext) -> TaskParts:
    cfg, o, t, dist = ctx.cfg, ctx.cfg.objective, ctx.cfg.train, ctx.dist
    splits = split_for_run(cfg)
    tokenizer = build_tokenizer(ctx, lambda: (f"{r['prompt']} {r['answer']}" for r in splits["train"]))
    splits = {s: render_prompts(recs, tokenizer, o) for s, recs in splits.items()}
    model = build_model(ctx, tokenizer.vocab_size)
    mcfg = model.config
    if mcfg.arch != "decoder":
        raise ConfigError(f"task: grpo trains a causal decoder; model.arch is {mcfg.arch!r}")
    for split, recs in splits.items():
        for i, r in enumerate(recs):
            n = len(tokenizer.encode(r["prompt"]))
            if n + o.max_completion_length > mcfg.context_length:
                raise DataError(f"task grpo: {split} prompt {i} ({r['prompt'][:40]!r}...) has {n} tokens; with "
                                f"objective.max_completion_length {o.max_completion_length} that exceeds the model's "
                                f"context_length {mcfg.context_length}; expected shorter prompts or completions")
    rewards = build_rewards(o.rewards)
    objective = GRPO(o, rewards, tokenizer, ctx.run_dir, dist.is_main)
    sampler = StepSampler(len(splits["train"]), t.batch_size, t.grad_accum, dist.world_size, cfg.run.seed)
    train_data = RolloutBatches(splits["train"], tokenizer, objective, sampler, cfg.run.seed, dist.rank)
    val = splits["val"]

    def finish(best_model, summary: dict) -> dict:
        if not dist.is_main:
            return {}
        report = objective.evaluate(best_model, eval_batches(val, tokenizer, t.eval_batch_size)())
        report["prompts"] = len(val)
        ctx.say("held-out: " + "  ".join(f"{k} {v:.4f}" for k, v in report.items()))
        text = json.dumps({"val": report}, indent=2)
        atomic_write(ctx.run_dir / "eval_report.json", lambda p: p.write_text(text))
        return {"eval_report": {"val": report}}

    K = o.num_generations
    return TaskParts(
        model=model, tokenizer=tokenizer, objective=objective, train_data=train_data,
        eval_data=eval_batches(val, tokenizer, t.eval_batch_size),
        flops_per_token=flops_per_token(mcfg, mcfg.context_length), finish=finish,
        describe=[f"data: train {len(splits['train'])} prompts, held-out {len(val)}; rewards "
                  f"{', '.join(f.name for f in rewards.functions)}",
                  f"model: {mcfg.arch} {count_parameters(model):,} parameters; K {K}, max_completion_length "
                  f"{o.max_completion_length}, temperature {o.temperature}, loss {o.loss_type}, beta {o.beta}",
                  f"batch: {t.batch_size} prompts x {K} completions x {t.grad_accum} accum x {dist.world_size} procs "
                  f"= {sampler.global_batch * K} completions/step on {dist.device}"])


def _check(cfg: RunConfig) -> list[str]:
    o = cfg.objective
    p = option_problems(o)
    if cfg.train.best_metric == "val_loss":
        p.append("train.best_metric: task grpo evaluates val_exact_match (greedy), not val_loss; expected "
                 "val_exact_match with best_mode max, or null")
    if not cfg.init_from:
        mcfg = cfg.model_config(vocab_size=cfg.model.get("vocab_size") or 1)
        if mcfg.arch != "decoder":
            p.append(f"model.arch: task grpo trains a causal decoder; got {mcfg.arch!r}")
        elif o.max_completion_length >= mcfg.context_length:
            p.append(f"objective.max_completion_length: {o.max_completion_length} leaves no room for a prompt within "
                     f"model.context_length {mcfg.context_length}")
    try:
        build_rewards(o.rewards)
    except ConfigError as e:
        p += e.problems
    return p


GRPO_TASK = Task("grpo", "reinforcement learning with checkable rewards (GRPO): K sampled completions per prompt",
                 GRPOOptions, _build, _check)
