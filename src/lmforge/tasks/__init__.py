"""The task registry: what ``task:`` in a recipe can name.

A task is a small builder: given the run's config it returns the model, tokenizer, objective,
training batch source and evaluation source (:class:`~lmforge.tasks.common.TaskParts`). The one
run function (``lmforge.train.run``) does everything else: run folder, config, logging, the
Trainer, resume, curves, summary. Adding a task means an objective, a data format, an entry
here and its recipes; nothing in the trainer, checkpoints or CLI.

Each task has its own options dataclass, the recipe's ``objective:`` section, validated here
with the rest of the config (unknown keys and wrong types name their key path).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

# name -> "module:attribute" of its Task, imported on first use (keeps `import lmforge` light)
TASKS: dict[str, str] = {
    "pretrain": "lmforge.tasks.lm:PRETRAIN",
    "mlm": "lmforge.tasks.lm:MLM",
    "classify": "lmforge.tasks.classify:CLASSIFY",
    "sft": "lmforge.tasks.sft:SFT",
    "dpo": "lmforge.tasks.dpo:DPO_TASK",
    "grpo": "lmforge.tasks.grpo:GRPO_TASK",
}


@dataclass(frozen=True)
class Task:
    name: str
    summary: str  # one line for --help and the README's task table
    options: type  # dataclass of the task's ``objective:`` options
    build: Callable  # (TaskContext) -> TaskParts
    check: Callable = field(default=lambda cfg: [])  # (RunConfig) -> problems, after the options validated
    for_eval: Callable | None = None  # (model, tokenizer, run config, args) -> metrics: ``lmforge eval``


def get_task(name: str) -> Task:
    from lmforge.errors import ConfigError

    if name not in TASKS:
        raise ConfigError(f"task: got {name!r}, expected one of {', '.join(TASKS)}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)
