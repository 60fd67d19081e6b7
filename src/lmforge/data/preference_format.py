"""Preference records: one prompt, a chosen and a rejected completion, in every common layout.

Three layouts are read (``format="auto"`` tells them apart record by record):

``prompt``
    Hugging Face style ``{"prompt", "chosen", "rejected"}``. Each value is a string, or a list of
    ``{"role", "content"}`` messages: the prompt a conversation that ends before the assistant's
    reply, ``chosen`` / ``rejected`` the assistant's reply (one assistant message). Without a
    ``prompt`` field, ``chosen`` and ``rejected`` may be two whole conversations that share all
    but their last assistant message (the shared messages become the prompt).
``instruction``
    The classic book's ``instruction-data-with-preference.json``:
    ``{"instruction", "input", "chosen", "rejected"}`` (``output`` is ignored), the prompt rendered
    with the Alpaca template used for instruction tuning.
``hh``
    Anthropic HH-RLHF: ``chosen`` and ``rejected`` are whole transcripts,
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is the shared beginning up to and
    including the last ``"\\n\\nAssistant:"`` marker both share; the completion is the rest.
    In nearly all pairs that is the last assistant turn; where the two transcripts diverge
    earlier, the completions carry every turn after the divergence.

Each record becomes a :class:`PreferencePair`; :func:`render_pair` turns one into the three
strings (prompt, chosen completion, rejected completion) that are tokenized separately.
Problems are one-line :class:`~lmforge.errors.DataError` naming the file and the record index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.chat import render_chat
from lmforge.data.sft_format import instruction_prompt
from lmforge.data.sources import read_json_records
from lmforge.errors import DataError, InputError

__all__ = [
    "FORMATS",
    "PreferencePair",
    "hh_split",
    "parse_preference_record",
    "parse_preference_records",
    "read_preference_file",
    "render_pair",
]

FORMATS = ("auto", "prompt", "instruction", "hh")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

Messages = list[dict]


@dataclass(frozen=True)
class PreferencePair:
    """``prompt`` (text, or messages to be rendered with a chat template) and the two completions.

    ``index`` is the record's position in its source, so a split by position (e.g. the book's
    first 935 / next 55 / last 110) stays possible after records are skipped.
    """

    index: int
    prompt: str | Messages
    chosen: str
    rejected: str


# --------------------------------------------------------------------------------------------
# Templates and transcript splitting
# --------------------------------------------------------------------------------------------

def hh_split(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into (prompt, chosen completion, rejected completion).

    The prompt ends right after the last ``"\\n\\nAssistant:"`` that lies inside the common
    beginning of both transcripts. Raises ValueError when they share no assistant marker.
    """
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    end = chosen.rfind(HH_ASSISTANT, 0, common)  # the last marker lying wholly in the shared part
    if end < 0:
        raise ValueError("the two transcripts share no '\\n\\nAssistant:' turn to split at")
    cut = end + len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


# --------------------------------------------------------------------------------------------
# One record
# --------------------------------------------------------------------------------------------

def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _check_messages(messages: Messages, field: str) -> Messages:
    for n, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{field}[{n}] has no string 'content'")
    return messages


def _reply(value: Any, field: str) -> str:
    """A completion: a string, or exactly one assistant message."""
    if isinstance(value, str):
        return value
    if _is_messages(value):
        _check_messages(value, field)
        if len(value) != 1 or value[0]["role"] != "assistant":
            roles = [m["role"] for m in value]
            raise ValueError(f"{field} must be one assistant message after the prompt, got roles {roles}")
        return value[0]["content"]
    raise ValueError(f"{field} is {type(value).__name__}; expected a string or a list of messages")


def _from_prompt(record: dict) -> tuple[str | Messages, str, str]:
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" not in record:  # implicit prompt: two conversations sharing all but the reply
        if not (_is_messages(chosen) and _is_messages(rejected)):
            raise ValueError("without a 'prompt' field, chosen and rejected must be two "
                             "conversations (lists of messages)")
        _check_messages(chosen, "chosen")
        _check_messages(rejected, "rejected")
        if chosen[:-1] != rejected[:-1] or not chosen[:-1]:
            raise ValueError("chosen and rejected conversations must share every message but "
                             "their last")
        return chosen[:-1], _reply(chosen[-1:], "chosen"), _reply(rejected[-1:], "rejected")
    prompt = record["prompt"]
    if _is_messages(prompt):
        prompt = _check_messages(prompt, "prompt")
        if prompt and prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt conversation ends with an assistant message; it should "
                             "end where the assistant's reply begins")
    elif not isinstance(prompt, str):
        raise ValueError(f"prompt is {type(prompt).__name__}; expected a string or a list of messages")
    return prompt, _reply(chosen, "chosen"), _reply(rejected, "rejected")


def _from_instruction(record: dict) -> tuple[str, str, str]:
    instruction, inp = record.get("instruction"), record.get("input") or ""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("'instruction' must be a non-empty string")
    if not isinstance(inp, str):
        raise ValueError(f"'input' is {type(inp).__name__}; expected a string")
    return instruction_prompt(instruction, inp, "book"), _reply(record["chosen"], "chosen"), \
        _reply(record["rejected"], "rejected")


