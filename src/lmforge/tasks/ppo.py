"""``task: ppo``: PPO with a value model on prompts with checkable answers (InstructGPT/TRL layout).

The data, prompts, rollouts, rewards and evaluation are GRPO's (:mod:`lmforge.tasks.grpo`): the
same records and held-out split, the same sampling (``sampling``, ``rollout_rows``), the same
reward functions (``objective.rewards``) and the same held-out greedy exact match
(``evaluate_prompts``). What differs is the baseline: one completion per prompt, and a learned
value model (``objective.value_model``: ``shared``, a value head on the policy's trunk, or
``separate``, a critic copied from the initial model) gives GAE advantages over per-token rewards
(the score at the last token, ``-kl_coef * KL`` to the reference at every token). The loss is
:mod:`lmforge.objectives.ppo`.

The value model is a submodule of the trained model, so the trainer's optimizer trains it and
its checkpoints hold it (their config says ``value_model:``, and loading rebuilds it;
``lmforge generate`` runs the policy and ignores it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.config import RunConfig
from lmforge.data.sampler import StepSampler
from lmforge.errors import ConfigError
from lmforge.generate import generate
from lmforge.model import count_parameters, flops_per_token
from lmforge.model.heads import VALUE_MODELS, attach_value_model, value_model_of
from lmforge.model.lora import has_lora
from lmforge.objectives.ppo import PPO
from lmforge.objectives.ppo_math import KL_ESTIMATORS
from lmforge.objectives.rewards import build_rewards, exact_match
from lmforge.tasks import Task
from lmforge.tasks.common import TaskContext, TaskParts, epochs_line
from lmforge.tasks.grpo import (RolloutBatches, held_out_batches, held_out_evaluation, rollout_problems, rollout_rows,
                                rollout_setup, sampling)


# ------------------------------------------------------------------------------ options
@dataclass
class PPOOptions:
    """``objective:`` options of ``task: ppo`` (the rollout, data and evaluation ones as GRPO's)."""

    value_model: str = "shared"  # shared (a value head on the policy's trunk) or separate (a critic copy)
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    kl_coef: float = 0.05  # per-token KL penalty to the reference, folded into the rewards (0: no reference)
    kl_estimator: str = "k1"  # k1 (log-ratio) or k3
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True
    ppo_epochs: int = 1  # optimizer steps per rollout batch
    max_completion_length: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    min_completion_length: int = 0
    rewards: Any = field(default_factory=lambda: ["exact_match"])
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    template: str = "none"
    system_prompt: str | None = None
    format: str = "auto"
    eval_pass_k: int = 0
    sample_completions: int = 4

    @property
    def num_iterations(self) -> int:  # the name GRPO's rollout cache reads
        return self.ppo_epochs


def option_problems(o: PPOOptions) -> list[str]:
    p = []
    if o.value_model not in VALUE_MODELS:
        p.append(f"objective.value_model: got {o.value_model!r}, expected one of {', '.join(VALUE_MODELS)}")
    for name in ("cliprange", "cliprange_value", "vf_coef", "kl_coef"):
        if not getattr(o, name) >= 0:
            p.append(f"objective.{name}: got {getattr(o, name)}, expected a number >= 0")
    if o.kl_estimator not in KL_ESTIMATORS:
        p.append(f"objective.kl_estimator: got {o.kl_estimator!r}, expected one of {', '.join(KL_ESTIMATORS)}")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(o, name) <= 1:
            p.append(f"objective.{name}: got {getattr(o, name)}, expected a number in [0, 1]")
    if not (isinstance(o.ppo_epochs, int) and o.ppo_epochs >= 1):
        p.append(f"objective.ppo_epochs: got {o.ppo_epochs!r}, expected an integer >= 1 (optimizer steps per "
                 f"rollout batch)")
    if o.max_completion_length < 1:
        p.append(f"objective.max_completion_length: got {o.max_completion_length}, expected an integer >= 1")
    if o.temperature <= 0:
        p.append(f"objective.temperature: got {o.temperature}, expected a number > 0 (rollouts are sampled)")
    if not (isinstance(o.min_completion_length, int) and 0 <= o.min_completion_length <= o.max_completion_length):
        p.append(f"objective.min_completion_length: got {o.min_completion_length!r}, expected an integer from 0 to "
                 f"max_completion_length ({o.max_completion_length})")
    if o.eval_pass_k < 0 or o.eval_pass_k == 1:
        p.append(f"objective.eval_pass_k: got {o.eval_pass_k}, expected 0 (off) or k >= 2")
    if o.template not in ("none", "chat"):
        p.append(f"objective.template: got {o.template!r}, expected none or chat")
    if o.system_prompt is not None and o.template != "chat":
        p.append("objective.system_prompt: only used with objective.template: chat")
    if o.format not in ("auto", "gsm8k", "fields"):
        p.append(f"objective.format: got {o.format!r}, expected auto, gsm8k or fields")
    return p


# ------------------------------------------------------------------------------ rollouts
class PPORollouts(RolloutBatches):
    """The PPO batch source: GRPO's (step sampler, seeding, rollout cache for ``ppo_epochs`` > 1
    with exact resume), with one completion per prompt scored by the value model."""

    def rollouts(self, step: int, micro: int) -> dict:
        if self._step != step:
            self._global, self._step = self.sampler.global_indices(step), step
        idx = self._global[self.sampler.slice_of(micro, self.rank)].tolist()
        o, eos = self.o, self.tok.eos_id
        prompts = [self.prompt_ids[i] for i in idx]
        outs = generate(self.objective.policy, prompts, sampling(o, eos, self.rollout_seed(step, micro)),
                        tokenizer=self.tok)
        truncated = [len(c) >= o.max_completion_length for c in outs]
        finished = [not t and not o.stop for t in truncated]
        texts = [self.tok.decode(c) for c in outs]
        recs = [self.records[i] for i in idx]
        answers = [r["answer"] for r in recs]
        total, per = self.rewards([r["prompt"] for r in recs], texts, answers, [len(c) for c in outs])
        batch = rollout_rows(prompts, outs, finished, eos, self.tok.pad_id if self.tok.pad_id is not None else 0)
        scored = self.objective.score(batch, total)
        lengths = torch.tensor([len(c) for c in outs], dtype=torch.float32)
        stats = {"reward": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
                 "completion_length": float(lengths.mean()), "completion_length_max": float(lengths.max()),
                 "truncated": float(sum(truncated) / len(outs)), **scored.pop("stats")}
        for name, r in per.items():
            stats[f"rewards/{name}"] = float(r.mean())
        stats["accuracy"] = (stats["rewards/exact_match"] if "exact_match" in per
                             else float(torch.tensor(exact_match(texts, answers), dtype=torch.float32).mean()))
        return {**batch, **scored, "stats": stats}


# ------------------------------------------------------------------------------ builder
def with_value_model(model, kind: str):
    """The policy with its value model attached (``separate``: a critic trunk copied from it now)."""
    if kind == "separate" and value_model_of(model) is None:
        if has_lora(model):
            raise ConfigError("objective.value_model: separate with model.lora is not supported; expected shared "
                              "(a value head on the LoRA policy)")
        return attach_value_model(model, kind, copy.deepcopy(model))
    return attach_value_model(model, kind)


def _build(ctx: TaskContext) -> TaskParts:
    cfg, o, t, dist = ctx.cfg, ctx.cfg.objective, ctx.cfg.train, ctx.dist
    splits, tokenizer, model = rollout_setup(ctx, "ppo")
    mcfg = model.config
    model = with_value_model(model, o.value_model)
    rewards = build_rewards(o.rewards)
    objective = PPO(o.cliprange, o.cliprange_value, o.vf_coef, o.kl_coef, o.kl_estimator, o.gamma, o.lam,
                    o.whiten_advantages)
    sampler = StepSampler(len(splits["train"]), t.batch_size, t.grad_accum, dist.world_size, cfg.run.seed)
    train_data = PPORollouts(splits["train"], tokenizer, o, rewards, objective, sampler, cfg.run.seed, dist.rank,
                             ctx.run_dir)
    val = splits["val"]
    evaluate, finish = held_out_evaluation(ctx, tokenizer, val, train_data, rewards)

    epochs = epochs_line(ctx, len(splits["train"]) / sampler.global_batch)
    critic = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("value_head.", "critic.")))
    return TaskParts(
        model=model, tokenizer=tokenizer, objective=objective, train_data=train_data,
        eval_data=held_out_batches(val, tokenizer, t.eval_batch_size), evaluate=evaluate,
        flops_per_token=flops_per_token(mcfg, mcfg.context_length), finish=finish,
        describe=[f"data: train {len(splits['train'])} prompts, held-out {len(val)}; rewards "
                  f"{', '.join(f.name for f in rewards.functions)}",
                  f"model: {mcfg.arch} {count_parameters(model) - critic:,} policy parameters + {critic:,} in the "
                  f"{o.value_model} value model; max_completion_length {o.max_completion_length}, temperature "
                  f"{o.temperature}, kl_coef {o.kl_coef}, gamma {o.gamma}, lam {o.lam}, ppo_epochs {o.ppo_epochs}",
                  f"batch: {t.batch_size} prompts x {t.grad_accum} accum x {dist.world_size} procs = "
                  f"{sampler.global_batch} completions/step ({epochs}) on {dist.device}"])


def _check(cfg: RunConfig) -> list[str]:
    o = cfg.objective
    p = option_problems(o)
    if cfg.train.trainable != "all" and not cfg.model.get("lora"):
        p.append(f"train.trainable: got {cfg.train.trainable!r}; task ppo trains its value model beside the policy, "
                 f"which a partial freeze would leave frozen; expected all (or model.lora)")
    if o.value_model == "separate" and cfg.model.get("lora"):
        p.append("objective.value_model: separate with model.lora is not supported; expected shared")
    return p + rollout_problems(cfg, "ppo")


PPO_TASK = Task("ppo", "PPO with a value model (shared value head or separate critic), GAE and a per-token KL "
                "penalty: one sampled completion per prompt", PPOOptions, _build, _check)
