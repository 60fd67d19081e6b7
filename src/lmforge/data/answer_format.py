"""Prompts with checkable reference answers (for GRPO): GSM8K and any prompt/answer records.

GSM8K (Cobbe et al. 2021) records are ``{"question", "answer"}`` where ``answer`` is a worked
solution whose last line is ``#### <final answer>``; the final answer is what a reward checks.
Any other records work when they have a prompt field and an answer field (names configurable).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmforge.data.sources import read_json_records
from lmforge.errors import DataError

__all__ = ["gsm8k_final_answer", "parse_prompt_answer_records", "read_prompt_answer_file"]


def gsm8k_final_answer(solution: str, where: str = "gsm8k") -> str:
    """The final answer after the last ``####`` of a GSM8K solution, thousands commas removed
    (``"... #### 1,080"`` -> ``"1080"``); a DataError naming ``where`` if there is none."""
    if not isinstance(solution, str) or "####" not in solution:
        raise DataError(f"{where}: the answer has no '#### <final answer>' line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").strip()
    if not final:
        raise DataError(f"{where}: nothing follows '####' in the answer")
    return final


def parse_prompt_answer_records(records: Iterable[Any], prompt_field: str = "prompt",
                                answer_field: str = "answer", format: str = "auto",
                                where: str = "prompt data") -> list[dict]:
    """Records -> ``[{"prompt", "answer"}]`` (GSM8K ones keep the worked ``solution`` too).

    ``format="gsm8k"`` reads ``question`` / ``answer`` and takes the final answer after
    ``####``; ``"fields"`` reads ``prompt_field`` / ``answer_field`` as they are; ``"auto"``
    picks GSM8K for records with a ``question`` field and no ``prompt_field``.
    """
    if format not in ("auto", "gsm8k", "fields"):
        raise DataError(f"{where}: unknown prompt/answer format {format!r}; expected auto, gsm8k "
                        f"or fields")
    out = []
    for i, record in enumerate(records):
        at = f"{where}: record {i}"
        if not isinstance(record, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(record).__name__}")
        kind = format
        if kind == "auto":
            kind = "gsm8k" if "question" in record and prompt_field not in record else "fields"
        p_field, a_field = ("question", "answer") if kind == "gsm8k" else (prompt_field, answer_field)
        for field in (p_field, a_field):
            if field not in record:
                present = ", ".join(repr(k) for k in record) or "(none)"
                raise DataError(f"{at}: no {field!r} field; fields present: {present}")
        prompt, answer = record[p_field], record[a_field]
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{at}: {p_field!r} must be a non-empty string")
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{at}: {a_field!r} must be a non-empty string or a number")
        if kind == "gsm8k":
            out.append({"prompt": prompt, "answer": gsm8k_final_answer(answer, at),
                        "solution": answer})
        else:
            out.append({"prompt": prompt, "answer": answer.strip()})
    if not out:
        raise DataError(f"{where}: no records found")
    return out


def read_prompt_answer_file(path: str | Path, prompt_field: str = "prompt",
                            answer_field: str = "answer", format: str = "auto") -> list[dict]:
    """Read a .jsonl or .json (array) file of prompt/answer records."""
    path = Path(path)
    records = read_json_records(path, "prompt/answer")
    return parse_prompt_answer_records(records, prompt_field, answer_field, format, str(path))
