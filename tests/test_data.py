"""Tests of lmforge.data: built-in corpora, document sources, the token store and windows.

All offline: Hugging Face `datasets` is only used on local files with the hub switched off.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data import (
    SourceSpec,
    TokenStore,
    arithmetic,
    arithmetic_documents,
    arithmetic_problems,
    arithmetic_text,
    check_fits,
    iter_documents,
    num_sequential_windows,
    random_windows,
    sequential_windows,
    source_fingerprint,
    stories,
)
from lmforge.errors import DataError, LMForgeError

try:
    from lmforge.tokenizer import ByteTokenizer, CharTokenizer
except ImportError:  # the tokenizer module is written in parallel; a stand-in with its interface
    import hashlib

    class ByteTokenizer:  # type: ignore[no-redef]
        eos_id = 256

        @property
        def vocab_size(self) -> int:
            return 258

        def encode(self, text, add_bos=False, add_eos=False):
            return list(text.encode("utf-8")) + ([self.eos_id] if add_eos else [])

        def encode_batch(self, texts, add_bos=False, add_eos=False):
            return [self.encode(t, add_bos, add_eos) for t in texts]

        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

        def fingerprint(self):
            return "fake-byte"

    class CharTokenizer:  # type: ignore[no-redef]
        def __init__(self, chars):
            self.chars = sorted(set(chars))
            self.index = {c: i + 1 for i, c in enumerate(self.chars)}
            self.eos_id = 0

        @classmethod
        def train(cls, texts):
            return cls("".join(texts))

        @property
        def vocab_size(self):
            return len(self.chars) + 1

        def encode_batch(self, texts, add_bos=False, add_eos=False):
            return [[self.index[c] for c in t] for t in texts]

        def fingerprint(self):
            return hashlib.sha256("".join(self.chars).encode()).hexdigest()


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


class CountingTokenizer:
    """Wraps a tokenizer and counts encode_batch calls (to see whether a build re-tokenized)."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner = inner
        self.calls = 0
        self.fail_after = fail_after

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def encode_batch(self, texts, add_bos=False, add_eos=False):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return self.inner.encode_batch(texts)


class BigVocabTokenizer:
    """A fake tokenizer whose vocabulary does not fit uint16."""

    eos_id = 69_999
    vocab_size = 70_000

    def encode_batch(self, texts, add_bos=False, add_eos=False):
        return [[60_000 + ord(c) % 1000 for c in t] for t in texts]

    def fingerprint(self):
        return "big-vocab"


# --------------------------------------------------------------------------------------------
# Built-in corpora
# --------------------------------------------------------------------------------------------

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


def test_builtin_sources():
    docs = list(iter_documents(SourceSpec("builtin:arithmetic", num_docs=40, seed=2)))
    assert docs == arithmetic_documents(40, seed=2)
    assert list(iter_documents(SourceSpec("builtin:stories", num_docs=50, limit=7))) == stories(7)
    with pytest.raises(DataError, match="builtin:poems"):
        list(iter_documents(SourceSpec("builtin:poems")))


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


def test_arithmetic_options_on_other_sources_are_an_error():
    with pytest.raises(DataError, match="builtin:stories: ops applies to builtin:arithmetic only"):
        SourceSpec("builtin:stories", ops="+")
    with pytest.raises(DataError, match="data.jsonl: max_operand applies to builtin:arithmetic only"):
        SourceSpec("data.jsonl", max_operand=9)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

DOCS = ["The first document.", "Second one, with a comma.", "Third:\nmulti-line text.",
        "Fourth \"quoted\" document."]


