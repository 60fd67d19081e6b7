"""lmforge.chat_session: the interactive chat loop (commands, save, greedy answers equal generate, old
turns dropped to fit, too-long messages refused, Ctrl-C)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmforge.chat import render
from lmforge.chat_session import ChatSession, run_chat
from lmforge.model import build
from lmforge.tokenizer import ByteTokenizer


# ============================================================================ the chat loop
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = build({"preset": "llama-baby", "vocab_size": tok.vocab_size, "n_layer": 1, "n_embd": 32,
                   "context_length": 256}).eval()
    return model, tok


def _run(session, script: str) -> str:
    out = io.StringIO()
    assert run_chat(session, io.StringIO(script), out) == 0
    return out.getvalue()


def test_chat_loop_commands_and_save(tiny, tmp_path):
    model, tok = tiny
    s = ChatSession(model, tok, system="You are terse.", temperature=0.7, max_tokens=8, seed=0)
    save = tmp_path / "conv.json"
    out = _run(s, f"/temperature 0\n/top_p 0.5\n/max_tokens 5\nhello\n/save {save}\n/bogus\n/top_p 2\n"
                  f"/reset\n/quit\nnever read\n")
    assert "[temperature = 0.0]" in out and "[top_p = 0.5]" in out and "[max_tokens = 5]" in out
    assert "unknown command /bogus" in out and "/top_p: got '2', expected a number in (0, 1]" in out
    saved = json.loads(save.read_text())
    assert [m["role"] for m in saved] == ["system", "user", "assistant"] and saved[1]["content"] == "hello"
    assert len(saved[2]["content"]) <= 5  # 5 byte tokens: at most 5 characters
    assert s.messages == [{"role": "system", "content": "You are terse."}]  # after /reset


def test_greedy_answer_is_what_generate_gives(tiny):
    from lmforge.generate import generate_text

    model, tok = tiny
    s = ChatSession(model, tok, temperature=0, max_tokens=6)
    out = _run(s, "hi\n")
    prompt = render([{"role": "user", "content": "hi"}], tok, add_generation_prompt=True)
    assert generate_text(model, tok, prompt, max_new_tokens=6, temperature=0) in out
    assert s.messages[-1]["role"] == "assistant"


def test_old_turns_are_dropped_to_fit_the_context(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, system="sys", context=120, temperature=0, max_tokens=10)
    out = _run(s, "first question here\nsecond question here\nthird question here\n")
    assert "[dropped the 2 oldest message(s) to stay within the context of 120 tokens]" in out
    assert s.messages[0] == {"role": "system", "content": "sys"}
    assert s.messages[1]["content"] == "second question here" or s.messages[1]["content"] == "third question here"
    assert s.prompt_tokens(s.messages[:-1]) <= 120 - 10


def test_a_message_longer_than_the_context_is_refused_and_the_loop_goes_on(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, context=64, temperature=0, max_tokens=4)
    out = _run(s, "x" * 200 + "\nok\n")
    assert "error: the message is" in out and "context of 64" in out
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["ok"]


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, temperature=0, max_tokens=20)
    seen = []

    def write(piece):
        seen.append(piece)
        if len(seen) == 2:
            raise KeyboardInterrupt

    s.answer("hello", write)
    assert seen[-1] == " [stopped]"
    assert s.messages[-1] == {"role": "assistant", "content": seen[0] + seen[1]}
