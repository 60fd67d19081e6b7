"""Records from every file kind, label mapping, stratified splits, classification examples and
the step sampler (determinism, epoch coverage, rank/micro slicing)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.data.splits import balance_records, label_set, split_records
from lmforge.tasks.classify import collate_classification, encode_classification
from lmforge.data.sampler import ExampleBatches, StepSampler
from lmforge.data.sources import SourceSpec, iter_documents, iter_records
from lmforge.errors import DataError
from lmforge.tokenizer import CharTokenizer

ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
        {"text": 'a "quoted" one', "label": "pos"}]


def _write(tmp_path, kind: str):
    p = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        p.write_text(json.dumps(ROWS))
    elif kind in ("csv", "tsv"):
        import csv

        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, ["text", "label"], delimiter="," if kind == "csv" else "\t")
            w.writeheader()
            w.writerows(ROWS)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), p)
    return p


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_records_from_every_file_kind(tmp_path, kind):
    recs = list(iter_records(SourceSpec(str(_write(tmp_path, kind)))))
    assert [{k: r[k] for k in ("text", "label")} for r in recs] == ROWS
    assert all(str(tmp_path) in r["_where"] for r in recs)
    # iter_documents is the projection on the text field
    assert list(iter_documents(SourceSpec(str(_write(tmp_path, kind))))) == [r["text"] for r in ROWS]


def test_headerless_tsv_with_named_columns_and_no_quoting(tmp_path):
    p = tmp_path / "SMSCollection"
    p.write_text('ham\t"Quoted" start, then text\nspam\tWIN now\n')
    recs = list(iter_records(SourceSpec(str(p), format="tsv", columns=["label", "text"], quoting=False)))
    assert [(r["label"], r["text"]) for r in recs] == [("ham", '"Quoted" start, then text'), ("spam", "WIN now")]
    with pytest.raises(DataError, match="unsupported file extension"):
        list(iter_records(SourceSpec(str(p))))


def test_records_from_a_hugging_face_packaged_loader(tmp_path):
    pytest.importorskip("datasets")
    p = _write(tmp_path, "jsonl")
    recs = list(iter_records(SourceSpec("hf:json", data_files=str(p))))
    assert [r["label"] for r in recs] == ["pos", "neg", "pos"]


@pytest.mark.parametrize("content", ["", "text,label\n"], ids=["empty", "header-only"])
def test_empty_or_header_only_file_is_a_clear_error(tmp_path, content):
    p = tmp_path / "d.csv"
    p.write_text(content)
    with pytest.raises(DataError, match="no records found"):
        list(iter_records(SourceSpec(str(p))))


def test_label_set_sorts_integers_numerically_and_strings_alphabetically():
    assert label_set(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_set(["spam", "ham"]) == ["ham", "spam"]


def test_label_mapping_round_trip_and_unseen_label():
    tok = CharTokenizer.train(["good bad film quoted one a\""])
    names = ["neg", "pos"]
    ex = encode_classification([dict(r, _where=f"r{i}") for i, r in enumerate(ROWS)], tok, "text", "label",
                               names, max_length=5)
    assert [names[i] for i in ex.labels] == [r["label"] for r in ROWS]
    assert ex.truncated == 3  # all three texts are longer than 5 characters
    assert all(len(s) <= 5 for s in ex.ids)
    with pytest.raises(DataError, match="never seen in training"):
        encode_classification([{"text": "x", "label": "meh", "_where": "f:3"}], tok, "text", "label", names, 8)


@pytest.mark.parametrize("bad", [{"text": 3, "label": "pos"}, {"label": "pos"}, {"text": "x"},
                                 {"text": "x", "label": None}])
def test_bad_records_name_the_problem(bad):
    tok = CharTokenizer.train(["x"])
    with pytest.raises(DataError, match="text field|label field"):
        encode_classification([dict(bad, _where="f.jsonl:7")], tok, "text", "label", ["neg", "pos"], 8)


def test_integer_and_string_labels_are_the_same_label():
    tok = CharTokenizer.train(["ab"])
    ex = encode_classification([{"text": "a", "label": 1}, {"text": "b", "label": "0"}], tok, "text", "label",
                               ["0", "1"], 4)
    assert ex.labels == [1, 0]


def test_collate_pads_to_the_micro_batch_and_masks():
    b = collate_classification([[5, 6, 7], [8]], [1, 0], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]


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


# ------------------------------------------------------------------------------ sampler
def test_sampler_is_a_pure_function_of_the_step():
    a = StepSampler(37, micro_batch=4, grad_accum=2, world=1, seed=5)
    b = StepSampler(37, micro_batch=4, grad_accum=2, world=1, seed=5)
    assert [a.global_indices(s).tolist() for s in (9, 3, 0)] == [b.global_indices(s).tolist() for s in (9, 3, 0)]
    assert a.global_indices(3).tolist() != StepSampler(37, 4, 2, 1, seed=6).global_indices(3).tolist()


def test_sampler_sees_every_example_once_per_epoch():
    s = StepSampler(30, micro_batch=5, grad_accum=1, world=2, seed=1)  # 10 per step, 3 steps per epoch
    first = torch.cat([s.global_indices(i) for i in range(3)]).tolist()
    second = torch.cat([s.global_indices(i) for i in range(3, 6)]).tolist()
    assert sorted(first) == sorted(second) == list(range(30))
    assert first != second  # a fresh permutation per epoch
    odd = StepSampler(7, micro_batch=3, seed=2)  # steps straddle epoch boundaries
    stream = torch.cat([odd.global_indices(i) for i in range(7)]).tolist()  # 21 = 3 epochs
    for e in range(3):
        assert sorted(stream[7 * e:7 * e + 7]) == list(range(7))


def test_rank_and_micro_slices_tile_the_global_batch():
    s = StepSampler(100, micro_batch=3, grad_accum=2, world=2, seed=0)
    g = s.global_indices(4)
    parts = [s.indices(4, m, r) for m in range(2) for r in range(2)]
    assert torch.cat(parts).tolist() == g.tolist()
    # 2 ranks x B/2 see the same examples as 1 rank x B
    one = StepSampler(100, micro_batch=6, grad_accum=2, world=1, seed=0)
    assert sorted(one.global_indices(4).tolist()) == sorted(g.tolist())


def test_example_batches_collate_this_ranks_slice():
    s = StepSampler(10, micro_batch=2, grad_accum=1, world=2, seed=0)
    seen = []
    src = ExampleBatches(s, lambda idx: seen.append(idx) or {"n": len(idx)}, rank=1)
    src.batch(0, 0)
    assert seen == [s.indices(0, 0, 1).tolist()]