def _write(tmp_path, fmt: str, docs=DOCS, field="body") -> str:
    if fmt == "txt":
        p = tmp_path / "c.txt"
        p.write_text("\n\n".join(docs))
    elif fmt == "jsonl":
        p = tmp_path / "c.jsonl"
        p.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)))
    elif fmt == "json":
        p = tmp_path / "c.json"
        p.write_text(json.dumps([{"id": i, field: d} for i, d in enumerate(docs)], indent=1))
    elif fmt in ("csv", "tsv"):
        p = tmp_path / f"c.{fmt}"
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["id", field])
            w.writerows([i, d] for i, d in enumerate(docs))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "c.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), p)
    else:
        raise AssertionError(fmt)
    return str(p)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_structured_sources_with_chosen_field(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    assert list(iter_documents(SourceSpec(path, text_field="body"))) == DOCS
    assert list(iter_documents(SourceSpec(path, text_field="body", limit=2))) == DOCS[:2]
    with pytest.raises(DataError) as e:
        list(iter_documents(SourceSpec(path, text_field="text")))
    msg = str(e.value)
    assert "'text'" in msg and "'body'" in msg and "'id'" in msg and "\n" not in msg


def test_plain_text_whole_file_or_separated(tmp_path):
    path = _write(tmp_path, "txt")
    whole = list(iter_documents(SourceSpec(path)))
    assert whole == ["\n\n".join(DOCS)]
    assert list(iter_documents(SourceSpec(path, doc_separator="\n\n"))) == DOCS
    p2 = tmp_path / "s.md"
    p2.write_text("one<|endoftext|>\ntwo\n<|endoftext|>  <|endoftext|>three")
    assert list(iter_documents(SourceSpec(str(p2), doc_separator="<|endoftext|>"))) == [
        "one", "two", "three"]


def test_folder_and_glob_are_sorted(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("bee")
    (d / "a.txt").write_text("ay")
    (d / "c.jsonl").write_text(json.dumps({"text": "see"}) + "\n")
    (d / "notes.bin").write_bytes(b"\x00")  # unsupported files in a folder are skipped
    assert list(iter_documents(SourceSpec(str(d)))) == ["ay", "bee", "see"]
    assert list(iter_documents(SourceSpec(str(d / "*.txt")))) == ["ay", "bee"]


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        list(iter_documents(SourceSpec(str(tmp_path / "nope.txt"))))
    with pytest.raises(DataError, match="glob matched no files"):
        list(iter_documents(SourceSpec(str(tmp_path / "*.jsonl"))))
    bad = tmp_path / "x.docx"
    bad.write_text("hi")
    with pytest.raises(DataError, match="unsupported file extension"):
        list(iter_documents(SourceSpec(str(bad))))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    with pytest.raises(DataError, match="empty corpus"):
        list(iter_documents(SourceSpec(str(empty))))
    blank = _write(tmp_path, "jsonl", docs=["", "   "], field="text")
    with pytest.raises(DataError, match="empty corpus"):
        list(iter_documents(SourceSpec(blank)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        list(iter_documents(SourceSpec(str(broken))))
    with pytest.raises(DataError, match="limit"):
        SourceSpec("builtin:stories", limit=0)
    # every data error is an LMForgeError with a one-line message
    try:
        list(iter_documents(SourceSpec(str(tmp_path / "nope.txt"))))
    except LMForgeError as e:
        assert "\n" not in str(e)


def test_fingerprint_tracks_files_and_spec(tmp_path):
    path = _write(tmp_path, "jsonl")
    spec = SourceSpec(path, text_field="body")
    fp = source_fingerprint(spec)
    assert fp == source_fingerprint(SourceSpec(path, text_field="body"))
    assert fp != source_fingerprint(SourceSpec(path, text_field="body", limit=2))
    with open(path, "a") as fh:
        fh.write(json.dumps({"body": "one more"}) + "\n")
    assert source_fingerprint(spec) != fp
    b = SourceSpec("builtin:stories", num_docs=10)
    assert source_fingerprint(b) == source_fingerprint(SourceSpec("builtin:stories", num_docs=10))
    assert source_fingerprint(b) != source_fingerprint(SourceSpec("builtin:stories", num_docs=11))


def test_hf_datasets_on_local_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, flag):
            monkeypatch.setattr(datasets.config, flag, True)
    path = _write(tmp_path, "jsonl")
    spec = SourceSpec("hf:json", data_files=path, text_field="body")
    assert list(iter_documents(spec)) == DOCS
    streamed = SourceSpec("hf:json", data_files=path, text_field="body", streaming=True, limit=3)
    assert list(iter_documents(streamed)) == DOCS[:3]
    with pytest.raises(DataError) as e:
        list(iter_documents(SourceSpec("hf:json", data_files=path, text_field="content")))
    assert "'content'" in str(e.value) and "'body'" in str(e.value)
    with pytest.raises(DataError, match="matched no files"):
        list(iter_documents(SourceSpec("hf:json", data_files=str(tmp_path / "none*.jsonl"))))


def test_hf_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"lmforge\[data\]"):
        list(iter_documents(SourceSpec("hf:owner/name")))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch):
    """No host outside the machine is contacted: the hub endpoint is a closed local port."""
    pytest.importorskip("datasets")
    import time

    from lmforge.data.sources import hub_reachable

    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub.*HF_DATASETS_OFFLINE=1"):
        list(iter_documents(SourceSpec("hf:owner/name")))
    assert time.monotonic() - t0 < 5
    import socket

    with socket.socket() as server:  # a listening port is reachable
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")


# --------------------------------------------------------------------------------------------
# Token store
# --------------------------------------------------------------------------------------------


def _jsonl_docs(tmp_path, n=50, name="docs.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(json.dumps({"text": f"document number {i} says hello {i * 7}."}) + "\n"
                         for i in range(n)))
    return str(p)