def _from_hh(record: dict) -> tuple[str, str, str]:
    chosen, rejected = record["chosen"], record["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("HH-RLHF chosen and rejected must be transcript strings")
    return hh_split(chosen, rejected)


def _detect(record: dict) -> str:
    if "prompt" in record:
        return "prompt"
    if "instruction" in record:
        return "instruction"
    if isinstance(record.get("chosen"), str) and HH_ASSISTANT in record["chosen"]:
        return "hh"
    return "prompt"


_IDENTICAL = "a preference pair must differ (skip such records with skip_identical)"
_EMPTY = "expected text (skip such records with skip_empty)"

_PARSERS = {"prompt": _from_prompt, "instruction": _from_instruction, "hh": _from_hh}


def parse_preference_record(record: Any, index: int, format: str = "auto",
                            where: str = "preference data") -> PreferencePair:
    """One record -> :class:`PreferencePair`; a DataError naming ``where`` and ``index`` if bad.

    Identical chosen and rejected completions are an error here (the pair teaches nothing and
    the loss is constant); :func:`parse_preference_records` can skip them instead.
    """
    if format not in FORMATS:
        raise DataError(f"{where}: unknown preference format {format!r}; expected one of "
                        f"{', '.join(FORMATS)}")
    at = f"{where}: record {index}"
    if not isinstance(record, dict):
        raise DataError(f"{at}: expected a JSON object, got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if field not in record:
            present = ", ".join(repr(k) for k in record if not str(k).startswith("_")) or "(none)"
            raise DataError(f"{at}: no {field!r} field; fields present: {present}")
        if record[field] is None:
            raise DataError(f"{at}: {field!r} is null; expected a string or a list of messages")
    kind = _detect(record) if format == "auto" else format
    try:
        prompt, chosen, rejected = _PARSERS[kind](record)
    except KeyError as e:
        raise DataError(f"{at}: no {e.args[0]!r} field for the {kind} format") from None
    except ValueError as e:
        raise DataError(f"{at}: {e}") from None
    if chosen == rejected:
        raise DataError(f"{at}: chosen and rejected are identical; {_IDENTICAL}")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{at}: the {name} completion is empty; {_EMPTY}")
    return PreferencePair(index, prompt, chosen, rejected)


# --------------------------------------------------------------------------------------------
# Many records, files
# --------------------------------------------------------------------------------------------

def parse_preference_records(records: Iterable[Any], format: str = "auto",
                             where: str = "preference data", skip_identical: bool = False,
                             skip_empty: bool = False) -> tuple[list[PreferencePair], dict[int, str]]:
    """Parse every record; returns ``(pairs, skipped)``.

    By default a record whose chosen and rejected completions are identical, or one whose
    completion is empty, is an error. With ``skip_identical`` / ``skip_empty`` such records are
    dropped instead and reported in ``skipped`` as ``{index: "identical" | "empty"}``.
    """
    pairs, skipped = [], {}
    for i, record in enumerate(records):
        try:
            pairs.append(parse_preference_record(record, i, format, where))
        except DataError as e:
            if skip_identical and str(e).endswith(_IDENTICAL):
                skipped[i] = "identical"
            elif skip_empty and str(e).endswith(_EMPTY):
                skipped[i] = "empty"
            else:
                raise
    if not pairs:
        raise DataError(f"{where}: no preference pairs found")
    return pairs, skipped


def _load_records(path: Path) -> list:
    return read_json_records(path, "preference")


def read_preference_file(path: str | Path, format: str = "auto", skip_identical: bool = False,
                         skip_empty: bool = False) -> tuple[list[PreferencePair], dict[int, str]]:
    """Read a .json array or .jsonl file of preference records (see the module docstring)."""
    path = Path(path)
    return parse_preference_records(_load_records(path), format, str(path), skip_identical,
                                    skip_empty)


# --------------------------------------------------------------------------------------------
# Rendering to the strings that are tokenized
# --------------------------------------------------------------------------------------------

def render_pair(pair: PreferencePair,
                render_messages: Callable[..., str] | None = None) -> tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` text. A message prompt is rendered with ``render_messages``
    (``fn(messages, add_generation_prompt=...)``; default lmforge's chat format), and each
    completion is what the template adds for the assistant's reply (its end marker included)."""
    if isinstance(pair.prompt, str):
        return pair.prompt, pair.chosen, pair.rejected
    if render_messages is None:
        render_messages = render_chat
    try:
        prompt = render_messages(pair.prompt, add_generation_prompt=True)
        completions = []
        for reply in (pair.chosen, pair.rejected):
            full = render_messages(pair.prompt + [{"role": "assistant", "content": reply}])
            if not full.startswith(prompt):
                raise DataError(f"record {pair.index}: the chat template does not render the reply "
                                f"as a continuation of the prompt, so it cannot be split")
            completions.append(full[len(prompt):])
    except InputError as e:
        raise DataError(f"record {pair.index}: {e}") from None
    return prompt, completions[0], completions[1]
