"""``lmforge serve`` as a real process: SIGTERM lets the answer in flight finish, then it exits 0;
bad arguments are one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serve.serve_helpers import TIMEOUT, free_port, save_tiny_model  # noqa: E402

from lmforge.generate import generate_text  # noqa: E402
from lmforge.serve.loading import load_model_for_serving  # noqa: E402

N = 300  # answer tokens: still running when SIGTERM arrives


def _start(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_drains_the_answer_in_flight(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    model, tok, _ = load_model_for_serving(folder)
    prompt = "Once upon a time"
    expected = generate_text(model, tok, prompt, max_new_tokens=N, temperature=0)
    port = free_port()
    proc = _start("--model", folder, "--port", port, "--log-level", "warning", "--max-tokens", N, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + TIMEOUT
        while True:  # wait for it to listen
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server did not start"
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": N, "temperature": 0, "stream": True}
        pieces, finish, done = [], None, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"])
                finish = choice["finish_reason"] or finish
                if len(pieces) == 1:
                    proc.send_signal(signal.SIGTERM)  # mid-answer
        assert done and finish == "length" and "".join(pieces) == expected
        assert proc.wait(TIMEOUT) == 0
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


@pytest.mark.parametrize("args,needle", [
    (["--model", "no/such/folder"], "no/such/folder"),
    (["--model", "{tiny}", "--max-batch", "0"], "--max-batch"),
    (["--model", "{tiny}", "--max-waiting", "-1"], "--max-waiting"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, needle):
    from lmforge.cli import main

    folder = save_tiny_model(tmp_path / "tiny", context_length=32)
    code = main(["serve", *[a.format(tiny=folder) for a in args], "--port", str(free_port())])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and needle in lines[0], lines


def test_quantize_choices_are_the_library_methods():
    """serve and the CLI list the modes literally (their parsers must not import torch): the
    library's list and theirs are the same."""
    import argparse

    from lmforge.cli import _quantize_arg
    from lmforge.model.quantize import METHODS
    from lmforge.serve.command import add_serve_args

    for add in (add_serve_args, _quantize_arg):
        p = argparse.ArgumentParser()
        add(p)
        action = next(a for a in p._actions if a.dest == "quantize")
        assert tuple(action.choices) == METHODS