def test_store_built_once_reused_and_invalidated(tmp_path):
    path = _jsonl_docs(tmp_path)
    cache = tmp_path / "cache"
    tok = CountingTokenizer(ByteTokenizer())
    s1 = TokenStore.build([SourceSpec(path)], tok, cache, progress=False, batch_docs=16)
    assert tok.calls == 4  # 50 documents in batches of 16
    assert s1.train.dtype == np.uint16 and isinstance(s1.train, np.memmap)
    assert s1.meta["n_docs"] == 50 and s1.meta["tokenizer"] == tok.fingerprint()
    assert s1.meta["train_tokens"] == len(s1.train) and s1.meta["val_tokens"] == len(s1.val)
    s2 = TokenStore.build([SourceSpec(path)], tok, cache, progress=False, batch_docs=16)
    assert tok.calls == 4  # reused: no tokenization
    assert s2.path == s1.path and np.array_equal(s2.train, s1.train)
    # data changed -> new key, rebuilt
    with open(path, "a") as fh:
        fh.write(json.dumps({"text": "a brand new document."}) + "\n")
    s3 = TokenStore.build([SourceSpec(path)], tok, cache, progress=False, batch_docs=16)
    assert tok.calls == 8 and s3.path != s1.path and s3.meta["n_docs"] == 51
    # tokenizer changed -> new key, rebuilt
    char = CountingTokenizer(CharTokenizer.train([open(path).read()]))
    s4 = TokenStore.build([SourceSpec(path)], char, cache, progress=False)
    assert char.calls == 1 and s4.path not in (s1.path, s3.path)
    # split settings are part of the key
    s5 = TokenStore.build([SourceSpec(path)], tok, cache, progress=False, val_fraction=0.2)
    assert s5.path != s3.path and s5.meta["n_val_docs"] == 10
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_store_never_reuses_a_partial_build(tmp_path):
    path = _jsonl_docs(tmp_path, n=40)
    cache = tmp_path / "cache"
    dying = CountingTokenizer(ByteTokenizer(), fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        TokenStore.build([SourceSpec(path)], dying, cache, progress=False, batch_docs=8)
    assert list(cache.iterdir()) == []  # the temp folder was removed, nothing published
    # a build killed without cleanup (temp folder of a dead pid) or a truncated store
    tok = CountingTokenizer(ByteTokenizer())
    key = TokenStore.cache_key([SourceSpec(path)], tok)
    import socket

    stale = cache / f".tmp-{key}-{socket.gethostname()}-999999999-abcd1234"
    stale.mkdir()
    (stale / "all.bin").write_bytes(b"\x01\x00" * 10)
    s = TokenStore.build([SourceSpec(path)], tok, cache, progress=False)
    assert tok.calls == 1 and not stale.exists()
    with open(s.path / "train.bin", "r+b") as fh:
        fh.truncate(10)
    del s
    s = TokenStore.build([SourceSpec(path)], tok, cache, progress=False)
    assert tok.calls == 2 and len(s.train) == s.meta["train_tokens"] > 5


def test_eos_separates_documents_and_dtype(tmp_path):
    p = tmp_path / "two.jsonl"
    p.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "cde"}) + "\n")
    tok = ByteTokenizer()
    s = TokenStore.build([SourceSpec(str(p))], tok, tmp_path / "c", val_fraction=0.0,
                         progress=False)
    eos = tok.eos_id
    assert eos is not None
    assert s.train.tolist() == [*b"ab", eos, *b"cde", eos]
    assert len(s.val) == 0 and s.meta["split"] == "none"
    big = TokenStore.build([SourceSpec(str(p))], BigVocabTokenizer(), tmp_path / "c",
                           val_fraction=0.0, progress=False)
    assert big.train.dtype == np.uint32 and big.meta["dtype"] == "uint32"
    assert big.train[-1] == 69_999 and big.train.max() == 69_999


