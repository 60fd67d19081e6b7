"""Built-in arithmetic tasks: held-out split without overlap, preference pairs by seed."""

from __future__ import annotations

import random
import re

import pytest

from lmforge.data.builtin_tasks import arithmetic_preference_pairs, arithmetic_split, wrong_answer
from lmforge.data.preference_format import parse_preference_records
from lmforge.errors import DataError
from lmforge.objectives.rewards import exact_match


def test_split_is_disjoint_and_deterministic():
    train, held = arithmetic_split(300, 100, seed=1)
    assert len(train) == 300 and len(held) == 100
    assert len({r["prompt"] for r in held}) == 100
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert arithmetic_split(300, 100, seed=1) == (train, held)
    assert arithmetic_split(300, 100, seed=2) != (train, held)
    for r in held[:20]:  # answers are right
        a, op, b = re.fullmatch(r"What is (\d+) (.) (\d+)\? Answer:", r["prompt"]).groups()
        assert int(r["answer"]) == eval(f"{a} {op} {b}")


def test_split_errors_when_too_few_distinct_problems():
    with pytest.raises(DataError, match="raise max_operand"):
        arithmetic_split(10, 20, seed=0, max_operand=1, ops=("+",))  # only 4 distinct problems


def test_preference_pairs():
    pairs = arithmetic_preference_pairs(200, seed=3)
    assert pairs == arithmetic_preference_pairs(200, seed=3)
    assert pairs != arithmetic_preference_pairs(200, seed=4)
    assert exact_match([p["chosen"] for p in pairs], [p["answer"] for p in pairs]) == [1.0] * 200
    assert exact_match([p["rejected"] for p in pairs], [p["answer"] for p in pairs]) == [0.0] * 200
    assert all(p["chosen"].startswith(" ") and int(p["rejected"]) >= 0 for p in pairs)
    parsed, skipped = parse_preference_records(pairs)  # a valid preference data set
    assert len(parsed) == 200 and not skipped


def test_wrong_answer_is_never_right():
    rng = random.Random(0)
    for a in range(0, 30, 3):
        for b in range(0, 30, 4):
            for op in "+-*":
                x, y = (max(a, b), min(a, b)) if op == "-" else (a, b)
                right = eval(f"{x} {op} {y}")
                w = wrong_answer(x, op, y, rng)
                assert w != right and w >= 0
