"""Tests for lmforge.generate: cache parity, batching, sampling, stopping, streaming, limits."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    generate,
    generate_text,
    sample_next_token,
    stream,
    stream_text,
)
from lmforge.model import ModelConfig, build
from lmforge.tokenizer import ByteTokenizer

V = 48


def _model(**fields):
    torch.manual_seed(0)
    return build(ModelConfig(**fields)).eval()


@pytest.fixture(scope="module")
def gpt2():
    return _model(vocab_size=V, context_length=32, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh",
                  positional="learned", init_std=0.1)


@pytest.fixture(scope="module")
def llama():
    return _model(vocab_size=V, context_length=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  activation="swiglu", norm="rmsnorm", positional="rope", bias=False, tie_embeddings=False,
                  init_std=0.1)


@pytest.fixture(scope="module")
def bigram():
    return _model(arch="bigram", vocab_size=V, context_length=16, n_layer=1, n_head=1, n_embd=V,
                  positional="none", init_std=1.0)


@pytest.fixture(params=["gpt2", "llama", "bigram"])
def any_model(request):
    return request.getfixturevalue(request.param)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]


# ------------------------------------------------------------------------- cache parity
@pytest.mark.parametrize("prompts", [PROMPTS[1], PROMPTS], ids=["single", "padded-batch"])
def test_cached_equals_uncached(any_model, prompts):
    ids_c, logits_c = generate(any_model, prompts, temperature=0, max_new_tokens=8, return_logits=True)
    ids_u, logits_u = generate(any_model, prompts, temperature=0, max_new_tokens=8, return_logits=True,
                               use_cache=False)
    assert ids_c == ids_u
    assert logits_c.shape[-2:] == (8, V)
    torch.testing.assert_close(logits_c, logits_u, atol=1e-5, rtol=0)


def test_decode_feeds_one_token_into_a_fixed_size_cache(llama):
    seen = []
    hook = llama.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].shape[1], kwargs["cache"].max_len)), with_kwargs=True)
    try:
        generate(llama, [1, 2, 3, 4, 5], temperature=0, max_new_tokens=30)  # slides past context 16
    finally:
        hook.remove()
    assert seen[0] == (5, 16) and all(s == (1, 16) for s in seen[1:]) and len(seen) == 30


# ------------------------------------------------------------------------------ batching
def test_left_padded_batch_equals_each_prompt_alone(any_model):
    batch = generate(any_model, PROMPTS, temperature=0, max_new_tokens=10)
    assert batch == [generate(any_model, p, temperature=0, max_new_tokens=10) for p in PROMPTS]


def test_repeated_prompts_are_prefilled_once(llama):
    a, b = [1, 2, 3, 4], [7, 8]
    rows = []
    hook = llama.register_forward_pre_hook(lambda m, args, kwargs: rows.append(tuple(args[0].shape)),
                                           with_kwargs=True)
    try:
        out, logits = generate(llama, [a, a, b, a], temperature=0, max_new_tokens=6, return_logits=True)
    finally:
        hook.remove()
    assert rows[0] == (2, 4) and rows[1] == (4, 1)  # prefill: the two distinct prompts; decode: all four rows
    assert out == [generate(llama, p, temperature=0, max_new_tokens=6) for p in (a, a, b, a)]
    _, alone = generate(llama, [a, b], temperature=0, max_new_tokens=6, return_logits=True)
    torch.testing.assert_close(logits[[0, 1, 3]], alone[[0, 0, 0]], atol=1e-5, rtol=0)
    sampled = generate(llama, [a, a, a], temperature=1.0, max_new_tokens=8, seed=3)
    assert len({tuple(x) for x in sampled}) > 1  # copies share the prompt, not the draws


def test_single_prompt_returns_flat_list_and_tensor_prompts_work(gpt2):
    out = generate(gpt2, [1, 2, 3], temperature=0, max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 4 and all(isinstance(t, int) for t in out)
    assert generate(gpt2, torch.tensor([[1, 2, 3]]), temperature=0, max_new_tokens=4) == [out]
    assert generate(gpt2, [1, 2, 3], max_new_tokens=0) == []


# ------------------------------------------------------------------------------ sampling
def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(llama):
    state = torch.get_rng_state()
    a = generate(llama, PROMPTS, seed=1, max_new_tokens=20)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(llama, PROMPTS, seed=1, max_new_tokens=20) == a
    assert generate(llama, PROMPTS, seed=2, max_new_tokens=20) != a


def test_top_k_1_and_tiny_top_p_equal_greedy(gpt2):
    greedy = generate(gpt2, PROMPTS, temperature=0, max_new_tokens=10)
    assert generate(gpt2, PROMPTS, top_k=1, seed=3, max_new_tokens=10) == greedy
    assert generate(gpt2, PROMPTS, top_p=1e-6, seed=3, max_new_tokens=10) == greedy


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, SamplingConfig(top_k=2), g).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # ~0.64, 0.24, 0.09, ...: top_p=0.8 keeps exactly the first two
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_next_token(logits, SamplingConfig(top_p=0.8), g).tolist()) == {0, 1}


def test_repetition_penalty_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0]])  # positive / 2, negative * 2, unseen unchanged
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), expected)


def test_repetition_penalty_changes_output():
    m = _model(arch="bigram", vocab_size=8, context_length=16, n_layer=1, n_head=1, n_embd=8, positional="none")
    with torch.no_grad():  # token 3 prefers itself (2.0) over 4 (1.5); token 4 likewise over 5
        m.table.weight.zero_()
        m.table.weight[3, 3], m.table.weight[3, 4] = 2.0, 1.5
        m.table.weight[4, 4], m.table.weight[4, 5] = 2.0, 1.5
    assert generate(m, [3], temperature=0, max_new_tokens=3) == [3, 3, 3]
    assert generate(m, [3], temperature=0, max_new_tokens=2, repetition_penalty=2.0) == [4, 5]


# ------------------------------------------------------------------------------ stopping
def test_eos_stops_and_is_not_included(gpt2):
    free = generate(gpt2, [1, 2, 3], temperature=0, max_new_tokens=12)
    eos = free[5]
    cut = free.index(eos)
    assert generate(gpt2, [1, 2, 3], temperature=0, max_new_tokens=12, eos_id=eos) == free[:cut]
    batch = generate(gpt2, [[1, 2, 3], [7, 8]], temperature=0, max_new_tokens=12, eos_id=eos)
    assert batch[0] == free[:cut]


TEXT = "añ世🙂!"  # 1-, 2-, 3- and 4-byte characters; all 11 bytes distinct


@pytest.fixture(scope="module")
def scripted():
    """A bigram model that, from "a", spells the rest of TEXT byte by byte and then emits eos."""
    tok = ByteTokenizer()
    m = _model(arch="bigram", vocab_size=tok.vocab_size, context_length=8, n_layer=1, n_head=1,
               n_embd=tok.vocab_size, positional="none")
    chain = list(TEXT.encode()) + [tok.eos_id]
    with torch.no_grad():
        m.table.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            m.table.weight[a, b] = 10.0
    return m, tok


def test_scripted_text_with_eos(scripted):
    m, tok = scripted
    assert generate_text(m, tok, "a", temperature=0, max_new_tokens=50) == TEXT[1:]
    assert generate(m, tok.encode("a"), tokenizer=tok, temperature=0, max_new_tokens=50) == list(TEXT[1:].encode())


def test_min_new_tokens_holds_eos_back(scripted):
    m, tok = scripted
    n = len(TEXT[1:].encode())  # the scripted model says eos right after these bytes
    kw = dict(tokenizer=tok, temperature=0, max_new_tokens=n + 3)
    assert generate(m, tok.encode("a"), **kw, min_new_tokens=n) == list(TEXT[1:].encode())  # eos allowed by then
    longer = generate(m, tok.encode("a"), **kw, min_new_tokens=n + 2)
    assert len(longer) == n + 3 and longer[:n] == list(TEXT[1:].encode())  # eos drawn only at the last step
    assert tok.eos_id not in longer[:n + 2]
    with pytest.raises(ConfigError, match="min_new_tokens"):
        SamplingConfig(min_new_tokens=-1)


@pytest.mark.parametrize("stop, text", [("🙂", "ñ世"), ("!", "ñ世🙂"), (["x", "世"], "ñ"), ("世X", "ñ世🙂!")])
def test_stop_strings(scripted, stop, text):
    m, tok = scripted
    kw = dict(temperature=0, max_new_tokens=50, stop=stop)
    assert generate_text(m, tok, "a", **kw) == text
    assert "".join(stream_text(m, tok, "a", **kw)) == text
    ids = generate(m, tok.encode("a"), tokenizer=tok, **kw)
    assert tok.decode(ids) == text
    assert list(stream(m, tok.encode("a"), tokenizer=tok, **kw)) == ids


def test_stop_string_cutting_a_token_keeps_the_text_before_it(scripted):
    m, tok = scripted  # the stop "ñ世🙂" spans from the first generated byte: nothing survives
    assert generate_text(m, tok, "a", temperature=0, max_new_tokens=50, stop="ñ世🙂") == ""
    assert generate(m, tok.encode("a"), tokenizer=tok, temperature=0, max_new_tokens=50, stop="ñ世🙂") == []


def test_stream_text_yields_only_whole_characters(scripted):
    m, tok = scripted
    pieces = list(stream_text(m, tok, "a", temperature=0, max_new_tokens=50))
    assert "".join(pieces) == TEXT[1:] and len(pieces) == 4
    assert all(p and "\ufffd" not in p for p in pieces)


def test_generate_text_batch_random_model():
    tok = ByteTokenizer()
    m = _model(arch="bigram", vocab_size=tok.vocab_size, context_length=8, n_layer=1, n_head=1,
               n_embd=tok.vocab_size, positional="none")
    out = generate_text(m, tok, ["hi", "hello there"], seed=0, max_new_tokens=5)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(seed=5, top_k=10, repetition_penalty=1.3)])
def test_stream_equals_generate(any_model, kw):
    assert list(stream(any_model, PROMPTS[1], max_new_tokens=12, **kw)) == \
        generate(any_model, PROMPTS[1], max_new_tokens=12, **kw)


def test_stream_restores_train_mode(llama):
    llama.train()
    try:
        it = stream(llama, [1, 2], temperature=0, max_new_tokens=5)
        next(it)
        assert not llama.training and not torch.is_inference_mode_enabled()
        it.close()
        assert llama.training
        generate(llama, [1, 2], temperature=0, max_new_tokens=3)
        assert llama.training
    finally:
        llama.eval()


# ------------------------------------------------------------------------ context length
def test_context_overflow_error_refuses_too_long_requests_before_compute(gpt2):
    calls = []
    hook = gpt2.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=r"30 tokens.*max_new_tokens=3.*context_length 32"):
            generate(gpt2, list(range(30)), max_new_tokens=3, context_overflow="error")
        with pytest.raises(InputError, match="context_length 32"):
            stream(gpt2, list(range(30)), max_new_tokens=3, context_overflow="error")
    finally:
        hook.remove()
    assert calls == []
    assert len(generate(gpt2, list(range(30)), max_new_tokens=2, temperature=0,
                        context_overflow="error")) == 2  # exactly fits


def test_context_overflow_option_is_validated():
    with pytest.raises(ConfigError, match="sampling.context_overflow"):
        SamplingConfig(context_overflow="slide")


def _nanogpt_greedy(model, prompt, n):
    """The reference: crop to the last context_length tokens and run them all, every step."""
    ids, C = list(prompt), model.config.context_length
    with torch.no_grad():
        for _ in range(n):
            window = torch.tensor([ids[-C:]])
            ids.append(int(model(window)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("use_cache", [True, False])
def test_learned_positions_crop_past_the_context_like_nanogpt(gpt2, use_cache):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]  # context 32: 8 + 40 new tokens runs 16 past it
    want = _nanogpt_greedy(gpt2, prompt, 40)
    assert generate(gpt2, prompt, temperature=0, max_new_tokens=40, use_cache=use_cache) == want
    long = list(range(1, 41))  # a prompt beyond the context keeps its last 32 tokens
    assert generate(gpt2, long, temperature=0, max_new_tokens=5, use_cache=use_cache) == \
        _nanogpt_greedy(gpt2, long[-32:], 5)
    # in a left-padded batch each row crops as it would alone
    batch = generate(gpt2, [[7, 8], prompt], temperature=0, max_new_tokens=40, use_cache=use_cache)
    assert batch[1] == want
    assert batch[0] == _nanogpt_greedy(gpt2, [7, 8], 40)


@pytest.mark.parametrize("use_cache", [True, False])
def test_rope_and_positionless_models_slide_past_the_context(llama, bigram, use_cache):
    for m in (llama, bigram):  # context 16
        assert len(generate(m, [1, 2, 3], temperature=0, max_new_tokens=40, use_cache=use_cache)) == 40
        assert len(generate(m, list(range(1, 21)), seed=0, max_new_tokens=5, use_cache=use_cache)) == 5
        assert len(generate(m, PROMPTS, temperature=0, max_new_tokens=20, use_cache=use_cache)[0]) == 20
        long, short = list(range(1, 31)), [5, 6]  # a prompt beyond the context keeps its last 16 tokens
        batch = generate(m, [short, long], temperature=0, max_new_tokens=4, use_cache=use_cache)
        assert batch == [generate(m, short, temperature=0, max_new_tokens=4, use_cache=use_cache),
                         generate(m, long[-16:], temperature=0, max_new_tokens=4, use_cache=use_cache)]


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value", [("top_p", 1.5), ("top_p", 0.0), ("top_k", 0), ("temperature", -1.0),
                                          ("max_new_tokens", -1), ("repetition_penalty", 0.0),
                                          ("stop", [""]), ("seed", "x"), ("eos_id", -2)])
def test_bad_sampling_config(field, value):
    with pytest.raises(ConfigError, match=f"sampling.{field}: got"):
        SamplingConfig(**{field: value})


def test_bad_calls(gpt2):
    with pytest.raises(ConfigError, match="sampling.top_k"):
        generate(gpt2, [1], top_k=0)
    with pytest.raises(ConfigError, match="sampling.topk: unknown option"):
        generate(gpt2, [1], topk=3)
    with pytest.raises(ConfigError, match="sampling.stop: .*tokenizer"):
        generate(gpt2, [1], stop=["x"])
    with pytest.raises(InputError, match="prompt 1: token id 99 is out of range"):
        generate(gpt2, [[1], [2, 99]])
    with pytest.raises(InputError, match="prompt 0: .*non-empty"):
        generate(gpt2, [[]])
    with pytest.raises(InputError, match="decoder or bigram"):
        generate(build(ModelConfig(arch="encoder", vocab_size=V, n_layer=1, n_head=2, n_embd=16)), [1])
    assert generate(gpt2, [1], SamplingConfig(temperature=0), max_new_tokens=2) == \
        generate(gpt2, [1], {"temperature": 0, "max_new_tokens": 2})
