"""lmforge.inspect.lens: the logit lens (its last layer equals the model's logits; an encoder reads
through its MLM head)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import InputError
from lmforge.inspect import common
from lmforge.inspect.lens import logit_lens, plot_lens, plot_top_tokens
from lmforge.model import build
from lmforge.model.layers import Attention
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer

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


# ---------------------------------------------------------------------------- logit lens
@pytest.mark.parametrize("fields", [{}, {"positional": "rope", "norm": "rmsnorm", "n_kv_head": 2}])
def test_lens_last_layer_equals_model_logits(tok, fields, tmp_path):
    model = _model(**fields)
    lens = logit_lens(model, tok, TEXT, k=5)
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        logits = model(ids)[0, :-1]  # (T-1, vocab)
    torch.testing.assert_close(lens.logits_last, logits, atol=1e-5, rtol=0)
    probs = logits.softmax(-1)
    target = probs.gather(1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(lens.target_prob[-1], target, atol=1e-6, rtol=0)
    assert lens.rows == ["embed", "layer 0", "layer 1"] and lens.target_prob.shape == (3, ids.shape[1] - 1)
    assert torch.all(lens.target_rank[-1] == (probs > target[:, None]).sum(-1))
    top = probs.argmax(-1)
    assert [r[0] for r in lens.top_tokens[-1]] == common.token_labels(tok, top.tolist())
    json.dumps(lens.to_json())
    if fields:
        return  # the plots are drawn once
    for p in (plot_lens(lens, tmp_path / "l.png"), plot_lens(lens, tmp_path / "r.png", metric="rank"),
              plot_top_tokens(lens, tmp_path / "t.png")):
        assert p.stat().st_size > 1000


def test_lens_of_an_encoder_reads_through_the_mlm_head(tok):
    model = _model(arch="encoder", mlm_head=True)
    lens = logit_lens(model, tok, "the cat")
    with torch.no_grad():
        logits = model.mlm_logits(torch.tensor([tok.encode("the cat")]))[0]
    torch.testing.assert_close(lens.logits_last, logits, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="no masked-LM head"):
        logit_lens(_model(arch="encoder"), tok, "the cat")
