"""lmforge.data.splits: label sets, stratified seeded splits, the source part a classifier sees,
balancing."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from lmforge.data.splits import balance_records, label_set, split_records
from lmforge.data.sources import SourceSpec, iter_records


def test_label_set_sorts_integers_numerically_and_strings_alphabetically():
    assert label_set(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_set(["spam", "ham"]) == ["ham", "spam"]


def test_stratified_split_keeps_proportions_and_is_seeded():
    recs = [{"i": i, "label": "spam" if i % 5 == 0 else "ham"} for i in range(1000)]
    key = lambda r: r["label"]  # noqa: E731
    train, val, test = split_records(recs, (0.1, 0.2), seed=3, key=key)
    assert (len(train), len(val), len(test)) == (700, 100, 200)
    for part, n in ((val, 100), (test, 200)):
        assert sum(r["label"] == "spam" for r in part) == n // 5
    assert {r["i"] for r in train + val + test} == set(range(1000))
    again = split_records(recs, (0.1, 0.2), seed=3, key=key)
    assert [r["i"] for r in again[2]] == [r["i"] for r in test]


def test_source_part_equals_the_classifiers_split(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "label": "a" if i % 3 else "b"}) + "\n" for i in range(90)))
    whole = list(iter_records(SourceSpec(str(p))))
    train, _, test = split_records(whole, (0.1, 0.2), 7, key=lambda r: r["label"])
    part = list(iter_records(SourceSpec(str(p), part="train", part_split=[0.1, 0.2], part_seed=7,
                                        part_stratify="label")))
    assert [r["text"] for r in part] == [r["text"] for r in train]
    assert not {r["text"] for r in part} & {r["text"] for r in test}


def test_balance_undersamples_to_the_rarest_label():
    recs = [{"label": "ham"}] * 30 + [{"label": "spam"}] * 7
    out = balance_records(recs, lambda r: r["label"], seed=0)
    assert sum(r["label"] == "ham" for r in out) == sum(r["label"] == "spam" for r in out) == 7
