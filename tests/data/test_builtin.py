"""lmforge.data.builtin: the built-in stories and arithmetic corpora (seeded, grammatical, correct
answers, difficulty options)."""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from lmforge.data import (
    SourceSpec, arithmetic, arithmetic_documents, arithmetic_problems, arithmetic_text, iter_documents, source_fingerprint, stories,
)
from lmforge.errors import DataError


_SENT_END = re.compile(r'[.!?]"?(?=\s|$)')


def test_stories_deterministic_per_seed_and_differ_across_seeds():
    a = stories(30, seed=0)
    assert a == stories(30, seed=0)
    assert a != stories(30, seed=1)
    assert stories(5, seed=0) == a[:5]  # a longer corpus extends a shorter one
    assert len(set(a)) == len(a)


def test_stories_shape_and_grammar():
    docs = stories(300, seed=7)
    assert any('"' in d for d in docs)
    for d in docs:
        n = len(_SENT_END.findall(d))
        assert 4 <= n <= 10, d
        assert d[0].isupper() and d[-1] in '.!"', d
        assert d.count('"') % 2 == 0, d
        assert "{" not in d and "}" not in d and "  " not in d
        assert not re.search(r"\ba [aeio]", d), d  # article agreement
        assert not re.search(r"\ban [^aeiou]", d), d


def test_arithmetic_answers_are_correct():
    recs = arithmetic(300, seed=3, max_operand=50, ops=("+", "-", "*", "/"))
    assert recs == arithmetic_problems(300, seed=3, max_operand=50, ops=("+", "-", "*", "/"))
    seen_ops = set()
    for r in recs:
        m = re.fullmatch(r"What is (\d+) ([-+*/]) (\d+)\? Answer:", r["prompt"])
        assert m, r
        a, op, b = int(m[1]), m[2], int(m[3])
        assert 0 <= a <= 50 and 0 <= b <= 50
        seen_ops.add(op)
        expected = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                    "/": lambda: a // b}[op]()
        if op == "/":
            assert a % b == 0
        assert r["answer"] == str(expected) and expected >= 0
    assert seen_ops == {"+", "-", "*", "/"}
    docs = arithmetic_documents(3, seed=3, max_operand=50, ops=("+", "-", "*", "/"))
    assert docs == [arithmetic_text(r) for r in recs[:3]]
    assert docs[0] == f"{recs[0]['prompt']} {recs[0]['answer']}"
    with pytest.raises(DataError, match="ops"):
        arithmetic(3, ops=("%",))


def test_builtin_arithmetic_difficulty_options_reach_every_reader():
    """ops / max_operand pick the difficulty of the pretraining text, the GRPO prompts and the
    DPO pairs alike; unset, they keep the generator's defaults."""
    from lmforge.data.builtin_tasks import arithmetic_preference_pairs
    from lmforge.tasks.grpo import GRPOOptions
    from lmforge.tasks.dpo import DPOOptions
    from lmforge.tasks.dpo import source_pairs
    from lmforge.tasks.grpo import source_records

    spec = SourceSpec("builtin:arithmetic", num_docs=40, seed=2, ops="+ -", max_operand=9)
    assert spec.builtin_options() == {"max_operand": 9, "ops": ("+", "-")}
    assert SourceSpec("builtin:arithmetic").builtin_options() == {}
    docs = list(iter_documents(spec))
    assert docs == arithmetic_documents(40, seed=2, max_operand=9, ops=("+", "-"))
    assert docs != arithmetic_documents(40, seed=2)
    ops = {re.fullmatch(r"What is (\d+) ([-+*/]) (\d+)\? Answer: \d+", d)[2] for d in docs}
    assert ops == {"+", "-"}
    assert source_records(spec, GRPOOptions()) == arithmetic(40, seed=2, max_operand=9, ops=("+", "-"))
    pairs = [p for _, p in source_pairs(spec, DPOOptions())]
    want = arithmetic_preference_pairs(40, seed=2, max_operand=9, ops=("+", "-"))
    assert [(p.prompt, p.chosen) for p in pairs][:5] == [(w["prompt"], w["chosen"]) for w in want][:5]
    assert source_fingerprint(spec) != source_fingerprint(SourceSpec("builtin:arithmetic", num_docs=40, seed=2))


@pytest.mark.parametrize("kwargs,needle", [
    ({"ops": "+%"}, r"ops must be a string of distinct operations from '\+-\*/'.*'\+%'"),
    ({"ops": "++"}, "ops must be a string of distinct operations"),
    ({"ops": ""}, "ops must be"),
    ({"max_operand": 0}, "max_operand must be an integer >= 1, got 0"),
    ({"max_operand": True}, "max_operand must be an integer >= 1"),
])
def test_builtin_arithmetic_bad_difficulty_is_one_clear_error(kwargs, needle):
    with pytest.raises(DataError, match=needle):
        SourceSpec("builtin:arithmetic", **kwargs)