def test_split_by_document_is_disjoint(tmp_path):
    path = _jsonl_docs(tmp_path, n=60)
    tok = ByteTokenizer()
    s = TokenStore.build([SourceSpec(path)], tok, tmp_path / "c", val_fraction=0.1, seed=5,
                         progress=False)
    assert s.meta["split"] == "documents" and s.meta["n_val_docs"] == 6

    def docs_of(arr):
        text = _decode_stream(tok, arr)
        return [d for d in text if d]

    train, val = docs_of(s.train), docs_of(s.val)
    assert len(val) == 6 and len(train) == 54
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(iter_documents(SourceSpec(path)))
    other = TokenStore.build([SourceSpec(path)], tok, tmp_path / "c", val_fraction=0.1, seed=6,
                             progress=False)
    assert set(docs_of(other.val)) != set(val)  # the seed picks the documents


def _decode_stream(tok, arr) -> list[str]:
    ids = [int(i) for i in arr]
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(_decode(tok, cur))
            cur = []
        else:
            cur.append(i)
    return docs


def test_single_document_splits_token_stream(tmp_path):
    p = tmp_path / "shakespeare.txt"
    p.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    s = TokenStore.build([SourceSpec(str(p))], ByteTokenizer(), tmp_path / "c", progress=False)
    total = s.meta["train_tokens"] + s.meta["val_tokens"]
    assert s.meta["split"] == "tokens" and "token stream" in s.meta["split_note"]
    assert s.meta["train_tokens"] == int(total * 0.9)
    whole = np.concatenate([np.asarray(s.train), np.asarray(s.val)])
    assert _decode(ByteTokenizer(), whole[:-1]) == p.read_text()


def test_separate_validation_source(tmp_path):
    tok = ByteTokenizer()
    s = TokenStore.build([SourceSpec("builtin:arithmetic", num_docs=30)], tok, tmp_path / "c",
                         val_sources=[SourceSpec("builtin:arithmetic", num_docs=5, seed=9)],
                         progress=False)
    assert s.meta["split"] == "val_sources"
    assert _decode_stream(tok, s.train) == arithmetic_documents(30)
    assert _decode_stream(tok, s.val) == arithmetic_documents(5, seed=9)


