"""Continuous batching (lmforge.serve.batcher): requests that arrive while others decode join the
running batch and get exactly what lmforge.generate gives them alone; limits, cancel and drain."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from lmforge.errors import InputError
from lmforge.generate import SamplingConfig, generate, generate_text
from lmforge.model import ModelConfig, build
from lmforge.serve.batcher import Batcher, ServerBusy, ServerClosing, wait_all
from lmforge.tokenizer import ByteTokenizer

TIMEOUT = 60  # seconds any wait may take on a loaded 2-core machine


def _model(**fields):
    torch.manual_seed(0)
    base = dict(vocab_size=ByteTokenizer().vocab_size, n_layer=2, n_head=4, n_embd=32, init_std=0.1)
    return build(ModelConfig(**{**base, **fields})).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    if request.param == "llama":
        return _model(context_length=96, n_kv_head=2, activation="swiglu", norm="rmsnorm", positional="rope",
                      bias=False, tie_embeddings=False)
    return _model(context_length=96, activation="gelu_tanh", positional="learned")


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def _wait_for(cond, what: str):
    end = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


PROMPTS = ["Once upon a time", "A", "The quick brown fox jumps", "hello there, how are", "xyz"]


def test_staggered_greedy_equals_alone(model, tok):
    """Requests joining a running batch at different steps (and leaving at different steps) get
    the greedy tokens lmforge.generate gives each one alone."""
    lengths = [40, 25, 33, 12, 30]
    batcher = Batcher(model, tok, max_batch=3, max_waiting=8).start()
    try:
        reqs = []
        for i, (p, n) in enumerate(zip(PROMPTS, lengths)):
            cfg = SamplingConfig(max_new_tokens=n, temperature=0)
            reqs.append(batcher.submit(tok.encode(p), cfg, lambda e: None))
            if i in (0, 2):  # the next ones arrive while this one is mid-answer
                _wait_for(lambda r=reqs[-1]: len(r.tokens) >= 5 or r.done, "a few tokens")
        assert wait_all(reqs, TIMEOUT)
        seen = batcher.stats()["max_batch_seen"]
    finally:
        batcher.close()
    assert seen >= 2, "the requests were never decoded together"
    for p, n, r in zip(PROMPTS, lengths, reqs):
        alone = generate(model, tok.encode(p), tokenizer=tok, max_new_tokens=n, temperature=0)
        assert r.tokens == alone, p
        assert r.finish_reason == ("length" if len(alone) == n else "stop")
        assert r.text == tok.decode(alone)


def test_seeded_sampling_and_stop_strings_match_generate(model, tok):
    """A seeded sampled request draws what generate draws with that seed; stop strings cut the
    text as generate_text does, and the streamed events join to the final text."""
    batcher = Batcher(model, tok, max_batch=4).start()
    events = queue.Queue()
    try:
        a = batcher.submit(tok.encode(PROMPTS[0]), SamplingConfig(max_new_tokens=30, temperature=0.9, top_p=0.9,
                                                                  seed=7), lambda e: None)
        greedy_text = generate_text(model, tok, PROMPTS[2], max_new_tokens=30, temperature=0)
        stop = greedy_text[8:10]  # a stop string the greedy answer meets
        b = batcher.submit(tok.encode(PROMPTS[2]), SamplingConfig(max_new_tokens=30, temperature=0, stop=[stop]),
                           events.put)
        assert wait_all([a, b], TIMEOUT)
    finally:
        batcher.close()
    assert a.tokens == generate(model, tok.encode(PROMPTS[0]), tokenizer=tok, max_new_tokens=30, temperature=0.9,
                                top_p=0.9, seed=7)
    expected = generate_text(model, tok, PROMPTS[2], max_new_tokens=30, temperature=0, stop=[stop])
    assert b.text == expected and b.finish_reason == "stop" and stop not in b.text
    got = []
    while not events.empty():
        got.append(events.get())
    assert "".join(e.text for e in got) == expected
    assert [e.finish_reason for e in got][-1] == "stop" and all(e.finish_reason is None for e in got[:-1])


def test_cancel_frees_the_slot(model, tok):
    batcher = Batcher(model, tok, max_batch=2).start()
    try:
        r = batcher.submit(tok.encode("Once"), SamplingConfig(max_new_tokens=90, temperature=0), lambda e: None)
        _wait_for(lambda: len(r.tokens) >= 3 or r.done, "a few tokens")
        r.cancel()
        assert r.wait(TIMEOUT)
        _wait_for(lambda: batcher.stats()["running"] == 0, "the slot to be freed")
        assert r.finish_reason == "cancelled" and len(r.tokens) < 90
        assert batcher.stats()["cancelled"] == 1
        # the batcher keeps serving
        s = batcher.submit(tok.encode("A"), SamplingConfig(max_new_tokens=5, temperature=0), lambda e: None)
        assert s.wait(TIMEOUT) and s.tokens == generate(model, tok.encode("A"), tokenizer=tok, max_new_tokens=5,
                                                         temperature=0)
    finally:
        batcher.close()


def test_limits_busy_and_closing(model, tok):
    cfg = SamplingConfig(max_new_tokens=4, temperature=0)
    batcher = Batcher(model, tok, max_batch=1, max_waiting=1)  # not started: nothing leaves the queue
    batcher.submit([1, 2], cfg, lambda e: None)
    batcher.submit([1, 2], cfg, lambda e: None)
    with pytest.raises(ServerBusy, match="full"):
        batcher.submit([1, 2], cfg, lambda e: None)
    with pytest.raises(InputError, match="prompt"):
        Batcher(model, tok).submit([], cfg, lambda e: None)
    # drain: close() lets both queued requests finish, then refuses new ones
    pending = list(batcher._waiting)
    batcher.start()
    assert batcher.close(drain=True, timeout=TIMEOUT)
    assert all(r.done and r.finish_reason in ("stop", "length") for r in pending)
    with pytest.raises(ServerClosing):
        batcher.submit([1, 2], cfg, lambda e: None)
    with pytest.raises(ServerBusy):  # n choices are taken all or none
        Batcher(model, tok, max_batch=1, max_waiting=1).submit_many([([1], cfg, print)] * 3)


def test_refuses_non_decoders(tok):
    torch.manual_seed(0)
    enc = build(ModelConfig(arch="encoder", vocab_size=64, n_layer=1, n_head=2, n_embd=16, context_length=16))
    with pytest.raises(InputError, match="decoder"):
        Batcher(enc, tok)


def test_a_failing_step_ends_its_requests_and_the_thread_keeps_serving(model, tok, monkeypatch):
    from lmforge.serve import batcher as batcher_mod

    real_step, calls = batcher_mod._RunningBatch.step, []

    def failing_once(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device fell over")
        return real_step(self)

    monkeypatch.setattr(batcher_mod._RunningBatch, "step", failing_once)
    events = queue.Queue()
    batcher = Batcher(model, tok).start()
    try:
        r = batcher.submit(tok.encode("Once"), SamplingConfig(max_new_tokens=10, temperature=0), events.put)
        assert r.wait(TIMEOUT) and r.finish_reason == "error"
        last = [events.get() for _ in range(events.qsize())][-1]
        assert last.finish_reason == "error" and "device fell over" in last.error
        s = batcher.submit(tok.encode("Once"), SamplingConfig(max_new_tokens=10, temperature=0), lambda e: None)
        assert s.wait(TIMEOUT) and s.tokens == generate(model, tok.encode("Once"), tokenizer=tok, max_new_tokens=10,
                                                         temperature=0)
        assert batcher.stats()["errors"] == 1 and batcher.stats()["running"] == 0
    finally:
        batcher.close()


def test_a_prompt_the_model_refuses_fails_alone(model, tok):
    """Taken in together with a good request, a prompt with a token id past the vocabulary ends
    with an error; the good one is answered as if alone."""
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    batcher = Batcher(model, tok)
    bad, good = batcher.submit_many([([1, model.config.vocab_size + 5], cfg, lambda e: None),
                                     (tok.encode("Once"), cfg, lambda e: None)])
    batcher.start()
    try:
        assert wait_all([bad, good], TIMEOUT)
    finally:
        batcher.close()
    assert bad.finish_reason == "error" and good.finish_reason in ("stop", "length")
    assert good.tokens == generate(model, tok.encode("Once"), tokenizer=tok, max_new_tokens=8, temperature=0)
