"""Errors that must not mislead: the line in the file (not the index after shuffling), why no
SFT example is left, a bad --max-length, a null "rejected"."""

from __future__ import annotations

import json

import pytest
import yaml

from lmforge.cli import main


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.err


def _messages(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                         {"role": "assistant", "content": f"it is {i + 1}"}]}


def _sft_yaml(tiny_dict, tmp_path, records: list[dict], **objective) -> str:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tiny_dict("sft", task="sft", objective={"format": "messages", "template": "chat", "max_length": 32,
                                                  **objective})
    cfg["data"]["sources"] = [{"path": str(data)}]
    cfg["data"]["val_fraction"] = 0.2
    cfg["model"]["context_length"] = 64
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_messages_error_names_the_line_in_the_file(tiny_dict, tmp_path, capsys):
    records = [_messages(i) for i in range(40)]
    records[4] = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    code, err = _cli(capsys, "train", "-c", _sft_yaml(tiny_dict, tmp_path, records), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "chats.jsonl" in err and ("line 5" in err or ":5" in err), err


def test_sft_every_prompt_too_long_says_so(tiny_dict, tmp_path, capsys):
    records = [_messages(i) for i in range(20)]
    code, err = _cli(capsys, "train", "-c", _sft_yaml(tiny_dict, tmp_path, records, max_length=4), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "0 training and 0 validation examples" in err and "max_length=4" in err, err


@pytest.mark.parametrize("value", ["-1", "0", "1"])
def test_classify_max_length_validated_before_loading(tmp_path, capsys, value):
    code, err = _cli(capsys, "classify", "--model", tmp_path / "missing", "--text", "x", "--max-length", value)
    assert code == 2 and f"--max-length: got {value}" in err and len(err.strip().splitlines()) == 1


def test_dpo_null_rejected_is_called_null():
    from lmforge.data.preference_format import parse_preference_record
    from lmforge.errors import DataError

    with pytest.raises(DataError, match="'rejected' is null"):
        parse_preference_record({"prompt": "q", "chosen": "a", "rejected": None}, 3, "auto", "pairs.jsonl")
