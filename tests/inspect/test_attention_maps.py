"""lmforge.inspect.attention_maps: explicit attention == SDPA (decoder, left padding, KV cache, encoder
padding), attention-map selection and figures, head patterns of known maps, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmforge.errors import InputError
from lmforge.inspect.attention_maps import (
    attention, attention_html, plot_attention_grid, plot_attention_layer, record_attention,
)
from lmforge.inspect.lens import logit_lens
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


def _attn_outputs(model, *args, **kwargs):
    """Each attention layer's output for one forward pass."""
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _a, o: outs.append(o)) for m in model.modules()
             if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            final = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


def _sdpa_vs_explicit(model, *args, **kwargs):
    sdpa, final_sdpa = _attn_outputs(model, *args, **kwargs)
    with record_attention(model) as layers:
        explicit, final_explicit = _attn_outputs(model, *args, **kwargs)
    assert len(sdpa) == len(explicit) == model.config.n_layer
    for a, b in zip(sdpa, explicit):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(final_explicit, final_sdpa, atol=1e-5, rtol=0)
    assert not any(m.record_weights for m in layers)  # switched back off
    return [m.last_weights for m in layers]


# ---------------------------------------------------------------------------- explicit attention
@pytest.mark.parametrize("fields", [
    {},  # GPT-2 style: learned positions, MHA
    {"positional": "rope", "n_kv_head": 2, "norm": "rmsnorm", "activation": "swiglu", "bias": False},  # Llama GQA
    {"positional": "rope", "n_kv_head": 1},  # MQA
], ids=["mha-learned", "gqa-rope", "mqa-rope"])
def test_explicit_attention_equals_sdpa_decoder(fields):
    model = _model(**fields)
    ids = torch.randint(0, 48, (2, 20))
    weights = _sdpa_vs_explicit(model, ids)
    for w in weights:
        assert w.shape == (2, 4, 20, 20)  # GQA heads expanded to every query head
        assert torch.all(w.triu(1) == 0)  # causal: nothing above the diagonal
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 20))


def test_explicit_attention_equals_sdpa_with_left_padding():
    model = _model(positional="rope", n_kv_head=2)
    ids = torch.randint(0, 48, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    weights = _sdpa_vs_explicit(model, ids, attention_mask=mask)
    assert torch.all(weights[0][0, :, 5:, :5] == 0)  # real tokens never look at the padding


def test_explicit_attention_equals_sdpa_with_kv_cache():
    from lmforge.model import KVCache

    model = _model(positional="rope", n_kv_head=2)
    ids = torch.randint(0, 48, (1, 10))
    results = []
    for record in (False, True):
        cache = KVCache.for_model(model, 1)
        with torch.no_grad():
            if record:
                with record_attention(model) as layers:
                    model(ids[:, :9], cache=cache)
                    step = model(ids[:, 9:], cache=cache)
                assert layers[0].last_weights.shape == (1, 4, 1, 10)  # one query sees all 10 keys
            else:
                model(ids[:, :9], cache=cache)
                step = model(ids[:, 9:], cache=cache)
        results.append(step)
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


def test_explicit_attention_equals_sdpa_encoder_padding():
    model = _model(arch="encoder", norm_position="post", embedding_norm=True, type_vocab_size=2)
    ids = torch.randint(0, 48, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 10:] = 0
    mask[2, 4:] = 0
    unpadded = model(ids, attention_mask=mask)  # the default encoder path skips padding
    model.transformer.unpad = False  # layer by layer, both paths on the padded layout
    weights = _sdpa_vs_explicit(model, ids, attention_mask=mask)
    with record_attention(model):  # the explicit path agrees with the unpadded one where tokens are real
        explicit = model(ids, attention_mask=mask)
    torch.testing.assert_close(explicit[mask.bool()], unpadded[mask.bool()], atol=1e-5, rtol=0)
    for w in weights:
        assert torch.all(w[1, :, :, 10:] == 0) and torch.all(w[2, :, :, 4:] == 0)  # padding columns
        upper = torch.ones(10, 10, dtype=torch.bool).triu(1)
        assert torch.all(w[1, :, :10, :10][:, upper] > 0)  # bidirectional: keys to the right get weight
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 16))


