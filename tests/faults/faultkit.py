"""Shared pieces of the fault-injection suite: live pickle payloads, tiny models and checkpoints
to damage, and the CLI run as a subprocess (optionally as an unprivileged user)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from lmforge.fsutil import sha256_file
from lmforge.model import ModelConfig, build
from lmforge.tokenizer import train_tokenizer

TINY = dict(arch="decoder", n_layer=1, n_head=2, n_embd=16, context_length=32, vocab_size=40, dropout=0.0)
TEXT = "the quick brown fox jumps over the lazy dog. " * 20


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, how: str = "torch") -> Path:
    """Write a pickle payload to ``path``: a torch.save zip ("torch") or a raw pickle ("pickle")."""
    obj = {"state": Payload(marker), "t": torch.zeros(2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def reseal(folder: Path, meta_name: str = "meta.json") -> None:
    """Update the sizes and sha256 of every file listed in ``folder/meta_name`` (meta.json or
    checksums.json): what anyone who can write the folder can do after swapping a file."""
    meta_path = folder / meta_name
    meta = json.loads(meta_path.read_text())
    for name in list(meta["files"]):
        p = folder / name
        meta["files"][name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    meta_path.write_text(json.dumps(meta))


HOLD = """
import os, sys, time
from lmforge.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
if sys.argv[2] == "crash":
    os.kill(os.getpid(), 9)
time.sleep(120)
"""


def lock_holder(folder: Path, mode: str = "hold") -> subprocess.Popen:
    """Another process holding ``folder``'s run lock ("hold"), or taking it then dying by kill -9 ("crash")."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True)
    if mode == "hold":
        assert p.stdout.readline().strip() == "held"
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)
    if p.stdout:
        p.stdout.close()


def tiny_tokenizer():
    return train_tokenizer("char", [TEXT])


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    return build(ModelConfig(**{**TINY, "vocab_size": tok.vocab_size})), tok


def model_folder(path: Path) -> Path:
    """An lmforge model folder (save_model: weights, config, tokenizer, checksums.json)."""
    from lmforge.store import save_model

    model, tok = tiny_model()
    return save_model(model, path, tokenizer=tok)


def checkpoint(root: Path, step: int = 2) -> Path:
    """A training checkpoint (weights, config, tokenizer, trainer state with an AdamW state and
    RNG states, meta.json) under ``root``, as the trainer writes it."""
    import random

    import numpy as np

    from lmforge.train.checkpoint import save_checkpoint, step_name

    model, tok = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = {"step": step, "optimizer": opt.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}}
    return save_checkpoint(root, step_name(step), model, config={"run": {"seed": 0}}, trainer_state=state,
                           tokenizer=tok, step=step, metrics={"loss": 1.0})


def hf_folder(path: Path) -> Path:
    """A Hugging Face folder of the tiny model (export_hf)."""
    from lmforge.interop.hf import export_hf

    model, tok = tiny_model()
    export_hf(model, path, tokenizer=tok)
    return path


def cli(*args, cwd: Path, user: str | None = None, env: dict | None = None, timeout: float = 180,
        **kw) -> subprocess.CompletedProcess:
    """``lmforge ARGS`` in a subprocess (as ``user`` through setpriv when given)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "lmforge.cli", *map(str, args)]
    if user is not None:
        cmd = [shutil.which("setpriv"), "--reuid", str(user), "--regid", str(user), "--clear-groups", *cmd]
        full_env["HOME"] = str(cwd)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, **kw)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one line on stderr holding every needle; returns the line."""
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines()
             if line.strip() and not line.startswith("note:") and "is a run folder; using" not in line]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
