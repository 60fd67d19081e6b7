"""Instruction and chat data for supervised fine-tuning (SFT), as pure functions.

Records come in four shapes, all turned into a list of ``{role, content}`` messages or a
(prompt, response) pair, then into token ids with a label per token:

* **Alpaca** ``{"instruction", "input", "output"}`` (Stanford Alpaca, and the same fields in the
  classic book's ``instruction-data.json``), rendered with a prompt template:
  ``"alpaca"`` (Stanford's two preambles, with or without input), ``"book"`` (the book's layout:
  one preamble, an ``### Input:`` section only when there is input) or ``"chat"`` (instruction and
  input as one user turn in the model's chat template).
* **chat messages** ``{"messages": [{"role", "content"}, ...]}`` (JSONL), any number of turns.
* **OpenAssistant trees** ``{"prompt": {message with "replies": [...]}}``: :func:`oasst_paths`
  walks root-to-leaf paths, either the best-ranked reply at each step (``"rank0"``) or every
  path (``"all"``).

Labels are aligned with ``input_ids``: ``labels[t]`` is ``input_ids[t]`` where the loss trains
and ``IGNORE`` (-100) elsewhere; an objective shifts them (predict ``labels[t+1]`` from
position ``t``). By default only responses train: the output of an Alpaca record plus the eos
token, and every assistant turn of a chat (its content and its end-of-turn token, found with
:func:`lmforge.chat.render_with_spans`); ``train_on_prompt=True`` trains on everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lmforge.chat import encode_with_starts, render_with_spans
from lmforge.errors import ConfigError, DataError, InputError

IGNORE = -100
TEMPLATES = ("alpaca", "book", "chat")
OVERFLOW = ("truncate", "drop")

_ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_BOOK = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\n{instruction}{input_section}\n\n### Response:\n")


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE where the loss does not train

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class Located(dict):
    """A record that remembers where it came from (``where``: its file and line), for error
    messages after the records were shuffled. Serialises as the plain dict it is."""

    def __init__(self, record: dict, where: str | None = None):
        super().__init__(record)
        self.where = where


@dataclass
class SFTCounts:
    """What happened to the records: kept as they were, truncated, or dropped (and why)."""

    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_nothing_to_train: int = 0
    examples: list[SFTExample] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {"kept": self.kept, "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "dropped_nothing_to_train": self.dropped_nothing_to_train}


# ======================================================================== records -> text
def _text_field(record: dict, name: str, where: str, required: bool = True) -> str:
    value = record.get(name, "" if not required else None)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{where}.{name}: expected a string, got {type(value).__name__}")
    if required and name not in record:
        raise DataError(f"{where}: missing field {name!r} (expected instruction, input, output)")
    return value


def alpaca_fields(record, where: str = "record") -> tuple[str, str, str]:
    """(instruction, input, output) of an Alpaca-style record; an empty output is a DataError."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with instruction/input/output, got {type(record).__name__}")
    instruction = _text_field(record, "instruction", where)
    inp = _text_field(record, "input", where, required=False)
    output = _text_field(record, "output", where)
    if not instruction.strip():
        raise DataError(f"{where}.instruction: empty; expected the task to do")
    if not output.strip():
        raise DataError(f"{where}.output: empty response; expected the text to train on")
    return instruction, inp, output


def instruction_prompt(instruction: str, inp: str = "", template: str = "alpaca") -> str:
    """The prompt text of an instruction (and optional input) in the ``"alpaca"`` or the book's
    (``"book"``) template, up to where the response begins."""
    if template == "alpaca":
        return (_ALPACA_INPUT if inp.strip() else _ALPACA_NO_INPUT).format(instruction=instruction, input=inp)
    if template == "book":
        section = f"\n\n### Input:\n{inp}" if inp.strip() else ""
        return _BOOK.format(instruction=instruction, input_section=section)
    raise ConfigError(f"sft.template: got {template!r} for a prompt/response pair, expected alpaca or book")


