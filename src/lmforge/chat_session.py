"""``lmforge chat``: an interactive conversation with a model in the terminal.

The conversation is a list of ``{role, content}`` messages rendered with the model's chat
template (:mod:`lmforge.chat`) before every answer; the answer streams token by token and stops
at the model's end-of-turn token. When the rendered conversation plus ``max_tokens`` no longer
fits the context, the oldest turns are dropped (the system prompt stays) and the user is told.

Commands (a line starting with ``/``)::

    /reset            forget the conversation (keeps the system prompt)
    /temperature X    sampling temperature (0 = greedy)
    /top_p X          nucleus sampling threshold in (0, 1]
    /top_k N          sample among the N most likely tokens only
    /max_tokens N     longest answer, in tokens
    /save FILE        write the conversation as JSON
    /help, /quit      (Ctrl-D also leaves)

Ctrl-C while the model answers stops the answer (what was said so far is kept) and returns to
the prompt.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from lmforge.chat import render
from lmforge.errors import ConfigError, InputError, LMForgeError
from lmforge.generate import SamplingConfig, stream_text

HELP = ("commands: /reset, /temperature X, /top_p X, /top_k N, /max_tokens N, /save FILE, /help, /quit "
        "(Ctrl-C stops an answer, Ctrl-D leaves)")


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    system: str | None = None
    context: int | None = None  # token budget for prompt + answer; None -> the model's context_length
    temperature: float = 0.7
    top_p: float | None = 0.9
    max_tokens: int = 256
    top_k: int | None = None
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        limit = self.model.config.context_length
        self.context = min(self.context or limit, limit)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_tokens(self, messages: list[dict] | None = None) -> int:
        text = render(messages if messages is not None else self.messages, self.tokenizer,
                      add_generation_prompt=True)
        return len(self.tokenizer.encode(text))

    def fit(self) -> int:
        """Drop the oldest turns until the prompt plus ``max_tokens`` fits the context; returns
        how many messages were dropped. Raises InputError when the last message alone does not fit."""
        dropped = 0
        budget = self.context - self.max_tokens
        if budget <= 0:
            raise InputError(f"max_tokens={self.max_tokens} leaves no room for a prompt in a context of "
                             f"{self.context} tokens")
        while self.prompt_tokens() > budget:
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:  # only the newest message is left
                n = self.prompt_tokens()
                raise InputError(f"the message is {n} tokens with the template, more than the {budget} the "
                                 f"context of {self.context} leaves beside max_tokens={self.max_tokens}")
            del self.messages[first]
            dropped += 1
            while len(self.messages) > first + 1 and self.messages[first]["role"] != "user":
                del self.messages[first]  # start the kept part at a user turn
                dropped += 1
        return dropped

    # ------------------------------------------------------------------ one turn
    def answer(self, user_text: str, write: Callable[[str], None]) -> str:
        """Add a user turn, stream the answer through ``write`` and add it; returns the answer.
        A KeyboardInterrupt stops the answer and keeps what was written."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            dropped = self.fit()
        except InputError:
            self.messages.pop()
            raise
        if dropped:
            write(f"[dropped the {dropped} oldest message(s) to stay within the context of {self.context} tokens]\n")
        prompt = render(self.messages, self.tokenizer, add_generation_prompt=True)
        cfg = SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature,
                             top_p=self.top_p if self.temperature > 0 else None,
                             top_k=self.top_k if self.temperature > 0 else None, seed=self.seed)
        pieces: list[str] = []
        pieces_gen = stream_text(self.model, self.tokenizer, prompt, cfg)
        try:
            for piece in pieces_gen:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            pieces_gen.close()
            write(" [stopped]")
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        return text

    # ------------------------------------------------------------------ commands
    def command(self, line: str) -> str | None:
        """Run one ``/command``; returns a line to show, or None to leave."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return None
        if name == "help":
            return HELP
        if name == "reset":
            self.reset()
            return "[conversation cleared]"
        if name == "save":
            if not arg:
                return "usage: /save FILE"
            Path(arg).write_text(json.dumps(self.messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            return f"[saved {len(self.messages)} messages to {arg}]"
        setters = {"temperature": (float, lambda v: v >= 0, "a number >= 0"),
                   "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                   "top_k": (int, lambda v: v >= 1, "an integer >= 1"),
                   "max_tokens": (int, lambda v: 0 < v < self.context, f"an integer in [1, {self.context})")}
        if name in setters:
            kind, ok, expected = setters[name]
            try:
                value = kind(arg)
            except ValueError:
                value = None
            if value is None or not ok(value):
                return f"/{name}: got {arg!r}, expected {expected}"
            setattr(self, name, value)
            return f"[{name} = {value}]"
        return f"unknown command /{name}; {HELP}"


def run_chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The read-answer loop (default: the terminal). Reads lines until EOF or /quit."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    def read() -> str | None:
        try:
            if interactive:
                return input("> ")
            line = stdin.readline()
            if line:  # piped: echo the turn, so the transcript reads like the terminal's
                write(f"> {line.rstrip(chr(10))}\n")
            return line.rstrip("\n") if line else None
        except EOFError:
            return None

    write(f"chatting with a {session.model.config.n_layer}-layer model, context {session.context} tokens. "
          f"/help for commands.\n")
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            write("\n(Ctrl-D or /quit to leave)\n")
            continue
        if line is None:
            write("\n")
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            try:
                out = session.command(line)
            except (OSError, LMForgeError, ConfigError) as e:
                out = f"error: {e}"
            if out is None:
                return 0
            write(out + "\n")
            continue
        try:
            session.answer(line, write)
        except InputError as e:
            write(f"error: {e}\n")
            continue
        write("\n")
