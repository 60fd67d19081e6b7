"""Built-in tasks with checkable answers, generated offline and deterministically by seed.

- :func:`arithmetic_split`: train and held-out arithmetic problems (``{"prompt", "answer"}``)
  with no held-out prompt appearing in the training set, for GRPO and its evaluation.
- :func:`arithmetic_preference_pairs`: the same problems as preference pairs, the correct
  answer chosen and a plausible wrong one rejected (off by a little, the wrong operation, or one
  digit changed), for a fast DPO recipe that needs no downloaded data.

Problems come from :func:`lmforge.data.builtin.arithmetic` ("What is 37 + 48? Answer:"); a
completion is the answer after one space (" 85"), as in the pretraining text of the same corpus.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from lmforge.data.builtin import arithmetic
from lmforge.errors import DataError

__all__ = ["arithmetic_split", "arithmetic_preference_pairs", "wrong_answer"]

_PROBLEM = re.compile(r"What is (\d+) ([-+*/]) (\d+)\? Answer:")


def arithmetic_split(n_train: int, n_eval: int, seed: int = 0, max_operand: int = 99,
                     ops: Sequence[str] = ("+", "-", "*")) -> tuple[list[dict], list[dict]]:
    """``n_train`` training and ``n_eval`` held-out problems; no held-out prompt is in training.

    Both come from one stream for ``seed``: held-out problems are drawn first (distinct prompts),
    then training problems skip any held-out prompt. With small operand ranges there may not be
    enough distinct problems; that is an error rather than a silent overlap.
    """
    if n_train < 0 or n_eval < 0:
        raise DataError(f"arithmetic_split: counts must be >= 0, got {n_train} and {n_eval}")
    held, held_prompts, train = [], set(), []
    batch, offset = max(64, 2 * (n_train + n_eval)), 0
    for _ in range(50):  # each round draws a longer prefix of the same seeded stream
        stream = arithmetic(offset + batch, seed, max_operand, ops)[offset:]
        offset += batch
        for rec in stream:
            if len(held) < n_eval:
                if rec["prompt"] not in held_prompts:
                    held.append(rec)
                    held_prompts.add(rec["prompt"])
            elif len(train) < n_train and rec["prompt"] not in held_prompts:
                train.append(rec)
        if len(held) == n_eval and len(train) == n_train:
            return train, held
    raise DataError(f"arithmetic_split: could not draw {n_eval} distinct held-out problems and "
                    f"{n_train} training ones with max_operand={max_operand}; raise max_operand")


def _evaluate(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a // b


def wrong_answer(a: int, op: str, b: int, rng: random.Random) -> int:
    """A plausible wrong, non-negative answer to ``a op b``: an arithmetic slip a learner makes."""
    right = _evaluate(a, op, b)
    candidates = []
    kind = rng.choice(("near", "operation", "digit"))
    if kind == "operation":
        candidates = [_evaluate(a, o, b) for o in ("+", "-", "*") if o != op]
        candidates = [c for c in candidates if c >= 0 and c != right]
    elif kind == "digit":
        digits = list(str(right))
        pos = rng.randrange(len(digits))
        choices = [d for d in "0123456789" if d != digits[pos] and not (pos == 0 and d == "0"
                                                                        and len(digits) > 1)]
        digits[pos] = rng.choice(choices)
        candidates = [int("".join(digits))]
    if not candidates:  # "near", or nothing usable above: off by 1..10
        delta = rng.randint(1, 10)
        candidates = [right + delta] + ([right - delta] if right - delta >= 0 else [])
    return rng.choice(candidates)


def arithmetic_preference_pairs(n: int, seed: int = 0, max_operand: int = 99,
                                ops: Sequence[str] = ("+", "-", "*")) -> list[dict]:
    """``n`` records ``{"prompt", "chosen", "rejected", "answer"}``: chosen is the right answer
    (" 85"), rejected a wrong one (" 86"). Deterministic for ``seed``."""
    rng = random.Random(f"lmforge-arithmetic-preference-{seed}")
    pairs = []
    for rec in arithmetic(n, seed, max_operand, ops):
        m = _PROBLEM.fullmatch(rec["prompt"])
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        wrong = wrong_answer(a, op, b, rng)
        pairs.append({"prompt": rec["prompt"], "chosen": f" {rec['answer']}",
                      "rejected": f" {wrong}", "answer": rec["answer"]})
    return pairs