def prompt_response(record, template: str = "alpaca", where: str = "record") -> tuple[str, str]:
    """(prompt, response) text of an Alpaca-style record in the ``"alpaca"`` or ``"book"`` template."""
    instruction, inp, output = alpaca_fields(record, where)
    return instruction_prompt(instruction, inp, template), output


def alpaca_messages(record, where: str = "record") -> list[dict]:
    """An Alpaca-style record as one user turn (instruction, then input) and one assistant turn."""
    instruction, inp, output = alpaca_fields(record, where)
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def check_chat(messages, where: str = "record") -> list[dict]:
    """A trainable conversation: known roles, string contents, at least one non-empty assistant
    turn, and the last turn an assistant's (nothing to learn after a user turn)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}.messages: expected a non-empty list of {{role, content}} objects")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}.messages[{n}]: expected an object with a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}.messages[{n}].role: unknown role {m.get('role')!r}; expected system, user "
                            f"or assistant")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}.messages: ends with a {messages[-1]['role']} turn; expected the last turn to be "
                        f"the assistant's")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}.messages: no non-empty assistant turn to train on")
    return messages


def oasst_paths(tree: dict, mode: str = "rank0", where: str = "tree") -> list[list[dict]]:
    """Conversations of one OpenAssistant tree, as message lists ending with an assistant turn.

    ``"rank0"``: from the root, follow the best-ranked reply (lowest ``rank``; unranked replies
    after ranked ones, file order breaking ties) down to a leaf: one conversation. ``"all"``:
    every root-to-leaf path. Deleted messages and everything under them are skipped; a path that
    ends with a prompter message loses that last message.
    """
    if mode not in ("rank0", "all"):
        raise ConfigError(f"sft.oasst_paths: got {mode!r}, expected rank0 or all")
    root = tree.get("prompt") if isinstance(tree, dict) else None
    if not isinstance(root, dict):
        raise DataError(f"{where}: expected an OpenAssistant tree with a 'prompt' message")
    roles = {"prompter": "user", "assistant": "assistant"}

    def turn(msg: dict) -> dict:
        if msg.get("role") not in roles or not isinstance(msg.get("text"), str):
            raise DataError(f"{where}: message {msg.get('message_id')!r}: expected role prompter/assistant and "
                            f"a string 'text'")
        return {"role": roles[msg["role"]], "content": msg["text"]}

    def replies(msg: dict) -> list[dict]:
        kids = [r for r in msg.get("replies") or [] if isinstance(r, dict) and not r.get("deleted")]
        order = sorted(range(len(kids)), key=lambda i: (kids[i].get("rank") is None, kids[i].get("rank") or 0, i))
        return [kids[i] for i in order]

    paths: list[list[dict]] = []

    def walk(msg: dict, path: list[dict]) -> None:
        path = path + [turn(msg)]
        kids = replies(msg)
        if not kids:
            while path and path[-1]["role"] != "assistant":
                path = path[:-1]
            if path:
                paths.append(path)
            return
        for kid in kids if mode == "all" else kids[:1]:
            walk(kid, path)

    if not root.get("deleted"):
        walk(root, [])
    return paths


# ======================================================================== text -> tokens
def tokenize_prompt_response(tokenizer, prompt: str, response: str, add_eos: bool = True,
                             train_on_prompt: bool = False) -> SFTExample:
    """``prompt + response`` (+ eos) tokenized as one text; labels on the response tokens (and
    eos), or on everything with ``train_on_prompt``."""
    ids, starts = encode_with_starts(tokenizer, prompt + response)
    cut = len(prompt)
    labels = [i if (train_on_prompt or s >= cut) else IGNORE for i, s in zip(ids, starts)]
    if add_eos:
        if tokenizer.eos_id is None:
            raise ConfigError("sft.add_eos: the tokenizer has no eos token; expected add_eos: false")
        ids, labels = ids + [tokenizer.eos_id], labels + [tokenizer.eos_id]
    return SFTExample(ids, labels)


def tokenize_chat(tokenizer, messages: list[dict], template: str | None = None,
                  train_on_prompt: bool = False, where: str = "record") -> SFTExample:
    """A conversation in the chat template; labels on every assistant turn's content and
    end-of-turn tokens (or everywhere with ``train_on_prompt``)."""
    check_chat(messages, where)
    try:
        chat = render_with_spans(messages, tokenizer, template)
    except InputError as e:
        raise DataError(f"{where}: {e}") from None
    keep = [True] * len(chat.ids) if train_on_prompt else chat.role_mask(("assistant",))
    return SFTExample(list(chat.ids), [i if k else IGNORE for i, k in zip(chat.ids, keep)])


def fit_length(ex: SFTExample, max_length: int, overflow: str = "truncate") -> tuple[SFTExample | None, str]:
    """``(example, what)`` with what in kept / truncated / dropped_too_long /
    dropped_nothing_to_train. Truncation keeps the first ``max_length`` tokens (the prompt and
    the start of the response)."""
    if overflow not in OVERFLOW:
        raise ConfigError(f"sft.overflow: got {overflow!r}, expected one of {', '.join(OVERFLOW)}")
    what = "kept"
    if len(ex.input_ids) > max_length:
        if overflow == "drop":
            return None, "dropped_too_long"
        ex, what = SFTExample(ex.input_ids[:max_length], ex.labels[:max_length]), "truncated"
    # a label at position 0 is never predicted (nothing comes before it)
    if not any(x != IGNORE for x in ex.labels[1:]):
        return None, "dropped_nothing_to_train"
    return ex, what


def build_examples(records: Iterable, tokenizer, kind: str = "alpaca", template: str = "alpaca",
                   max_length: int = 512, overflow: str = "truncate", train_on_prompt: bool = False,
                   oasst_mode: str = "rank0") -> SFTCounts:
    """Tokenized, length-fitted examples of ``records`` and the counts of what happened.

    ``kind``: ``"alpaca"`` (instruction/input/output; the book's file too), ``"messages"``
    (records with a ``messages`` list) or ``"oasst"`` (OpenAssistant trees, one example per path).
    ``template``: ``"alpaca"``/``"book"`` (Alpaca records only) or ``"chat"`` (the tokenizer's
    chat template).
    """
    if kind not in ("alpaca", "messages", "oasst"):
        raise ConfigError(f"sft.format: got {kind!r}, expected alpaca, messages or oasst")
    if template not in TEMPLATES:
        raise ConfigError(f"sft.template: got {template!r}, expected one of {', '.join(TEMPLATES)}")
    if kind != "alpaca" and template != "chat":
        raise ConfigError(f"sft.template: {kind} records are conversations; expected template: chat")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"sft.max_length: got {max_length!r}, expected an integer >= 2")
    counts = SFTCounts()
    for n, record in enumerate(records):
        where = getattr(record, "where", None) or f"record {n}"
        if kind == "alpaca" and isinstance(record, dict) and isinstance(record.get("output"), str) \
                and not record["output"].strip():  # nothing to learn from (real Alpaca has a few): counted
            counts.dropped_nothing_to_train += 1
            continue
        if kind == "alpaca" and template != "chat":
            prompt, response = prompt_response(record, template, where)
            exs = [tokenize_prompt_response(tokenizer, prompt, response, train_on_prompt=train_on_prompt)]
        elif kind == "alpaca":
            exs = [tokenize_chat(tokenizer, alpaca_messages(record, where), train_on_prompt=train_on_prompt,
                                 where=where)]
        elif kind == "messages":
            msgs = record.get("messages") if isinstance(record, dict) else None
            exs = [tokenize_chat(tokenizer, msgs, train_on_prompt=train_on_prompt, where=where)]
        else:
            exs = [tokenize_chat(tokenizer, path, train_on_prompt=train_on_prompt, where=f"{where} path {k}")
                   for k, path in enumerate(oasst_paths(record, oasst_mode, where))]
        for ex in exs:
            ex, what = fit_length(ex, max_length, overflow)
            setattr(counts, what, getattr(counts, what) + 1)
            if ex is not None:
                counts.examples.append(ex)
    return counts
