"""lmforge.data.sources: documents and records from every file kind, folders and globs, Hugging Face
datasets on local files (hub off), fingerprints, and bad sources named."""

from __future__ import annotations

import csv
import json
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from lmforge.data import arithmetic_documents, source_fingerprint, stories
from lmforge.data.sources import SourceSpec, iter_documents, iter_records
from lmforge.errors import DataError, LMForgeError


def test_builtin_sources():
    docs = list(iter_documents(SourceSpec("builtin:arithmetic", num_docs=40, seed=2)))
    assert docs == arithmetic_documents(40, seed=2)
    assert list(iter_documents(SourceSpec("builtin:stories", num_docs=50, limit=7))) == stories(7)
    with pytest.raises(DataError, match="builtin:poems"):
        list(iter_documents(SourceSpec("builtin:poems")))


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


ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
        {"text": 'a "quoted" one', "label": "pos"}]


def _write_rows(tmp_path, kind: str):
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
    recs = list(iter_records(SourceSpec(str(_write_rows(tmp_path, kind)))))
    assert [{k: r[k] for k in ("text", "label")} for r in recs] == ROWS
    assert all(str(tmp_path) in r["_where"] for r in recs)
    # iter_documents is the projection on the text field
    assert list(iter_documents(SourceSpec(str(_write_rows(tmp_path, kind))))) == [r["text"] for r in ROWS]


def test_headerless_tsv_with_named_columns_and_no_quoting(tmp_path):
    p = tmp_path / "SMSCollection"
    p.write_text('ham\t"Quoted" start, then text\nspam\tWIN now\n')
    recs = list(iter_records(SourceSpec(str(p), format="tsv", columns=["label", "text"], quoting=False)))
    assert [(r["label"], r["text"]) for r in recs] == [("ham", '"Quoted" start, then text'), ("spam", "WIN now")]
    with pytest.raises(DataError, match="unsupported file extension"):
        list(iter_records(SourceSpec(str(p))))


def test_records_from_a_hugging_face_packaged_loader(tmp_path):
    pytest.importorskip("datasets")
    p = _write_rows(tmp_path, "jsonl")
    recs = list(iter_records(SourceSpec("hf:json", data_files=str(p))))
    assert [r["label"] for r in recs] == ["pos", "neg", "pos"]


@pytest.mark.parametrize("content", ["", "text,label\n"], ids=["empty", "header-only"])
def test_empty_or_header_only_file_is_a_clear_error(tmp_path, content):
    p = tmp_path / "d.csv"
    p.write_text(content)
    with pytest.raises(DataError, match="no records found"):
        list(iter_records(SourceSpec(str(p))))
