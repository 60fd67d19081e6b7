"""Preference records in each layout, HH-RLHF splitting, errors naming file and record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.preference_format import (
    PreferencePair, hh_split, parse_preference_record, parse_preference_records,
    read_preference_file, render_pair,
)
from lmforge.errors import DataError
from lmforge.chat import render_chat
from lmforge.data.sft_format import instruction_prompt

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "preference"


def test_prompt_chosen_rejected_strings():
    p = parse_preference_record({"prompt": "Q?", "chosen": " yes", "rejected": " no"}, 3)
    assert p == PreferencePair(3, "Q?", " yes", " no")
    assert render_pair(p) == ("Q?", " yes", " no")


def test_message_lists_are_rendered_with_the_chat_template():
    rec = {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    p = parse_preference_record(rec, 0)
    assert p.prompt == rec["prompt"] and p.chosen == "Hello!" and p.rejected == "Go away."
    prompt, chosen, rejected = render_pair(p)
    assert prompt == render_chat(rec["prompt"], add_generation_prompt=True)
    assert prompt + chosen == render_chat(rec["prompt"] + rec["chosen"])
    assert prompt + rejected == render_chat(rec["prompt"] + rec["rejected"])
    assert chosen.startswith("Hello!") and chosen != "Hello!"  # the end-of-turn marker is kept


def test_implicit_prompt_conversations():
    convo = [{"role": "user", "content": "2+2?"}]
    rec = {"chosen": convo + [{"role": "assistant", "content": "4"}],
           "rejected": convo + [{"role": "assistant", "content": "5"}]}
    p = parse_preference_record(rec, 0)
    assert p.prompt == convo and (p.chosen, p.rejected) == ("4", "5")
    bad = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "4"}],
           "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "5"}]}
    with pytest.raises(DataError, match="record 0: chosen and rejected conversations must share"):
        parse_preference_record(bad, 0)


def test_book_instruction_format():
    rec = {"instruction": "Fix the spelling.", "input": "freind", "output": "friend",
           "chosen": "The word is friend.", "rejected": "Learn to spell: friend."}
    p = parse_preference_record(rec, 0)
    assert p.prompt == instruction_prompt("Fix the spelling.", "freind", "book")
    assert p.prompt.endswith("### Input:\nfreind\n\n### Response:\n")
    assert p.prompt.startswith("Below is an instruction that describes a task.")
    no_input = parse_preference_record({**rec, "input": ""}, 1)
    assert "### Input" not in no_input.prompt
    assert no_input.prompt.endswith("### Instruction:\nFix the spelling.\n\n### Response:\n")


def test_hh_rlhf_transcripts():
    shared = "\n\nHuman: Why are frogs green?\n\nAssistant: Camouflage.\n\nHuman: Really?\n\nAssistant:"
    rec = {"chosen": shared + " Yes, it hides them.", "rejected": shared + " Yes. Go away."}
    p = parse_preference_record(rec, 0)
    # The shared beginning goes beyond the marker (" Yes"), but the split is at the marker.
    assert p.prompt == shared and p.chosen == " Yes, it hides them." and p.rejected == " Yes. Go away."
    # Transcripts that diverge before the last turn: the prompt ends at the last shared marker.
    early = "\n\nHuman: Hi\n\nAssistant:"
    c = early + " Hello.\n\nHuman: Bye\n\nAssistant: Bye!"
    r = early + " What?\n\nHuman: Bye\n\nAssistant: Whatever."
    assert hh_split(c, r) == (early, " Hello.\n\nHuman: Bye\n\nAssistant: Bye!",
                              " What?\n\nHuman: Bye\n\nAssistant: Whatever.")
    with pytest.raises(DataError, match="record 4: the two transcripts share no"):
        parse_preference_record({"chosen": "\n\nAssistant: a", "rejected": "b\n\nAssistant: a"},
                                4, format="hh")


@pytest.mark.parametrize("record,message", [
    ({"prompt": "q", "rejected": "b"}, "record 7: no 'chosen' field; fields present: 'prompt', 'rejected'"),
    ({"prompt": "q", "chosen": "a"}, "record 7: no 'rejected' field"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "record 7: no 'chosen' field"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "record 7: chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "record 7: the chosen completion is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "record 7: prompt is int"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "record 7: chosen is int"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "chosen": "a", "rejected": "b"}, "record 7: the prompt conversation ends with an assistant"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "record 7: chosen must be one assistant message"),
    ({"instruction": "", "chosen": "a", "rejected": "b"}, "record 7: 'instruction' must be a non-empty string"),
    (["not", "a", "dict"], "record 7: expected a JSON object, got list"),
])
def test_bad_records_name_file_and_index(record, message):
    with pytest.raises(DataError, match="^data.json: " + message.replace("(", r"\(")):
        parse_preference_record(record, 7, where="data.json")


def test_identical_pairs_can_be_skipped_and_indices_kept():
    recs = [{"prompt": "a", "chosen": "x", "rejected": "y"},
            {"prompt": "b", "chosen": "z", "rejected": "z"},
            {"chosen": "\n\nHuman: h\n\nAssistant: same", "rejected": "\n\nHuman: h\n\nAssistant: same"},
            {"prompt": "c", "chosen": "u", "rejected": "v"}]
    with pytest.raises(DataError, match="record 1: chosen and rejected are identical"):
        parse_preference_records(recs)
    pairs, skipped = parse_preference_records(recs, skip_identical=True)
    assert [p.index for p in pairs] == [0, 3] and skipped == {1: "identical", 2: "identical"}
    recs.append({"prompt": "d", "chosen": "", "rejected": "v"})
    with pytest.raises(DataError, match="record 4: the chosen completion is empty"):
        parse_preference_records(recs, skip_identical=True)
    pairs, skipped = parse_preference_records(recs, skip_identical=True, skip_empty=True)
    assert [p.index for p in pairs] == [0, 3] and skipped[4] == "empty"


def test_read_files(tmp_path):
    recs = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "rejected": "w"}]
    jl = tmp_path / "prefs.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(DataError, match=f"^{jl}: record 1: no 'chosen' field"):
        read_preference_file(jl)
    js = tmp_path / "prefs.json"
    js.write_text(json.dumps(recs[:1]))
    pairs, _ = read_preference_file(js)
    assert pairs == [PreferencePair(0, "a", "x", "y")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1\n')
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        read_preference_file(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_preference_file(tmp_path / "missing.json")
    with pytest.raises(DataError, match="unknown preference format"):
        parse_preference_records(recs[:1], format="dpo")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared preference data not present")
def test_real_files_parse():
    book, skipped = read_preference_file(SHARED / "instruction-data-with-preference.json",
                                         skip_identical=True)
    assert len(book) + len(skipped) == 1100 and list(skipped.values()) == ["identical"] * 6
    assert all(p.prompt.endswith("### Response:\n") for p in book)
    hh, skipped = read_preference_file(SHARED / "hh_rlhf_harmless_base_test.jsonl", skip_empty=True)
    assert len(hh) == 2308 and skipped == {86: "empty", 516: "empty", 925: "empty", 1103: "empty"}
    assert all(p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:") for p in hh)
    last_turn = sum("\n\nHuman:" not in p.chosen and "\n\nHuman:" not in p.rejected for p in hh)
    assert last_turn >= 2300  # a handful of transcripts diverge before their last turn
