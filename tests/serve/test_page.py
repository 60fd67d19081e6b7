"""The chat page at GET /: self-contained HTML; its streaming code (run under Node where Node is
installed) gets the model's greedy answer and stops an answer mid-stream, freeing the slot; a
headless Chromium (where installed) asks a question through the page itself."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from tests.serve.serve_helpers import TIMEOUT, running_server, save_tiny_model  # noqa: E402

from lmforge.chat import render  # noqa: E402
from lmforge.generate import generate, generate_text  # noqa: E402
from lmforge.serve.app import ServeLimits, create_app  # noqa: E402
from lmforge.serve.batcher import Batcher  # noqa: E402
from lmforge.serve.loading import load_model_for_serving  # noqa: E402

LONG = 400


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("page") / "tiny-chat")
    model, tok, name = load_model_for_serving(folder)
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


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages separated by NUL bytes on fds 3 and 4), so no websocket client is needed."""

    def __init__(self, binary: str, profile):
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", "about:blank"]
        # the launcher puts our pipe ends on fds 3 and 4, where chromium expects them
        launch = ("import fcntl, os, sys; a, b = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]); "
                  "os.dup2(a, 3); os.dup2(b, 4); os.execvp(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", launch, str(cmd_r), str(resp_w), binary, *flags],
                                     pass_fds=(cmd_r, resp_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(resp_w)
        self._buf, self._next = b"", 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + TIMEOUT
        while True:  # skip events until our answer
            while b"\0" not in self._buf:
                left = end - time.monotonic()
                assert left > 0 and select.select([self._resp_r], [], [], left)[0], f"no answer to {method}"
                chunk = os.read(self._resp_r, 1 << 16)
                assert chunk, "chromium exited"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str) -> str:
        target = self.send("Target.createTarget", url=url)["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        end = time.monotonic() + TIMEOUT
        while True:  # until the page has loaded (evaluating during the navigation may fail)
            try:
                loaded = f"return document.readyState === 'complete' && location.href === {json.dumps(url)}"
                if self.run(session, loaded):
                    return session
            except AssertionError:
                pass
            assert time.monotonic() < end, f"{url} did not load"
            time.sleep(0.05)

    def run(self, session: str, script: str):
        """The value of an async JavaScript function body run in the page."""
        r = self.send("Runtime.evaluate", session, expression=f"(async () => {{ {script} }})()", awaitPromise=True,
                      returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"].get("exception", {}).get("description")
        return r["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except AssertionError:
            pass
        os.close(self._cmd_w)
        os.close(self._resp_r)
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


UNTIL = """
  const until = async (ok, what) => {
    const end = Date.now() + %d;
    while (!ok()) {
      if (Date.now() > end) throw new Error("timed out waiting for " + what + "; the page: " + document.body.innerHTML);
      await new Promise(r => setTimeout(r, 10));
    }
  };
""" % (TIMEOUT * 200)

ASK = UNTIL + """
  await until(() => document.getElementById("model") && document.getElementById("model").textContent === %(model)s,
              "the model name");
  if (%(clear)s) document.getElementById("clear").click();
  document.getElementById("temperature").value = "0";
  document.getElementById("max_tokens").value = "%(max_tokens)d";
  document.getElementById("input").value = %(question)s;
  document.getElementById("send").click();
  const out = [...document.querySelectorAll(".msg")].pop();  // the answer's box, added at once
  const ended = () => out.dataset.finish || out.className.includes("error");
  if (%(stop)s) {
    await until(() => out.textContent.length > 0 || ended(), "the answer to start");
    document.getElementById("stop").click();
  }
  await until(ended, "the answer to end");
  return {finish: out.dataset.finish, error: out.className.includes("error") ? out.textContent : null,
          text: out.firstChild ? out.firstChild.textContent : "", turns: document.querySelectorAll(".msg").length,
          stopDisabled: document.getElementById("stop").disabled};
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed")
def test_page_in_headless_chromium(served, tmp_path):
    """The page itself: ask, watch the answer stream in, ask again in the same conversation, Stop."""
    prompt = render([{"role": "user", "content": "Once upon a time"}], served["tok"], add_generation_prompt=True)
    assert len(generate(served["model"], served["tok"].encode(prompt), tokenizer=served["tok"], max_new_tokens=LONG,
                        temperature=0)) == LONG  # the long answer does not end on its own
    browser = Browser(CHROMIUM, tmp_path / "profile")
    try:
        page = browser.open(served["url"] + "/")
        ask = lambda q, n, stop=False, clear=False: browser.run(page, ASK % {  # noqa: E731
            "model": json.dumps(served["name"]), "question": json.dumps(q), "max_tokens": n,
            "stop": "true" if stop else "false", "clear": "true" if clear else "false"})
        first = ask("Hello there", 24)
        assert first["text"] == _greedy_answer(served, "Hello there", 24) and first["error"] is None
        assert first["finish"] in ("stop", "length") and first["turns"] == 2 and first["stopDisabled"]
        # the second question is asked with the first exchange before it (the conversation is kept)
        second = ask("And then?", 16)
        history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first["text"]},
                   {"role": "user", "content": "And then?"}]
        text = render(history, served["tok"], add_generation_prompt=True)
        assert second["text"] == generate_text(served["model"], served["tok"], text, max_new_tokens=16, temperature=0)
        assert second["turns"] == 4
        # a refused question shows the server's error and stays out of the conversation
        refused = ask("Once upon a time", LONG)
        assert "more than the model's context" in refused["error"] and refused["turns"] == 6
        # a fresh conversation, and Stop in the middle of a long answer
        before = served["batcher"].stats()["cancelled"]
        stopped = ask("Once upon a time", LONG, stop=True, clear=True)
        assert stopped["finish"] == "stopped" and stopped["turns"] == 2 and 0 < len(stopped["text"])
    finally:
        browser.close()
    end = time.monotonic() + TIMEOUT  # Stop freed the slot on the server
    while served["batcher"].stats()["cancelled"] == before or served["batcher"].stats()["running"]:
        assert time.monotonic() < end, "the stopped answer kept its slot"
        time.sleep(0.02)
