"""Truncated and bit-flipped files of every kind a checkpoint holds, random damage to the trainer
state's header, and kill -9 in the middle of training: every load is a CheckpointError line or an
intact resume, never a traceback from deep inside a parser."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from lmforge.errors import CheckpointError
from lmforge.statefile import load_state
from lmforge.train.checkpoint import load_checkpoint
from tests.faults import faultkit

FILES = ["model.safetensors", "config.yaml", "tokenizer.json", "trainer_state.safetensors", "meta.json"]


def _truncate(p, keep: float = 0.5):
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def _flip(p, where: float = 0.5):
    data = bytearray(p.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_file_is_one_line(tmp_path, name, damage):
    ck = faultkit.checkpoint(tmp_path / "ck")
    (_truncate if damage == "truncate" else _flip)(ck / name)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck).build_model()
    assert "\n" not in str(e.value) and str(ck) in str(e.value)


def test_random_header_damage_to_a_resealed_trainer_state(tmp_path):
    """Someone rewrote bytes of the state file and its checksum: 60 random flips in the safetensors
    header (where the JSON lives) each give a CheckpointError or a state that loads; nothing else."""
    ck = faultkit.checkpoint(tmp_path / "ck")
    path = ck / "trainer_state.safetensors"
    clean = path.read_bytes()
    header = 8 + int.from_bytes(clean[:8], "little")
    rng = random.Random(0)
    refused = loaded = 0
    for _ in range(60):
        data = bytearray(clean)
        data[rng.randrange(header)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            load_state(path)
            loaded += 1
        except CheckpointError as e:
            assert "\n" not in str(e)
            refused += 1
    assert refused + loaded == 60 and refused > 30


def _train(cfg, tmp_path, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", "train", "-c", str(cfg), "--quiet"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_while_training_then_resume(tmp_path, tiny_yaml, seed):
    """kill -9 at a random moment (checkpoints every 2 steps): the next run resumes from an intact
    checkpoint despite the dead run's lock, and finishes with the same final metrics row as a run
    never killed."""
    sections = dict(train={"max_steps": 40, "checkpoint_every": 2, "keep_last": 2})
    cfg = tiny_yaml("run", **sections)
    straight = faultkit.cli("train", "-c", tiny_yaml("straight", **sections), "--quiet", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    p = _train(cfg, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    p.stderr.close()
    r = faultkit.cli("train", "-c", cfg, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    def last(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r.get("step") == 40 and "loss" in r]
        return train[-1]["loss"]

    assert last("run") == last("straight")