def test_empty_corpus_raises(tmp_path):
    p = tmp_path / "blank.txt"
    p.write_text("   \n")
    with pytest.raises(DataError, match="empty corpus"):
        TokenStore.build([SourceSpec(str(p))], ByteTokenizer(), tmp_path / "c", progress=False)
    assert not [d for d in (tmp_path / "c").iterdir() if not d.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_corpus_shorter_than_a_window(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("hello world")
    s = TokenStore.build([SourceSpec(str(p))], ByteTokenizer(), tmp_path / "c", progress=False)
    with pytest.raises(DataError) as e:
        random_windows(s.val, 64, 4, torch.Generator().manual_seed(0), split_name="val")
    msg = str(e.value)
    assert msg.startswith("val split has ") and f"{len(s.val)} tokens" in msg and "65" in msg
    with pytest.raises(DataError, match="train split has 10 tokens"):
        check_fits(np.zeros(10, np.uint16), 10, "train")
    assert check_fits(np.zeros(11, np.uint16), 10, "train") == 11
    with pytest.raises(DataError):
        next(sequential_windows(np.zeros(5, np.uint16), 8, 2))


def test_random_windows_shapes_and_shift():
    tokens = (np.arange(5000) % 65_000).astype(np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = random_windows(tokens, 32, 16, g)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # tokens are consecutive integers
    assert x.is_contiguous() and y.is_contiguous()
    x2, _ = random_windows(tokens, 32, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # seeded
    # exactly one possible start when the stream is context + 1 long
    x, y = random_windows(tokens[:33], 32, 4, g)
    assert (x == torch.arange(32)).all() and (y == torch.arange(1, 33)).all()
    # starts cover the whole range [0, len - context - 1]
    starts = set()
    for _ in range(50):
        x, _ = random_windows(tokens[:40], 32, 16, g)
        starts.update(x[:, 0].tolist())
    assert starts == set(range(8))


def test_sequential_windows_cover_the_stream():
    tokens = np.arange(1000, dtype=np.uint32)
    batches = list(sequential_windows(tokens, 64, 4))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    k = num_sequential_windows(1000, 64)
    assert xs.shape == (k, 64) == (15, 64) and [len(x) for x, _ in batches] == [4, 4, 4, 3]
    assert torch.equal(ys.flatten(), torch.arange(1, 1 + k * 64))  # every target once, in order
    assert 1000 - 1 - k * 64 < 64  # the unscored tail is shorter than a window
    strided = torch.cat([x for x, _ in sequential_windows(tokens, 64, 8, stride=16)])
    assert strided[:, 0].tolist() == list(range(0, 1000 - 64, 16))
    assert len(list(sequential_windows(tokens, 64, 4, max_batches=2))) == 2


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 400), context=st.integers(1, 64), batch=st.integers(1, 8),
       stride=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_window_shapes_property(n, context, batch, stride, seed):
    tokens = np.arange(n, dtype=np.uint16)
    if n < context + 1:
        with pytest.raises(DataError):
            random_windows(tokens, context, batch, torch.Generator().manual_seed(seed))
        return
    x, y = random_windows(tokens, context, batch, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (batch, context)
    assert torch.equal(y, x + 1) and int(x.min()) >= 0 and int(y.max()) <= n - 1
    seq = list(sequential_windows(tokens, context, batch, stride=stride))
    total = sum(len(bx) for bx, _ in seq)
    assert total == num_sequential_windows(n, context, stride) >= 1
    for bx, by in seq:
        assert bx.shape[1] == by.shape[1] == context and 1 <= len(bx) <= batch
        assert torch.equal(by, bx + 1)


def test_messages_field_is_rendered_with_the_chat_template(tmp_path):
    from lmforge.chat import render_chat

    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello!"}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    docs = list(iter_documents(SourceSpec(str(f), text_field="messages")))
    assert docs == [render_chat(msgs)]
    assert docs[0] == "<|system|>\nBe kind.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello!<|end|>\n"
    f.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="wizard"):
        list(iter_documents(SourceSpec(str(f), text_field="messages")))


def test_store_of_an_imported_tokenizer_has_no_post_processor_tokens_per_document(tmp_path):
    """Imported tokenizers add [CLS]/[SEP] (BERT) by default in encode(); the token store separates
    documents with eos only, as before."""
    from lmforge.tokenizer import BPETokenizer, HFTokenizer
    from tokenizers import processors

    bpe = BPETokenizer.train(["the cat sat on the mat"] * 20, vocab_size=280, min_frequency=1)
    backend = bpe._tk
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A <|eos|>", special_tokens=[("<|bos|>", bpe.bos_id), ("<|eos|>", bpe.eos_id)])
    tok = HFTokenizer.from_str(backend.to_str())
    assert tok.encode("the cat") == [tok.bos_id, *tok.encode("the cat", add_special_tokens=False), tok.eos_id]
    path = tmp_path / "docs.jsonl"
    docs = ["the cat", "sat on the mat"]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    store = TokenStore.build([SourceSpec(str(path))], tok, tmp_path / "cache", val_fraction=0.0, progress=False)
    want = [i for d in docs for i in tok.encode(d, add_special_tokens=False) + [tok.eos_id]]
    assert list(map(int, store.train)) == want
