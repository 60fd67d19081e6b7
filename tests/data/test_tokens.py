"""lmforge.data.tokens: the token store (built once, reused, invalidated, never a partial build), document splits, and the window samplers.

All offline: Hugging Face `datasets` is only used on local files with the hub switched off.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from lmforge.data import (
    SourceSpec, TokenStore, arithmetic_documents, check_fits, iter_documents, num_sequential_windows, random_windows, sequential_windows,
)
from lmforge.errors import DataError
from lmforge.tokenizer import ByteTokenizer, CharTokenizer


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


