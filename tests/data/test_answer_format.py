"""GSM8K final answers and prompt/answer records."""

from __future__ import annotations

import json

import pytest

from lmforge.data.answer_format import (
    gsm8k_final_answer, parse_prompt_answer_records, read_prompt_answer_file,
)
from lmforge.errors import DataError


@pytest.mark.parametrize("solution,final", [
    ("48/2 = <<48/2=24>>24\n#### 72", "72"),
    ("so\n#### 1,080", "1080"),
    ("#### -7", "-7"),
    ("#### $5", "5"),
    ("a #### 3 then\n#### 4", "4"),
])
def test_gsm8k_final_answer(solution, final):
    assert gsm8k_final_answer(solution) == final


def test_gsm8k_errors_name_the_record():
    with pytest.raises(DataError, match="record 1: the answer has no '#### <final answer>' line"):
        parse_prompt_answer_records([{"question": "q", "answer": "#### 1"},
                                     {"question": "q", "answer": "42"}], where="train.jsonl")
    with pytest.raises(DataError, match="nothing follows"):
        gsm8k_final_answer("#### ")


def test_records_auto_and_fields(tmp_path):
    recs = parse_prompt_answer_records([{"question": "How many?", "answer": "2+2=4\n#### 4"}])
    assert recs == [{"prompt": "How many?", "answer": "4", "solution": "2+2=4\n#### 4"}]
    recs = parse_prompt_answer_records([{"q": "What is 2+3?", "a": 5}], "q", "a")
    assert recs == [{"prompt": "What is 2+3?", "answer": "5"}]
    with pytest.raises(DataError, match="record 0: no 'answer' field; fields present: 'prompt'"):
        parse_prompt_answer_records([{"prompt": "x"}])
    with pytest.raises(DataError, match="'prompt' must be a non-empty string"):
        parse_prompt_answer_records([{"prompt": "", "answer": "1"}])
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "#### 9"}) + "\n")
    assert read_prompt_answer_file(f)[0]["answer"] == "9"
    txt = tmp_path / "gsm.txt"
    txt.write_text("")
    with pytest.raises(DataError, match="unsupported prompt/answer file type"):
        read_prompt_answer_file(txt)
