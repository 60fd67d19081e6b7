"""The chat page at GET /: self-contained HTML; its streaming code (run under Node where Node is
installed) gets the model's greedy answer and stops an answer mid-stream, freeing the slot; a
headless Chromium (where installed) asks a question through the page itself."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_helpers import TIMEOUT, running_server, save_tiny_model  # noqa: E402

from lmforge.chat import render  # noqa: E402
from lmforge.generate import generate, generate_text  # noqa: E402
from lmforge.serve.app import ServeLimits, create_app  # noqa: E402
from lmforge.serve.batcher import Batcher  # noqa: E402
from lmforge.serve.loading import load_model_for_serving  # noqa: E402

LONG = 400


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("page") / "tiny-chat")
    model, tok, name, _ = load_model_for_serving(folder)
    batcher = Batcher(model, tok, max_batch=2, max_waiting=2)
    with running_server(create_app(batcher, name, ServeLimits(max_tokens=LONG))) as url:
        yield {"url": url, "model": model, "tok": tok, "name": name, "batcher": batcher}


def _greedy_answer(served, question: str, n: int) -> str:
    prompt = render([{"role": "user", "content": question}], served["tok"], add_generation_prompt=True)
    return generate_text(served["model"], served["tok"], prompt, max_new_tokens=n, temperature=0)


def test_page_is_self_contained(served):
    r = httpx.get(served["url"] + "/", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script" in page and "/v1/chat/completions" in page
    # no external assets: nothing loaded from another origin
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", page)


NODE_SCRIPT = r"""
%(core)s
const base = %(base)s;
(async () => {
  const out = {};
  // 1. a greedy answer, streamed
  let text = "", pieces = 0;
  out.finish = await streamChat(base, {model: await modelName(base), temperature: 0, max_tokens: 24,
    messages: [{role: "user", content: "Hello there"}]}, (p) => { text += p; pieces += 1; });
  out.text = text; out.pieces = pieces;
  // 2. Stop: abort after the first piece of a long answer
  const ctl = new AbortController();
  let got = 0;
  try {
    await streamChat(base, {model: await modelName(base), temperature: 0, max_tokens: %(long)d,
      messages: [{role: "user", content: "Once upon a time"}]}, () => { got += 1; if (got === 1) ctl.abort(); },
      ctl.signal);
    out.aborted = "not aborted";
  } catch (e) { out.aborted = e.name; }
  // 3. a server error becomes an exception carrying the server's message
  try {
    await streamChat(base, {model: "nope", messages: [{role: "user", content: "hi"}]}, () => {});
  } catch (e) { out.error = e.message; }
  console.log(JSON.stringify(out));
})();
"""


def _core_script(page: str) -> str:
    m = re.search(r'<script id="lmforge-core">(.*?)</script>', page, re.S)
    assert m, "the page's core script block is missing"
    return m.group(1)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_page_streaming_code_under_node(served, tmp_path):
    page = httpx.get(served["url"] + "/", timeout=TIMEOUT).text
    prompt = render([{"role": "user", "content": "Once upon a time"}], served["tok"], add_generation_prompt=True)
    assert len(generate(served["model"], served["tok"].encode(prompt), tokenizer=served["tok"], max_new_tokens=LONG,
                        temperature=0)) == LONG  # the long answer does not end on its own
    before = served["batcher"].stats()["cancelled"]
    script = tmp_path / "page_core.js"
    script.write_text(NODE_SCRIPT % {"core": _core_script(page), "base": json.dumps(served["url"]), "long": LONG})
    r = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = _greedy_answer(served, "Hello there", 24)
    assert out["text"] == expected and out["pieces"] > 1
    assert out["finish"] in ("stop", "length")
    assert out["aborted"] == "AbortError"
    assert "expected 'tiny-chat'" in out["error"]
    end = time.monotonic() + TIMEOUT  # Stop freed the slot: the server cancelled the answer
    while served["batcher"].stats()["cancelled"] == before or served["batcher"].stats()["running"]:
        assert time.monotonic() < end, "the stopped answer kept its slot"
        time.sleep(0.02)
    assert 0 < len(served["batcher"].finished[-1].tokens) < LONG


CHROMIUM = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed")
def test_page_in_headless_chromium(served):
    """The page itself asks (?q=...), streams the answer into the conversation and shows it."""
    url = served["url"] + "/?q=Hello%20there&temperature=0&max_tokens=24"
    r = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=20000",
                        "--dump-dom", url], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'<div class="msg assistant" id="answer-1" data-finish="(\w+)">(.*?)(<div class="note">|</div>)',
                  r.stdout, re.S)
    assert m, r.stdout[-3000:]
    printable = lambda s: "".join(c for c in s if c.isprintable() or c in "\n\t")  # noqa: E731
    assert m.group(1) in ("stop", "length")
    assert printable(html.unescape(m.group(2))) == printable(_greedy_answer(served, "Hello there", 24))
    assert '<div class="msg user">Hello there</div>' in r.stdout
