"""Chat templates (rendering, message spans in characters and tokens) and the `lmforge chat` loop
driven by scripted input."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmforge.chat import CHATML_TEMPLATE, render, render_with_spans
from lmforge.chat_session import ChatSession, run_chat
from lmforge.errors import InputError
from lmforge.model import build
from lmforge.chat import render_chat
from lmforge.tokenizer import ByteTokenizer, CharTokenizer, train_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", ["Hello there, be brief. Capital of France? Paris. " * 30], vocab_size=320,
                           min_frequency=1, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])


def test_defaults_lmforge_format_or_chatml():
    assert render(CHAT, ByteTokenizer()) == render_chat(CHAT)  # lmforge role tokens -> lmforge's format
    text = render(CHAT[:2], CharTokenizer("abc"), add_generation_prompt=True)  # no role tokens -> ChatML
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_spans_cover_each_message(bpe):
    chat = render_with_spans(CHAT, bpe, add_generation_prompt=False)
    assert chat.text == render(CHAT, bpe, CHATML_TEMPLATE)
    assert chat.ids == bpe.encode(chat.text)
    for msg, s in zip(CHAT, chat.spans):
        assert s.role == msg["role"]
        assert chat.text[s.start:s.end] == f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n"
        assert chat.text[s.content_start:s.content_end] == msg["content"]
        assert bpe.decode(chat.ids[s.content_token_start:s.content_token_end]) == msg["content"]
        assert bpe.decode(chat.ids[s.token_start:s.token_end], skip_special_tokens=False) == chat.text[s.start:s.end]
    assert [s.end for s in chat.spans[:-1]] == [s.start for s in chat.spans[1:]]
    assert chat.spans[-1].token_end == len(chat.ids)
    # the tokens an assistant turn trains on: its content and its end-of-turn token
    trained = [bpe.decode([i], skip_special_tokens=False) for i, m in zip(chat.ids, chat.role_mask()) if m]
    assert "".join(trained) == "Hello!<|im_end|>\nParis.<|im_end|>\n"


def test_generation_prompt_and_byte_and_char_tokenizers():
    for tok in (ByteTokenizer(), CharTokenizer("abcdefghijklmnopqrstuvwxyzHBCP?!. \n<>|_")):
        chat = render_with_spans(CHAT[:2], tok, add_generation_prompt=True)
        assert chat.generation_prompt_start == len(render(CHAT[:2], tok))
        s = chat.spans[1]
        assert tok.decode(chat.ids[s.content_token_start:s.content_token_end]) == "Hi there"


def test_template_that_rewrites_content_and_default_system():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyzHBCP?!. \n<>|_:")
    template = ("{% if messages[0]['role'] != 'system' %}sys: default\n{% endif %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}")
    msgs = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "hello"}]
    chat = render_with_spans(msgs, tok, template)
    assert chat.text == "sys: default\nuser: hi\nassistant: hello\n"
    u, a = chat.spans
    assert chat.text[u.start:u.end] == "sys: default\nuser: hi\n"  # the default system lies in the first segment
    assert chat.text[u.content_start:u.content_end] == "hi"
    assert chat.text[a.content_start:a.content_end] == "hello"


def test_bad_messages_and_templates_are_one_line_errors(bpe):
    with pytest.raises(InputError, match="unknown role 'wizard'"):
        render([{"role": "wizard", "content": "x"}], bpe)
    with pytest.raises(InputError, match="string 'content'"):
        render([{"role": "user"}], bpe)
    with pytest.raises(InputError, match="does not compile"):
        render(CHAT, bpe, "{% for m in messages %}")
    with pytest.raises(InputError, match="roles must alternate"):
        render(CHAT, bpe, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match="failed to render"):
        render(CHAT, bpe, "{{ messages[0]['content'] + 1 }}")


def test_tokenizer_keeps_its_template_through_save(tmp_path, bpe):
    from lmforge.tokenizer import load_tokenizer

    tok = train_tokenizer("bpe", ["hello there"] * 5, vocab_size=280, min_frequency=1)
    tok.configure(eos_id=tok.token_to_id("<|end|>"), chat_template="{{ messages[0]['content'] }}!")
    tok.save(tmp_path / "t.json")
    back = load_tokenizer(tmp_path / "t.json")
    assert back.chat_template == "{{ messages[0]['content'] }}!" and back.eos_id == tok.eos_id
    assert back.apply_chat_template([{"role": "user", "content": "yo"}]) == "yo!"
    assert back.fingerprint() == tok.fingerprint()


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
