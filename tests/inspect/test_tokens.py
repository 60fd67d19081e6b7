"""lmforge.inspect.tokens: per-token losses equal the model's loss; loss masks of prompt/response and
chat."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError
from lmforge.inspect.tokens import chat_ids, prompt_response_ids, to_terminal, token_html, token_losses
from lmforge.model import build, causal_lm_loss
from lmforge.model.layers import Attention
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer, CharTokenizer

TEXT = "the cat sat on the mat. the cat sat on the hat."


def _model(**fields):
    torch.manual_seed(0)
    cfg = {"vocab_size": 48, "context_length": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, **fields}
    model = build(cfg).eval()
    with torch.no_grad():  # untrained weights are nearly uniform: make the attention peaky
        for m in model.modules():
            if isinstance(m, Attention):
                m.qkv.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train([TEXT + " ROMEO:,\n"], specials=DEFAULT_SPECIAL_TOKENS)


# ---------------------------------------------------------------------------- per-token loss
def test_token_losses_match_the_model_loss(tok, tmp_path):
    model = _model()
    tl = token_losses(model, tok, TEXT)
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        ref = causal_lm_loss(model(ids)[:, :-1], ids[:, 1:])
    assert tl.losses[0] is None and len(tl.losses) == ids.shape[1]
    assert tl.mean_loss == pytest.approx(float(ref), rel=1e-5)
    plain = to_terminal(tl, color=False)
    assert plain.startswith("th[") and f"mean loss {tl.mean_loss:.4f}" in plain
    assert "\x1b[48;2;" in to_terminal(tl)
    page = token_html(tl, tmp_path / "t.html").read_text()
    assert page.count("<span") >= len(tl.texts) and "http" not in page


def test_loss_mask_of_prompt_and_chat(tok, tmp_path):
    model = _model()
    ids, trains = prompt_response_ids(tok, "the cat ", "sat on the mat")
    assert trains == [False] * 8 + [True] * 14
    tl = token_losses(model, tok, ids=ids, trains=trains)
    assert tl.mean_loss == pytest.approx(sum(tl.losses[8:]) / 14, rel=1e-6)
    bpe = BPETokenizer.train([TEXT] * 20, vocab_size=300)  # parses the chat tags as special tokens
    msgs = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    ids, trains = chat_ids(bpe, msgs)
    assert bpe.decode(ids, skip_special_tokens=False) == bpe.apply_chat_template(msgs)
    trained = bpe.decode([i for i, t in zip(ids, trains) if t], skip_special_tokens=False)
    assert trained == "sat<|end|>"
    tl = token_losses(_model(vocab_size=300), bpe, ids=ids, trains=trains)
    assert "does not train" in token_html(tl, tmp_path / "m.html").read_text()
    with pytest.raises(InputError, match="causal LM"):
        token_losses(_model(arch="encoder"), tok, "the cat")
    with pytest.raises(InputError, match="unknown role"):
        chat_ids(tok, [{"role": "robot", "content": "x"}])
