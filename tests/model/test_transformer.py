"""lmforge.model.transformer: decoder/encoder shapes, causality, padding invariance, bad input,
reproducible builds, tied heads."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, strategies as st

from lmforge.errors import InputError
from lmforge.model import KVCache, ModelConfig, build
from tests.model.tiny_models import FAST, V, CTX, GPT2, LLAMA, BERT, BIGRAM, DECODERS, tiny, tokens, close

# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", [*DECODERS, "bigram"])
@FAST
@given(B=st.integers(1, 3), T=st.integers(1, CTX), seed=st.integers(0, 2**16))
def test_decoder_logits_shape(name, B, T, seed):
    model = tiny(name)
    with torch.no_grad():
        out = model(tokens(seed, B, T))
    assert out.shape == (B, T, V)
    assert torch.isfinite(out).all()


@FAST
@given(B=st.integers(1, 3), T=st.integers(1, CTX), seed=st.integers(0, 2**16))
def test_encoder_shapes(B, T, seed):
    model = tiny("bert")
    x = tokens(seed, B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:, T // 2 + 1:] = 0  # some right padding, always at least one real token
    with torch.no_grad():
        assert model(x, mask).shape == (B, T, 16)
        assert model.mlm_logits(x, mask).shape == (B, T, V)
        assert model.pooled(x, mask, method="mean").shape == (B, 16)
        assert model.pooled(x, mask, method="cls").shape == (B, 16)
        assert model.pooled(x, mask).shape == (B, 16)  # config default (cls)
        tt = torch.randint(2, (B, T), generator=torch.Generator().manual_seed(seed))
        assert model(x, mask, token_type_ids=tt).shape == (B, T, 16)


def test_encoder_without_mlm_head_raises():
    model = build(ModelConfig(**{**BERT, "mlm_head": False}))
    with pytest.raises(InputError, match="mlm_head"):
        model.mlm_logits(tokens(0, 1, 4))


def test_last_only_and_hidden_states():
    model = tiny("gpt2")
    x = tokens(1, 2, 9)
    with torch.no_grad():
        full = model(x)
        assert close(model(x, last_only=True), full[:, -1:])
        assert model.hidden_states(x).shape == (2, 9, 16)


# --------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "dropout-eval"])
@FAST
@given(T=st.integers(2, CTX), data=st.data())
def test_causality(name, T, data):
    model = tiny("gpt2", dropout=0.3) if name == "dropout-eval" else tiny(name)
    assert not model.training
    t = data.draw(st.integers(0, T - 2), label="t")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = tokens(seed, 2, T)
    y = x.clone()
    y[:, t + 1:] = (x[:, t + 1:] + 1 + tokens(seed + 1, 2, T - t - 1, vocab=V - 1)) % V  # every later token changes
    assert (y[:, t + 1:] != x[:, t + 1:]).all()
    with torch.no_grad():
        a, b = model(x), model(y)
    assert close(a[:, :t + 1], b[:, :t + 1])
    assert not close(a[:, t + 1:], b[:, t + 1:], tol=0.0)  # the future does matter to later positions


# ---------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@FAST
@given(T=st.integers(1, 10), P=st.integers(1, CTX - 10), seed=st.integers(0, 2**16))
def test_encoder_padding_invariance(pooling, T, P, seed):
    model = tiny("bert")
    x = tokens(seed, 1, T)
    padded = torch.cat([x, tokens(seed + 1, 1, P)], dim=1)  # junk after the real tokens
    mask = torch.cat([torch.ones(1, T), torch.zeros(1, P)], dim=1).long()
    with torch.no_grad():
        h, hp = model(x), model(padded, mask)
        assert close(hp[:, :T], h)
        assert close(model.pooled(padded, mask, method=pooling), model.pooled(x, method=pooling))
        assert close(model.mlm_logits(padded, mask)[:, :T], model.mlm_logits(x), tol=1e-4)


def test_encoder_padding_invariance_in_a_batch():
    """Two sequences of different lengths in one batch match each one on its own."""
    model = tiny("bert")
    a, b = tokens(3, 1, 12), tokens(4, 1, 5)
    batch = torch.cat([a, torch.cat([b, tokens(5, 1, 7)], dim=1)])
    mask = torch.tensor([[1] * 12, [1] * 5 + [0] * 7])
    with torch.no_grad():
        h = model(batch, mask)
        mean = model.pooled(batch, mask, method="mean")
        assert close(h[0:1], model(a)) and close(h[1:2, :5], model(b))
        assert close(mean[0:1], model.pooled(a, method="mean"))
        assert close(mean[1:2], model.pooled(b, method="mean"))


@pytest.mark.parametrize("budget", [1, 20, 1024])  # a row per group, a few rows per group, one group
def test_encoder_unpadded_path_equals_padded_path(budget):
    """Skipping padding (real tokens of all rows as one block-diagonal row) changes no number:
    real positions, pooled outputs and every gradient equal the padded computation. In float64:
    in float32 the tiny model's layer norms cancel enough to leave 1e-6 of rounding in some grads."""
    model = tiny("bert").double()
    lengths = [12, 3, 7, 1, 9]
    ids = tokens(6, len(lengths), 12)
    mask = torch.tensor([[1] * n + [0] * (12 - n) for n in lengths])
    out = {}
    for unpad in (False, True):
        model.zero_grad()
        model.transformer.unpad, model.transformer.unpad_tokens = unpad, budget
        h = model(ids, mask)
        pooled = model.pooled(ids, mask, method="mean")
        (h[mask.bool()].square().sum() + pooled.sum()).backward()
        out[unpad] = (h[mask.bool()], pooled, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert close(out[True][0], out[False][0], 1e-12) and close(out[True][1], out[False][1], 1e-12)
    assert all(close(a, b, tol=1e-10) for a, b in zip(out[True][2], out[False][2], strict=True))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-mqa"])
@FAST
@given(T=st.integers(1, 10), P=st.integers(1, CTX - 10), seed=st.integers(0, 2**16))
def test_decoder_left_padding(name, T, P, seed):
    model = tiny(name)
    x = tokens(seed, 1, T)
    padded = torch.cat([tokens(seed + 1, 1, P), x], dim=1)  # junk before the real tokens
    mask = torch.cat([torch.zeros(1, P), torch.ones(1, T)], dim=1).long()
    with torch.no_grad():
        assert close(model(padded, attention_mask=mask)[:, P:], model(x))


def test_decoder_left_padding_in_a_batch():
    model = tiny("llama-gqa")
    a, b = tokens(6, 1, 11), tokens(7, 1, 4)
    batch = torch.cat([a, torch.cat([tokens(8, 1, 7), b], dim=1)])
    mask = torch.tensor([[1] * 11, [0] * 7 + [1] * 4])
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        assert torch.isfinite(out).all()  # padding queries must not produce NaN
        assert close(out[0:1], model(a)) and close(out[1:2, 7:], model(b))


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert", "bigram"])
@pytest.mark.parametrize("bad", [V + 3, -2])
def test_token_id_out_of_range(name, bad):
    x = tokens(0, 2, 6)
    x[1, 3] = bad
    with pytest.raises(InputError) as e:
        tiny(name)(x)
    msg = str(e.value)
    assert str(bad) in msg and f"vocab_size={V}" in msg


def test_sequence_longer_than_context():
    with pytest.raises(InputError, match=f"context_length {CTX}"):
        tiny("gpt2")(tokens(0, 1, CTX + 1))
    with pytest.raises(InputError, match=f"{CTX + 1} tokens"):
        tiny("llama-gqa")(tokens(0, 1, CTX + 1))
    with pytest.raises(InputError, match="context_length"):
        tiny("bert")(tokens(0, 1, CTX + 1))
    # learned positions: the cache's past counts too
    model = tiny("gpt2")
    cache = KVCache.for_model(model, batch_size=1, max_len=CTX + 4)
    with torch.no_grad():
        model(tokens(0, 1, CTX), cache=cache)
        with pytest.raises(InputError, match="context_length"):
            model(tokens(1, 1, 1), cache=cache)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert"])
@pytest.mark.parametrize("shape", [(5,), (1, 2, 3)])
def test_wrong_rank_input(name, shape):
    with pytest.raises(InputError, match="batch, time"):
        tiny(name)(tokens(0, *shape))


# ---------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("d", [GPT2, LLAMA, BERT, BIGRAM], ids=["gpt2", "llama", "bert", "bigram"])
def test_seeded_build_is_reproducible(d):
    cfg = ModelConfig(**d)
    torch.manual_seed(123)
    a = build(cfg).eval()
    torch.manual_seed(123)
    b = build(cfg).eval()
    torch.manual_seed(124)
    c = build(cfg)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = tokens(0, 2, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_dropout_training_mode_reproducible():
    model = build(ModelConfig(**{**GPT2, "dropout": 0.3})).train()
    x = tokens(0, 2, 10)
    with torch.no_grad():
        torch.manual_seed(7)
        a = model(x)
        torch.manual_seed(7)
        b = model(x)
        c = model(x)  # different dropout masks
        model.eval()
        d, e = model(x), model(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(d, e) and not torch.equal(a, d)


def test_tied_lm_head_shares_storage():
    model = build(ModelConfig(**GPT2))
    w, e = model.lm_head.weight, model.transformer.tok_emb.weight
    assert w is e and w.data_ptr() == e.data_ptr()
    with torch.no_grad():
        e[0, 0] = 3.0
    assert w[0, 0] == 3.0
    bert = tiny("bert")
    assert bert.mlm.decoder.weight.data_ptr() == bert.transformer.tok_emb.weight.data_ptr()
    llama = tiny("llama-gqa")
    assert llama.lm_head.weight.data_ptr() != llama.transformer.tok_emb.weight.data_ptr()


def test_tied_gradients_flow_to_one_tensor():
    torch.manual_seed(0)
    model = build(ModelConfig(**GPT2))
    x = tokens(0, 2, 6)
    model(x).sum().backward()
    assert model.transformer.tok_emb.weight.grad is model.lm_head.weight.grad
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))
