"""The task registry: what ``task:`` in a recipe can name.

A task is a small builder: given the run's config it returns the model, tokenizer, objective,
training batch source and evaluation source (:class:`~lmforge.tasks.common.TaskParts`). The one
run function (``lmforge.tasks.run``) does everything else: run folder, config, logging, the
Trainer, resume, curves, summary. Adding a task means an objective, a data format, an entry
here and its recipes; nothing in the trainer, checkpoints or CLI.

Each task has its own options dataclass, the recipe's ``objective:`` section, validated here
with the rest of the config (unknown keys and wrong types name their key path).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmforge import config as _config
from lmforge import hub
from lmforge.config import RunConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.store import package_path

# name -> "module:attribute" of its Task, imported on first use (keeps `import lmforge` light)
TASKS: dict[str, str] = {
    "pretrain": "lmforge.tasks.lm:PRETRAIN",
    "mlm": "lmforge.tasks.lm:MLM",
    "classify": "lmforge.tasks.classify:CLASSIFY",
    "sft": "lmforge.tasks.sft:SFT",
    "dpo": "lmforge.tasks.dpo:DPO_TASK",
    "grpo": "lmforge.tasks.grpo:GRPO_TASK",
    "ppo": "lmforge.tasks.ppo:PPO_TASK",
}


@dataclass(frozen=True)
class Task:
    name: str
    summary: str  # one line for --help and the README's task table
    options: type  # dataclass of the task's ``objective:`` options
    build: Callable  # (TaskContext) -> TaskParts
    check: Callable = field(default=lambda cfg: [])  # (RunConfig) -> problems, after the options validated
    for_eval: Callable | None = None  # (model, tokenizer, run config, EvalRequest) -> metrics: ``lmforge eval``


@dataclass
class EvalRequest:
    """What ``lmforge eval`` asks of a trained model: data to score it on, and how to read it.
    Fields a task does not use are ignored (an LM reads texts, a classifier labelled records)."""

    data: str  # a file, folder, glob, builtin:NAME or hf:NAME
    text_field: str | None = None  # None: the field the model was trained with ("text" for an LM)
    label_field: str | None = None
    columns: list[str] | None = None  # names of a headerless CSV/TSV's columns
    limit: int | None = None
    split: str | None = None
    doc_separator: str | None = None
    cache_dir: str | None = None  # where an LM's token store is cached
    context: int | None = None  # LM windows (default: the model's context)
    batch_size: int = 8
    max_batches: int | None = None
    progress: bool = True


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task: got {name!r}, expected one of {', '.join(TASKS)}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def evaluate(model, tokenizer, run_config: dict, request: EvalRequest) -> dict:
    """``lmforge eval``: the task that fits the model scores it (a classifier: ``classify``'s
    accuracy, F1 and confusion; any other model: ``pretrain``'s loss and perplexity)."""
    task = get_task("classify" if model.config.num_classes else "pretrain")
    return task.for_eval(model, tokenizer, run_config, request)


# ------------------------------------------------------------------------------ whole recipes
def config_from_dict(data: dict, *, pending_paths: tuple[str, ...] = ()) -> RunConfig:
    """A validated RunConfig, the task's options included: ``lmforge.config.config_from_dict``
    checks the shared sections, this adds ``task``, the ``objective:`` options and the task's own
    checks, and ``model.init_from``; one ConfigError lists every problem."""
    def task_problems(cfg: RunConfig, pending: tuple[str, ...]) -> list[str]:
        problems = _init_from_problems(cfg.model.get("init_from"), pending)
        _task_problems(cfg, problems)
        return problems

    return _config.config_from_dict(data, pending_paths=pending_paths, extra_problems=task_problems)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A recipe file with ``section.key=value`` overrides, validated (see :func:`config_from_dict`)."""
    return config_from_dict(_config.read_recipe(path, overrides))


def _init_from_problems(init, pending: tuple[str, ...] = ()) -> list[str]:
    if init is None or init in pending:  # pending: a folder an earlier stage of a pipeline will write
        return []
    if not isinstance(init, str) or not init.strip():
        return [f"model.init_from: got {init!r}, expected a path"]
    if hub.is_hf_spec(init):  # a Hugging Face model by name: fetched (or found in the cache) when the run starts
        try:
            hub.parse_hf_spec(init)
        except CheckpointError as e:
            return [f"model.init_from: {e}"]
        return []
    try:
        path = package_path(init)
    except CheckpointError as e:
        return [f"model.init_from: {e}"]
    if not path.exists():
        return [f"model.init_from: {init} does not exist; expected an lmforge checkpoint, model or run folder, "
                f"or a Hugging Face model folder"]
    return []




def _task_problems(cfg: RunConfig, problems: list[str]) -> None:
    """Validate ``task`` and turn the ``objective:`` mapping into the task's options dataclass."""
    if cfg.task not in TASKS:
        problems.append(f"task: got {cfg.task!r}, expected one of {', '.join(TASKS)}")
        cfg.objective = None
        return
    task = get_task(cfg.task)
    raw = cfg.objective if cfg.objective is not None else {}
    if dataclasses.is_dataclass(raw):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, dict):
        problems.append(f"objective: expected a mapping of {cfg.task} options, got {type(raw).__name__}")
        raw = {}
    if "name" in raw and "name" not in task.options.__dataclass_fields__:  # recipes from before tasks
        legacy = {"causal_lm": "pretrain", "masked_lm": "mlm"}.get(raw["name"], raw["name"])
        problems.append(f"objective.name: the method is chosen by the top-level task key now; "
                        f"expected task: {legacy} and no objective.name")
        raw = {k: v for k, v in raw.items() if k != "name"}
    sub: list[str] = []
    cfg.objective = _config.build_section(task.options, raw, "objective", sub)
    problems += [q.replace(" (expected one of", f" for task {cfg.task} (expected one of") for q in sub]
    if not sub:
        try:
            problems += task.check(cfg)
        except ConfigError:
            pass  # the model section's own problems are reported by the model check below


