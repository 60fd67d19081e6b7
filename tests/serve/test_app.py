"""lmforge serve over HTTP on loopback: the official openai client against it unchanged (chat,
completions, streaming, n, seed, stop, usage), concurrent requests batched, bad input answered
with 4xx OpenAI-style errors while the server keeps serving, 429 when full, and a client leaving
mid-stream freeing its slot."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.serve.serve_helpers import TIMEOUT, running_server, save_tiny_model  # noqa: E402

from lmforge.chat import render  # noqa: E402
from lmforge.generate import generate, generate_text  # noqa: E402
from lmforge.serve.app import ServeLimits, create_app  # noqa: E402
from lmforge.serve.batcher import Batcher  # noqa: E402
from lmforge.serve.loading import load_model_for_serving  # noqa: E402

LONG = 400  # an answer long enough to still be running while a test acts on it


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-chat")
    model, tok, name = load_model_for_serving(folder)
    assert name == "tiny-chat"
    app = create_app(Batcher(model, tok, max_batch=4, max_waiting=8), name, ServeLimits(max_tokens=LONG + 50))
    with running_server(app) as url:
        yield {"url": url, "model": model, "tok": tok, "name": name, "app": app}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _chat_prompt(served, messages):
    return render(messages, served["tok"], add_generation_prompt=True)


def _alone(served, text, **kw):
    """What lmforge.generate gives ``text`` alone: (answer text, number of answer tokens)."""
    ids = served["tok"].encode(text)
    toks = generate(served["model"], ids, tokenizer=served["tok"], **kw)
    return generate_text(served["model"], served["tok"], text, **kw), len(toks)


# ------------------------------------------------------------------------- the openai client
def test_openai_chat_greedy_equals_generate(served, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    r = client.chat.completions.create(model=served["name"], messages=messages, temperature=0, max_tokens=24)
    prompt = _chat_prompt(served, messages)
    text, n = _alone(served, prompt, max_new_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == served["name"] and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if n == 24 else "stop")
    assert r.usage.prompt_tokens == len(served["tok"].encode(prompt))
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n


def test_openai_chat_stream(served, client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    stream = client.chat.completions.create(model=served["name"], messages=messages, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text, n = _alone(served, _chat_prompt(served, messages), max_new_tokens=30, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if n == 30 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert len(chunks) > 3  # it came in pieces


def test_openai_completions_n_seed_stop(served, client):
    prompt = "Once upon a time"
    r = client.completions.create(model=served["name"], prompt=prompt, max_tokens=20, temperature=0.9, top_p=0.95,
                                  seed=11, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    for j, c in enumerate(r.choices):  # choice j is seeded with seed + j
        assert c.text == _alone(served, prompt, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=11 + j)[0]
    greedy, _ = _alone(served, prompt, max_new_tokens=20, temperature=0)
    stop = greedy[5:7]
    r = client.completions.create(model=served["name"], prompt=[prompt, "xyz"], max_tokens=20, temperature=0,
                                  stop=[stop], echo=True)
    assert r.choices[0].text == prompt + _alone(served, prompt, max_new_tokens=20, temperature=0, stop=[stop])[0]
    assert r.choices[0].finish_reason == "stop" and r.choices[1].text.startswith("xyz")
    streamed = client.completions.create(model=served["name"], prompt=prompt, max_tokens=20, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == greedy


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [served["name"]]
    h = httpx.get(served["url"] + "/health", timeout=TIMEOUT).json()
    assert h["status"] == "ok" and h["model"] == served["name"] and h["max_batch"] == 4


def test_concurrent_requests_are_batched_and_exact(served, client):
    prompts = ["A cat", "The dog barked at", "Hi", "Numbers: 1 2 3"]

    def ask(p):
        return client.completions.create(model=served["name"], prompt=p, max_tokens=60, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, prompts))
    for p, text in zip(prompts, got):
        assert text == _alone(served, p, max_new_tokens=60, temperature=0)[0]
    h = httpx.get(served["url"] + "/health", timeout=TIMEOUT).json()
    assert h["max_batch_seen"] >= 2 and h["running"] == 0


# ------------------------------------------------------------------------- bad input
def _post(served, path, content, **headers):
    return httpx.post(served["url"] + path, content=content, timeout=TIMEOUT,
                      headers={"content-type": "application/json", **headers})


BAD = [
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', 400, "malformed JSON"),
    ("/v1/chat/completions", b'\xff\xfe{"model": 1}', 400, "not valid UTF-8"),
    ("/v1/chat/completions", b'[1, 2]', 400, "expected a JSON object"),
    ("/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
     404, "expected 'tiny-chat'"),
    ("/v1/chat/completions", json.dumps({"model": "tiny-chat", "messages": []}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "tiny-chat", "messages": [{"role": "tool", "content": "x"}]}),
     400, "messages[0].role"),
    ("/v1/chat/completions", json.dumps({"model": "tiny-chat", "messages": [{"role": "system", "content": "x"}]}),
     400, "no user message"),
    ("/v1/chat/completions", json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]}),
     400, "messages[0].content"),
    ("/v1/chat/completions", json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 100}],
                                         "max_tokens": 440}), 400, "more than the model's context of 512"),
    ("/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x" * 600}), 400, "600 tokens"),
    ("/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x", "max_tokens": 999}), 400, "server's limit"),
    ("/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x", "temperature": "0.5"}), 400, "temperature"),
    ("/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
     400, "stop"),
    ("/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x", "frequency_penalty": 0.5}), 400,
     "not supported"),
    ("/v1/completions", json.dumps({"prompt": "x"}), 400, "model: field required"),
    ("/v1/nothing", b"{}", 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[b[3] for b in BAD])
def test_bad_input_gets_openai_error_and_server_keeps_serving(served, path, body, status, words):
    r = _post(served, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and words.lower() in err["message"].lower(), err
    assert "\n" not in err["message"]
    ok = _post(served, "/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x", "max_tokens": 2}))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 0


def test_openai_client_sees_the_errors(served, client):
    with pytest.raises(openai.NotFoundError, match="model_not_found|expected 'tiny-chat'"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=served["name"], prompt="x" * 100, max_tokens=440)


# ------------------------------------------------------------------------- full, and leaving
@pytest.fixture(scope="module")
def small(served):
    """A second server with one slot and no waiting room."""
    batcher = Batcher(served["model"], served["tok"], max_batch=1, max_waiting=0)
    app = create_app(batcher, served["name"], ServeLimits(max_tokens=LONG + 50))
    with running_server(app) as url:
        yield {**served, "url": url, "batcher": batcher,
               "batcher_stats": lambda: httpx.get(url + "/health", timeout=TIMEOUT).json()}


def _long_prompt(served):
    """A prompt whose greedy answer runs the full LONG tokens (no end-of-sequence token before)."""
    prompt = "Once upon a time"
    assert len(generate(served["model"], served["tok"].encode(prompt), tokenizer=served["tok"], max_new_tokens=LONG,
                        temperature=0)) == LONG
    return prompt


def test_full_server_answers_429_and_a_leaving_client_frees_its_slot(small):
    prompt = _long_prompt(small)
    body = {"model": small["name"], "prompt": prompt, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", small["url"] + "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
            busy = http.post(small["url"] + "/v1/completions", json={**body, "stream": False})
            assert busy.status_code == 429, busy.text
            assert busy.json()["error"]["type"] == "rate_limit_error"
        # the stream is closed mid-answer: the server cancels it and frees the slot
        end = time.monotonic() + TIMEOUT
        while small["batcher_stats"]()["running"] or small["batcher_stats"]()["cancelled"] < 1:
            assert time.monotonic() < end, "the slot was not freed"
            time.sleep(0.02)
    stats = small["batcher_stats"]()
    assert stats["cancelled"] == 1 and stats["running"] == 0 and stats["waiting"] == 0
    gone = small["batcher"].finished[-1]
    assert gone.finish_reason == "cancelled" and 0 < len(gone.tokens) < LONG  # generation stopped early
    r = httpx.post(small["url"] + "/v1/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_client_leaving_a_plain_request_frees_its_slot(small):
    """Not streamed: the server notices the closed connection while it waits for the answer."""
    prompt = _long_prompt(small)
    before = small["batcher_stats"]()["cancelled"]
    body = {"model": small["name"], "prompt": prompt, "max_tokens": LONG, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(small["url"] + "/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.05))
    end = time.monotonic() + TIMEOUT
    while small["batcher_stats"]()["cancelled"] == before or small["batcher_stats"]()["running"]:
        assert time.monotonic() < end, "the slot was not freed"
        time.sleep(0.02)
    gone = small["batcher"].finished[-1]
    assert gone.finish_reason == "cancelled" and len(gone.tokens) < LONG


def test_a_closing_server_answers_503(served):
    batcher = Batcher(served["model"], served["tok"], max_batch=1)
    with running_server(create_app(batcher, served["name"])) as url:
        batcher.close()  # what the shutdown does once the requests in flight have finished
        r = httpx.post(url + "/v1/completions", json={"model": served["name"], "prompt": "x"}, timeout=TIMEOUT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "draining"