# ---------------------------------------------------------------------------- attention API
def test_attention_maps_select_layers_and_heads(tok, tmp_path):
    model = _model(n_layer=3)
    maps = attention(model, tok, TEXT, layers=[0, -1], heads=[1, 3])
    T = len(tok.encode(TEXT))
    assert maps.weights.shape == (2, 2, T, T) and maps.layers == [0, 2] and maps.heads == [1, 3]
    assert maps.tokens[3] == "·" and "".join(maps.texts) == TEXT
    full = attention(model, tok, TEXT)
    torch.testing.assert_close(maps.weights[1, 0], full.weights[2, 1])
    win = maps.window(10, 16)
    assert win.weights.shape == (2, 2, 16, 16) and win.offset == 10 and win.total == T
    torch.testing.assert_close(win.weights, maps.weights[:, :, 10:26, 10:26])
    assert not model.training

    grid = plot_attention_grid(win, tmp_path / "grid.png")
    layer = plot_attention_layer(win, 2, tmp_path / "layer2.png")
    page = attention_html(win, tmp_path / "a.html")
    for p in (grid, layer):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert "http" not in text and "<script src" not in text
    data = json.loads(re.search(r"const DATA = (\{.*?\});\n", text).group(1))
    assert data["layers"] == [0, 2] and len(data["w"][0][0]) == 16
    assert all(sum(row) <= 1000 + 16 for row in data["w"][0][0])  # per mille; the window cuts keys before 10
    data = json.loads(re.search(r"const DATA = (\{.*?\});\n", attention_html(maps, tmp_path / "b.html").read_text()).group(1))
    assert all(abs(sum(row) - 1000) <= T for row in data["w"][1][1])  # whole rows sum to 1


def test_attention_bad_input(tok):
    model = _model(context_length=16)
    with pytest.raises(InputError, match="longer than the model's context_length 16"):
        attention(model, tok, TEXT)
    with pytest.raises(InputError, match="layer 5 is out of range: the model has 2 layers"):
        attention(model, tok, "the cat", layers=[5])
    with pytest.raises(InputError, match="head 4 is out of range: the model has 4 heads"):
        attention(model, tok, "the cat", heads=[4])
    with pytest.raises(InputError, match="empty text"):
        attention(model, tok, "")
    bigram = build({"arch": "bigram", "vocab_size": 48})
    with pytest.raises(InputError, match="no attention layers"):
        attention(bigram, tok, "the cat")
    with pytest.raises(InputError, match="no attention layers"):
        logit_lens(bigram, tok, "the cat")


def test_head_patterns_of_known_maps():
    from lmforge.inspect.attention_maps import AttentionMaps, head_patterns

    T = 6
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1  # every token looks one back
    ids = [1, 2, 3, 1, 2, 3]  # a repeat: query 3 (id 1) follows-copy key 1 (id 2), etc.
    induct = torch.zeros(T, T)
    induct[:3, 0] = 1
    induct[3, 1], induct[4, 2], induct[5, 0] = 1, 1, 1  # 3 and 4 look at what followed their copy, 5 does not
    maps = AttentionMaps(tokens=list("abcabc"), texts=list("abcabc"), ids=ids,
                         weights=torch.stack([prev, induct])[None], layers=[0], heads=[0, 1])
    p, i = head_patterns(maps)
    assert p["previous"] == pytest.approx(1.0) and p["self"] == pytest.approx(1 / T) and p["distance"] == pytest.approx(5 / 6)
    assert i["induction"] == pytest.approx(2 / 3)  # queries 3, 4, 5 have earlier copies; 3 and 4 look right
    assert i["first"] == pytest.approx(4 / 6)
