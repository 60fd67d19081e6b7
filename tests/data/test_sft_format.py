"""SFT data formats: prompt templates, which tokens train (hand-made examples), OpenAssistant
paths, length policies and their counts, bad records, and the real files in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.sft_format import (alpaca_fields, 
    IGNORE,
    SFTExample,
    alpaca_messages,
    prompt_response,
    build_examples,
    fit_length,
    oasst_paths,
    tokenize_chat,
    tokenize_prompt_response,
)
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import ByteTokenizer, CharTokenizer

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
REC = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


def trained_text(tok, ex: SFTExample) -> str:
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE], skip_special_tokens=False)


def test_templates():
    prompt, response = prompt_response(REC, "book")
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert response == "5"
    no_input, _ = prompt_response({**REC, "input": ""}, "book")
    assert "### Input" not in no_input and no_input.endswith("### Instruction:\nAdd the numbers.\n\n### Response:\n")
    stanford, _ = prompt_response(REC, "alpaca")
    assert stanford.startswith("Below is an instruction that describes a task, paired with an input")
    assert alpaca_messages(REC) == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                    {"role": "assistant", "content": "5"}]


def test_only_the_response_and_eos_train():
    tok = ByteTokenizer()
    ex = tokenize_prompt_response(tok, "Q: hi\nA: ", "hello")
    assert ex.input_ids == tok.encode("Q: hi\nA: hello") + [tok.eos_id]
    assert ex.labels == [IGNORE] * len("Q: hi\nA: ") + tok.encode("hello") + [tok.eos_id]
    everything = tokenize_prompt_response(tok, "Q: hi\nA: ", "hello", train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_every_assistant_turn_trains_in_a_chat():
    tok = ByteTokenizer()  # lmforge's chat format: <|role|>\n...<|end|>\n
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    ex = tokenize_chat(tok, msgs)
    assert trained_text(tok, ex) == "Hello!<|end|>\nParis.<|end|>\n"
    assert tok.decode(ex.input_ids, skip_special_tokens=False).startswith("<|system|>\nBe brief.<|end|>")
    assert tokenize_chat(tok, msgs, train_on_prompt=True).labels == ex.input_ids


def test_length_policies_and_counts():
    ex = SFTExample(list(range(10)), [IGNORE] * 6 + [6, 7, 8, 9])
    cut, what = fit_length(ex, 8, "truncate")
    assert what == "truncated" and cut.input_ids == list(range(8)) and cut.labels[-2:] == [6, 7]
    assert fit_length(ex, 8, "drop") == (None, "dropped_too_long")
    assert fit_length(ex, 6, "truncate") == (None, "dropped_nothing_to_train")  # only the prompt is left
    assert fit_length(ex, 10)[1] == "kept"
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ABRW#:.\n,")
    records = [{"instruction": "a", "output": "b"}, {"instruction": "a" * 300, "output": "c"}]
    for overflow, want in (("truncate", {"kept": 1, "dropped_nothing_to_train": 1}),
                           ("drop", {"kept": 1, "dropped_too_long": 1})):
        counts = build_examples(records, tok, "alpaca", "book", max_length=200, overflow=overflow)
        assert {k: v for k, v in counts.as_dict().items() if v} == want and len(counts.examples) == 1


TREE = {"prompt": {"role": "prompter", "text": "Q1", "replies": [
    {"role": "assistant", "text": "A1-second", "rank": 1, "replies": []},
    {"role": "assistant", "text": "A1-best", "rank": 0, "replies": [
        {"role": "prompter", "text": "Q2", "replies": [
            {"role": "assistant", "text": "A2", "rank": 0, "replies": []},
            {"role": "assistant", "text": "A2-deleted", "rank": 1, "deleted": True, "replies": []}]},
        {"role": "prompter", "text": "Q2-unanswered", "replies": []}]},
]}}


def test_oasst_paths():
    best = oasst_paths(TREE, "rank0")
    assert [[m["content"] for m in p] for p in best] == [["Q1", "A1-best", "Q2", "A2"]]
    assert [m["role"] for m in best[0]] == ["user", "assistant", "user", "assistant"]
    every = [[m["content"] for m in p] for p in oasst_paths(TREE, "all")]
    assert every == [["Q1", "A1-best", "Q2", "A2"], ["Q1", "A1-best"], ["Q1", "A1-second"]]


def test_empty_alpaca_response_is_dropped_and_counted():
    counts = build_examples([REC, {"instruction": "x", "output": "  "}], ByteTokenizer(), "alpaca", "book")
    assert counts.kept == 1 and counts.dropped_nothing_to_train == 1
    with pytest.raises(DataError, match="output: empty response"):  # asked for directly, it is an error
        alpaca_fields({"instruction": "x", "output": "  "})


@pytest.mark.parametrize("record,match", [
    ({"instruction": "x"}, "missing field 'output'"),
    ({"instruction": "x", "output": 3}, "output: expected a string"),
])
def test_bad_alpaca_records(record, match):
    with pytest.raises(DataError, match=match):
        build_examples([REC, record], ByteTokenizer(), "alpaca", "book")


@pytest.mark.parametrize("messages,match", [
    ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": "x"}], "ends with a user turn"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], "no non-empty assistant"),
    ("hello", "non-empty list"),
])
def test_bad_chats(messages, match):
    with pytest.raises(DataError, match=f"record 0.*{match}"):
        build_examples([{"messages": messages}], ByteTokenizer(), "messages", "chat")


def test_a_template_that_fails_is_a_data_error():
    tok = ByteTokenizer().configure(chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(DataError, match="record 0: chat template: no system role"):
        build_examples([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
                       tok, "messages", "chat")
    with pytest.raises(ConfigError, match="sft.template"):
        build_examples([], tok, "messages", "book")


@pytest.mark.skipif(not (DATA / "instruction_small").is_dir(), reason="../shared/data not present")
def test_real_files():
    tok = ByteTokenizer()
    book = json.loads((DATA / "instruction_small" / "instruction-data.json").read_text())
    counts = build_examples(book, tok, "alpaca", "book", max_length=1024)
    assert counts.kept + counts.truncated == 1100 and all(e.n_trained > 0 for e in counts.examples)
    trees = [json.loads(line) for line in open(DATA / "chat" / "oasst_en_100_trees.jsonl")]
    rank0 = build_examples(trees, tok, "oasst", "chat", max_length=100_000, oasst_mode="rank0")
    every = build_examples(trees, tok, "oasst", "chat", max_length=100_000, oasst_mode="all")
    assert rank0.kept == 100 and every.kept > 300
    ex = rank0.examples[0]
    assert trained_text(tok, ex).count("<|end|>") == sum(1 for m in oasst_paths(trees[0])[0]
                                                          if m["role"] == "assistant")
