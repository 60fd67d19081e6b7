"""Objectives: how a batch becomes a loss. The trainer knows nothing else about the method.

Every objective implements the protocol of :class:`~lmforge.objectives.base.Objective` (the
trainer calls ``setup``, ``loss``, ``targets_in``, ``tokens_in`` and, for validation unless the
task gives its own evaluation, ``evaluate``). An objective takes tensors and plain arguments: it
knows nothing of recipes, run folders or logging; the task that builds it (``lmforge.tasks``)
owns its options, data, batches and reports.

======================  ======================================  ==========================
objective               loss                                    built by task
======================  ======================================  ==========================
``CausalLM``            next-token cross-entropy                pretrain, sft
``MaskedLM``            BERT's masked-token cross-entropy       mlm
``Classification``      (weighted) cross-entropy of a head      classify
``DPO``                 the preference losses (DPO family)      dpo
``GRPO``                group-relative clipped surrogate        grpo
======================  ======================================  ==========================

The maths they share sits in plain functions with their own tests: ``logprobs`` (log-probs of
given completions), ``preference_losses``, ``grpo_math``, ``rewards`` and ``metrics``.
"""

from lmforge.objectives.base import Objective
from lmforge.objectives.causal_lm import CausalLM
from lmforge.objectives.classification import Classification
from lmforge.objectives.dpo import DPO
from lmforge.objectives.grpo import GRPO
from lmforge.objectives.masked_lm import MaskedLM

__all__ = ["Objective", "CausalLM", "MaskedLM", "Classification", "DPO", "GRPO"]
