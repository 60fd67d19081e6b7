"""Odd input: near-zero top_p, a chat message too long for the context, infinite temperature,
--system without --chat, Ctrl-C while the CLI starts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmforge.chat_session import ChatSession, run_chat
from lmforge.generate import SamplingConfig, sample_next_token
from tests.faults import faultkit


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45, 1e-8])
def test_tiny_top_p_keeps_the_top_token(top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3  # (B, V)
    got = sample_next_token(logits, SamplingConfig(temperature=1.0, top_p=top_p), generator=g)
    assert torch.equal(got, logits.argmax(-1))


def test_top_p_matches_transformers_warper():
    """The same kept set as transformers' TopPLogitsWarper on random logits (the oracle)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 64, generator=g) * 2
    for top_p in (0.05, 0.5, 0.9):
        ref = TopPLogitsWarper(top_p, min_tokens_to_keep=1)(None, logits.clone())
        keep_ref = torch.isfinite(ref)
        draws = torch.stack([sample_next_token(logits, SamplingConfig(temperature=1.0, top_p=top_p),
                                               generator=g) for _ in range(200)], 1)  # (B, 200)
        assert keep_ref.gather(1, draws).all(), top_p  # never a token the oracle removes


def _session(**kw):
    from lmforge.model import ModelConfig, build

    tok = faultkit.tiny_tokenizer()
    torch.manual_seed(0)
    model = build(ModelConfig(**{**faultkit.TINY, "vocab_size": tok.vocab_size, "context_length": 512}))
    return ChatSession(model.eval(), tok, temperature=0.0, max_tokens=4, **kw)


def test_too_long_message_leaves_the_conversation_and_save_keeps_it(tmp_path):
    session = _session()
    out = io.StringIO()
    lines = ["hello", "how are you", "a" * 5000, f"/save {tmp_path / 'c.json'}", "/temperature inf",
             "/temperature nan", "/top_p 1e-300", "the dog"]
    run_chat(session, stdin=io.StringIO("\n".join(lines) + "\n"), stdout=out)
    text = out.getvalue()
    assert "error: the message is" in text
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["content"] for m in saved if m["role"] == "user"] == ["hello", "how are you"]
    assert len(saved) == 4  # two user turns and their answers
    assert "/temperature: got 'inf', expected a finite number >= 0" in text
    assert "/temperature: got 'nan'" in text
    assert "[top_p = 1e-300]" in text
    assert session.messages[-2]["content"] == "the dog"  # answered after all that


def test_cli_chat_refuses_infinite_temperature(tmp_path):
    from lmforge.store import save_model

    from lmforge.model import ModelConfig, build
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer("char", [faultkit.TEXT], specials=["<|unk|>", "<|end|>", "<|user|>", "<|assistant|>"])  # may chat
    model = build(ModelConfig(**{**faultkit.TINY, "vocab_size": tok.vocab_size}))
    folder = save_model(model, tmp_path / "m", tokenizer=tok)
    r = faultkit.cli("chat", "--model", folder, "--temperature", "inf", cwd=tmp_path, input="")
    faultkit.assert_one_line_error(r, "--temperature", "finite")


def test_generate_system_without_chat_refused_before_loading(tmp_path, capsys):
    from lmforge.cli import main

    code = main(["generate", "--model", str(tmp_path / "missing"), "--system", "be brief", "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "--system needs --chat" in err and len(err.strip().splitlines()) == 1


def test_generate_top_p_1e_300_cli(tmp_path, capsys):
    from lmforge.cli import main

    folder = faultkit.model_folder(tmp_path / "m")
    code = main(["generate", "--model", str(folder), "--prompt", "the", "--top-p", "1e-300",
                 "--max-new-tokens", "4", "--seed", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    greedy = main(["generate", "--model", str(folder), "--prompt", "the", "--temperature", "0",
                   "--max-new-tokens", "4"])
    assert greedy == 0 and capsys.readouterr().out == out.out  # only the top token was ever kept


def _importing_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches /proc/PID/maps for the torch import")
@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_ctrl_c_while_the_cli_starts_exits_130_quietly(tmp_path, delay):
    """SIGINT while the verb is still importing torch / loading the model (``delay`` seconds after
    the torch libraries appear in the process; before that the interpreter itself is starting)."""
    folder = faultkit.model_folder(tmp_path / "m")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "generate", "--model", str(folder), "--prompt",
                          "the", "--max-new-tokens", "100000", "--temperature", "0"], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _importing_torch(p.pid) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
