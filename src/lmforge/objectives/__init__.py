"""Objectives: how a batch becomes a loss. The trainer knows nothing else about the method.

An objective implements::

    collate(windows, generator) -> batch      # raw token windows (B, T+1) -> model inputs/targets
    loss(model, batch) -> (loss, metrics)      # scalar tensor to minimise + floats to log
    evaluate(model, batches) -> metrics        # averaged over validation batches

Later objectives (classification, SFT, DPO, GRPO) implement the same three methods.
"""

from lmforge.objectives.base import Objective
from lmforge.objectives.causal_lm import CausalLM
from lmforge.objectives.masked_lm import MaskedLM

__all__ = ["Objective", "CausalLM", "MaskedLM", "make_objective"]


def make_objective(name: str, **kwargs) -> Objective:
    from lmforge.errors import ConfigError

    table = {"causal_lm": CausalLM, "masked_lm": MaskedLM}
    if name not in table:
        raise ConfigError(f"objective.name: got {name!r}, expected one of {', '.join(table)}")
    return table[name](**kwargs)
