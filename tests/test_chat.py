"""Chat templates (rendering, message spans in characters and tokens) and the `lmforge chat` loop
driven by scripted input."""

from __future__ import annotations

import pytest

from lmforge.chat import CHATML_TEMPLATE, render, render_with_spans, render_chat
from lmforge.errors import InputError
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
