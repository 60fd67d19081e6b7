"""Data parallelism on CPU: 2 torchrun processes (gloo) with batch B/2 each train exactly like
1 process with batch B, and only rank 0 writes files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

from lmforge.train import checkpoint as ckpt
from lmforge.train.logging import read_metrics

pytestmark = pytest.mark.distributed

STEPS, BATCH = 10, 8


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # a rank left waiting for a lost peer gives up after 3 minutes instead of torch's 30
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LMFORGE_DIST_TIMEOUT": "180"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid) + [proc.pid]:  # the workers hold the pipes open: kill them too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"timed out: {' '.join(cmd)}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
def test_two_processes_match_one(tiny_yaml, tmp_path):
    train = {"max_steps": STEPS, "batch_size": BATCH, "log_every": 1, "eval_every": 5, "warmup_steps": 3}
    # bias: false -- the key bias has a gradient that is zero in exact arithmetic, and Adam turns
    # its rounding noise (which differs between the two reductions) into full-size steps.
    model = {"bias": False}
    one_cfg = tiny_yaml("one", model=model, train=train)
    two_cfg = tiny_yaml("two", model=model, train=train)

    one = _run([sys.executable, "-m", "lmforge.cli", "pretrain", "-c", str(one_cfg), "--quiet"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "lmforge.cli", "pretrain", "-c", str(two_cfg), "--quiet", f"train.batch_size={BATCH // 2}"],
               tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 procs" in two.stdout and "1 procs" in one.stdout
    assert two.stdout.count("batch:") == 1  # only rank 0 speaks

    run_one, run_two = tmp_path / "one", tmp_path / "two"
    rec_one, rec_two = read_metrics(run_one), read_metrics(run_two)
    train_one = [r for r in rec_one if r["split"] == "train"]
    train_two = [r for r in rec_two if r["split"] == "train"]
    # one metrics.jsonl, each step written once (rank 1 wrote nothing)
    assert [r["step"] for r in train_two] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rec_two if r["split"] == "val"] == [5, 10]
    for a, b in zip(train_one, train_two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["lr"] == pytest.approx(b["lr"])
    val_one = [r["loss"] for r in rec_one if r["split"] == "val"]
    val_two = [r["loss"] for r in rec_two if r["split"] == "val"]
    assert val_two == pytest.approx(val_one, abs=1e-5)  # same validation windows (train.eval_batch_size)

    last_one = ckpt.latest_checkpoint(run_one / "checkpoints")
    last_two = ckpt.latest_checkpoint(run_two / "checkpoints")
    assert last_one.name == last_two.name == ckpt.step_name(STEPS)
    w1 = load_file(str(last_one / "model.safetensors"))
    w2 = load_file(str(last_two / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")

    # rank 0 alone wrote the run folder: the same files as the single-process run, nothing extra
    def listing(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    assert listing(run_two) == listing(run_one)
    assert not [p for p in (run_two / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
def test_two_processes_match_one_for_classification(tiny_yaml, tmp_path):
    """An example task (padding per micro-batch, a classification head): 2 x B/2 == 1 x B."""
    from tests.tasks.test_classify import _sentiment_tsv

    data = _sentiment_tsv(tmp_path / "mood.tsv", n=80)
    sections = dict(task="classify", model={"bias": False, "context_length": 32}, objective={"max_length": 24},
                    data={"sources": [{"path": str(data)}], "val_fraction": 0.2},
                    train={"max_steps": 6, "batch_size": BATCH, "log_every": 1, "eval_every": 3,
                           "warmup_steps": 2, "best_metric": "val_accuracy", "best_mode": "max"})
    _one_and_two(tmp_path, tiny_yaml("one", **sections), tiny_yaml("two", **sections), BATCH)
    assert (tmp_path / "two" / "eval_report.json").is_file()


def _one_and_two(tmp_path: Path, one_cfg: Path, two_cfg: Path, batch: int, train_metrics: tuple = ()) -> None:
    """Train ``one_cfg`` on 1 process with ``batch`` and ``two_cfg`` on 2 gloo processes with
    ``batch // 2`` each: train and val losses, the logged ``train_metrics`` (the objective's, over
    both ranks' pairs, not rank 0's alone) and the final weights agree within 1e-5."""
    one = _run([sys.executable, "-m", "lmforge.cli", "train", "-c", str(one_cfg), "--quiet"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "lmforge.cli", "train", "-c", str(two_cfg), "--quiet", f"train.batch_size={batch // 2}"],
               tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 procs" in two.stdout and "1 procs" in one.stdout
    rec_one, rec_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for split in ("train", "val"):
        a = [r["loss"] for r in rec_one if r["split"] == split]
        b = [r["loss"] for r in rec_two if r["split"] == split]
        assert len(a) == len(b) > 0 and b == pytest.approx(a, abs=1e-5), split
    for key in train_metrics:
        a = [r[key] for r in rec_one if r["split"] == "train"]
        b = [r[key] for r in rec_two if r["split"] == "train"]
        assert b == pytest.approx(a, abs=1e-5), key
    w1 = load_file(str(ckpt.latest_checkpoint(tmp_path / "one" / "checkpoints") / "model.safetensors"))
    w2 = load_file(str(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints") / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
def test_two_processes_match_one_for_dpo(tiny_dict, tiny_yaml, tmp_path):
    """DPO (a frozen reference copy, pairs of unequal lengths, the loss a mean over pairs):
    2 x B/2 == 1 x B, losses and weights within 1e-5."""
    from lmforge.tasks import config_from_dict
    from lmforge.tasks.run import run

    sft = tiny_dict("sft", data={"sources": [{"path": "builtin:arithmetic", "num_docs": 400, "seed": 0}]},
                    model={"context_length": 40, "bias": False}, train={"max_steps": 4, "checkpoint_every": 4})
    run(config_from_dict(sft), progress=False, print_fn=lambda *a, **k: None)
    sections = dict(task="dpo", objective={"beta": 0.1},
                    data={"sources": [{"path": "builtin:arithmetic", "num_docs": 64, "seed": 1}], "val_fraction": 0.25},
                    # lr 1e-3: Adam turns the rounding noise of a near-zero gradient (a dead MLP unit)
                    # into a step of about lr, the same in sign but not in the last digits
                    train={"max_steps": 4, "batch_size": BATCH, "lr": 1e-3, "log_every": 1, "eval_every": 2,
                           "eval_batch_size": 8, "warmup_steps": 1})
    cfgs = []
    for name in ("one", "two"):
        path = tiny_yaml(name, **sections)
        d = yaml.safe_load(path.read_text())
        d["model"] = {"init_from": str(tmp_path / "sft")}  # no fresh-model fields beside init_from
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        cfgs.append(path)
    _one_and_two(tmp_path, *cfgs, BATCH, train_metrics=("rewards/accuracy", "rewards/margins", "logps/chosen"))


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
def test_two_processes_match_one_for_sft_with_uneven_masking(tiny_yaml, tmp_path):
    """SFT where the two halves of each batch train very different numbers of response tokens
    (short and long answers, prompts of different lengths): the step's loss is the mean over the
    response tokens of the whole global batch, so 2 x B/2 == 1 x B within 1e-5."""
    import json

    recs = []
    for i in range(48):
        long = i % 4 < 2  # with batch 8 split 4 + 4, each rank's half mixes unevenly step to step
        recs.append({"instruction": "Repeat." if long else f"Say the number {i} back, please, exactly.",
                     "input": "", "output": (f"{i} " * (12 if long else 1)).strip()})
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(recs))
    sections = dict(task="sft", tokenizer={"kind": "byte"}, model={"context_length": 256, "bias": False},
                    objective={"max_length": 256, "sample_prompts": 0},  # the alpaca prompt is ~190 bytes
                    data={"sources": [{"path": str(data)}], "val_fraction": 0.25},
                    train={"max_steps": 4, "batch_size": BATCH, "log_every": 1, "eval_every": 2, "warmup_steps": 1,
                           "eval_batch_size": 6})
    one_cfg, two_cfg = tiny_yaml("one", **sections), tiny_yaml("two", **sections)
    _check_ranks_train_unequal_token_counts(two_cfg, BATCH // 2)
    _one_and_two(tmp_path, one_cfg, two_cfg, BATCH)


def _check_ranks_train_unequal_token_counts(cfg_path: Path, micro: int) -> None:
    """The two ranks' halves of the first steps hold different numbers of trained tokens (what
    makes a per-rank mean differ from the global one): each rank's slice, as the run takes it."""
    from lmforge.tasks import load_config
    from lmforge.data.sampler import ExampleBatches, StepSampler
    from lmforge.tasks import get_task
    from lmforge.tasks.common import TaskContext
    from lmforge.train.distributed import DistInfo

    cfg = load_config(cfg_path, [f"run.out_dir={cfg_path.parent / 'scratch'}"])
    ctx = TaskContext(cfg=cfg, run_dir=Path(cfg.run.out_dir), dist=DistInfo(), progress=False,
                      say=lambda *a, **k: None)
    parts = get_task("sft").build(ctx)
    n = parts.train_data.sampler.n
    counts = []
    for rank in (0, 1):
        data = ExampleBatches(StepSampler(n, micro, 1, 2, cfg.run.seed), parts.train_data.collate, rank)
        counts.append([parts.objective.targets_in(data.batch(step, 0)) for step in range(4)])
    assert any(abs(a - b) > 10 for a, b in zip(*counts)), counts
