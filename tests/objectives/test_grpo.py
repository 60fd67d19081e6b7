"""lmforge.objectives.grpo: throughput and MFU count the tokens the forward runs (no padding, a
shared prompt once per group)."""

from __future__ import annotations

from lmforge.tasks.grpo import rollout_rows


def test_tokens_counted_are_those_the_forward_runs():
    """Throughput and MFU count real tokens: no padding, a shared prompt once per group."""
    from lmforge.objectives.grpo import GRPO
    from lmforge.objectives.logprobs import shared_prompt_rows

    rows = rollout_rows([[5, 6, 7]] * 2 + [[8]] * 2, [[1, 2], [3], [4, 4, 4], [9]], [False] * 4, None, 0)
    assert GRPO.tokens_in(None, rows) == (3 + 2) + (3 + 1) + (1 + 3) + (1 + 1)
    rows.update(shared_prompt_rows(rows["input_ids"], rows["completion_mask"], [[0, 1], [2, 3]], 0))
    assert GRPO.tokens_in(None, rows) == (3 + 2 + 1) + (1 + 3 + 1)
