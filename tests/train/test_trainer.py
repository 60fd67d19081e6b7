"""lmforge.train.trainer: gradient accumulation, exact resume, signals, non-finite steps, the golden
loss curve, run files, bad data, and the trainer's contract with a toy objective (global target
normalisation: 8x1 == 4x2 == 1x8 with uneven padding; setup; best_metric checked against the real
metric names)."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import CheckpointError, ConfigError, DataError, TrainingError
from lmforge.objectives import CausalLM
from lmforge.tasks import load_config
from lmforge.tasks.run import run as pretrain
from lmforge.train import checkpoint as ckpt
from lmforge.train.logging import read_metrics
from lmforge.train.trainer import Trainer
from tests.train.toy_fit import fit_toy

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "causal_lm_tiny.json"


def quiet(*a, **k):
    pass


def run(cfg) -> dict:
    return pretrain(cfg, progress=False, print_fn=quiet)


def losses(summary) -> list[float]:
    return [h["loss"] for h in summary["history"]]


def weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------- accumulation
def test_grad_accumulation_matches_a_bigger_batch(tiny_config):
    # bias: false because the key bias gets a gradient that is zero in exact arithmetic (softmax
    # ignores a shift shared by all keys): Adam would normalise its rounding noise to full-size
    # steps of different sign in the two runs.
    model = {"bias": False}
    big = run(tiny_config("big", model=model, train={"max_steps": 4, "batch_size": 8, "grad_accum": 1}))
    acc = run(tiny_config("acc", model=model, train={"max_steps": 4, "batch_size": 4, "grad_accum": 2}))
    assert len(losses(big)) == len(losses(acc)) == 4
    for a, b in zip(losses(big), losses(acc)):
        assert a == pytest.approx(b, abs=1e-6)
    assert_same_weights(weights(big["last_checkpoint"]), weights(acc["last_checkpoint"]), atol=1e-6)


# ----------------------------------------------------------------------------- exact resume
def test_exact_resume_continues_the_straight_run(tiny_config, monkeypatch):
    n = 4
    sections = dict(model={"dropout": 0.1}, train={"max_steps": 2 * n})
    straight = run(tiny_config("straight", **sections))

    original = Trainer.train_step

    def stop_after_n(self):
        m = original(self)
        if self.step == n:
            self._stop_requested = True  # what SIGINT/SIGTERM do
        return m

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train_step", stop_after_n)
        first = run(tiny_config("resumed", **sections))
    assert first["stopped_early"] and first["steps"] == n
    assert Path(first["last_checkpoint"]).name == ckpt.step_name(n)
    ckpt.verify_checkpoint(first["last_checkpoint"])

    second = run(tiny_config("resumed", **sections))  # train.resume=auto
    assert Path(second["resumed_from"]).name == ckpt.step_name(n)
    assert [h["step"] for h in second["history"]] == list(range(n + 1, 2 * n + 1))
    for a, b in zip(losses(straight)[n:], losses(second)):
        assert a == pytest.approx(b, abs=1e-6)
    for a, b in zip(losses(straight)[:n], losses(first)):
        assert a == pytest.approx(b, abs=1e-6)
    assert_same_weights(weights(straight["last_checkpoint"]), weights(second["last_checkpoint"]), atol=1e-6)

    # the metrics file of the resumed run holds every step once, in order
    steps = [r["step"] for r in read_metrics(Path(second["run_dir"])) if r["split"] == "train"]
    assert steps == list(range(1, 2 * n + 1))


def test_eval_at_start_logs_step_zero_and_changes_no_step(tiny_config):
    """train.eval_at_start: a validation row at step 0 (the untrained model), the same training."""
    sections = dict(model={"dropout": 0.1}, train={"max_steps": 3, "eval_every": 3})
    plain = run(tiny_config("plain", **sections))
    first = run(tiny_config("first", model={"dropout": 0.1}, train={**sections["train"], "eval_at_start": True}))
    assert [e["step"] for e in first["evals"]] == [0, 3] and [e["step"] for e in plain["evals"]] == [3]
    assert first["evals"][0]["val_loss"] > first["evals"][1]["val_loss"]
    assert losses(first) == pytest.approx(losses(plain), abs=1e-7)
    val_rows = [r["step"] for r in read_metrics(Path(first["run_dir"])) if r["split"] == "val"]
    assert val_rows == [0, 3]


def test_resume_never_starts_over(tiny_config):
    run(tiny_config(train={"max_steps": 2}))
    again = run(tiny_config(train={"max_steps": 2, "resume": "never"}))
    assert again["resumed_from"] is None and [h["step"] for h in again["history"]] == [1, 2]


# ----------------------------------------------------------------------------- signals
def _launch(cfg_path: Path, cwd: Path, *overrides: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "pretrain", "-c", str(cfg_path), "--quiet",
                             *overrides], cwd=cwd, env=env, stdout=open(out, "w"), stderr=open(err, "w"))
    return proc, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(sig, tiny_yaml, tmp_path):
    cfg_path = tiny_yaml(train={"max_steps": 100000, "warmup_steps": 10})
    run_dir = tmp_path / "run"
    proc, out, err = _launch(cfg_path, tmp_path)
    try:
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and proc.poll() is None:  # wait until training runs
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"training ended early: {err.read_text()[-2000:]}"
        proc.send_signal(sig)
        rc = proc.wait(timeout=50)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err.read_text()[-2000:]
    assert "Traceback" not in err.read_text()
    assert "stopped at step" in out.read_text()
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert len(found) == 1
    meta = ckpt.verify_checkpoint(found[0])
    stopped_at = meta["step"]
    assert stopped_at >= 2 and not list((run_dir / "checkpoints").glob(".tmp-*"))
    logged = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert logged == list(range(1, stopped_at + 1))

    if sig == signal.SIGTERM:  # and resume=auto goes on from it
        cfg = load_config(cfg_path, [f"train.max_steps={stopped_at + 2}"])
        summary = run(cfg)
        assert Path(summary["resumed_from"]) == found[0]
        assert [h["step"] for h in summary["history"]] == [stopped_at + 1, stopped_at + 2]


# ----------------------------------------------------------------------------- non-finite loss
def _nan_on(monkeypatch, bad_calls):
    original = CausalLM.loss
    calls = {"n": 0}

    def flaky(self, model, batch):
        loss, m = original(self, model, batch)
        if model.training:
            calls["n"] += 1
            if bad_calls is None or calls["n"] in bad_calls:
                loss = loss * float("nan")
        return loss, m

    monkeypatch.setattr(CausalLM, "loss", flaky)


def test_nonfinite_steps_are_skipped_and_counted(tiny_config, monkeypatch):
    _nan_on(monkeypatch, {2, 4})
    summary = run(tiny_config(train={"max_steps": 6, "max_nonfinite": 2}))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 2
    ls = losses(summary)
    assert math.isnan(ls[1]) and math.isnan(ls[3])
    assert all(math.isfinite(x) for i, x in enumerate(ls) if i not in (1, 3))
    for name, t in weights(summary["last_checkpoint"]).items():
        assert torch.isfinite(t).all(), name
    assert math.isfinite(summary["final_eval"]["val_loss"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no step ever taken
def test_nonfinite_every_step_stops_training(tiny_config, monkeypatch):
    _nan_on(monkeypatch, None)
    with pytest.raises(TrainingError, match="3 steps in a row"):
        run(tiny_config(train={"max_steps": 20, "max_nonfinite": 3}))


# ----------------------------------------------------------------------------- masked LM
def test_masked_lm_trains_an_encoder(tiny_config):
    cfg = tiny_config(model={"arch": "encoder", "mlm_head": True}, task="mlm",
                      train={"max_steps": 8, "lr": 1e-2, "min_lr": 1e-3, "eval_every": 8})
    summary = run(cfg)
    ls = losses(summary)
    assert len(ls) == 8 and all(math.isfinite(x) for x in ls)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3
    assert "mlm_acc" in summary["history"][-1]
    ev = summary["final_eval"]
    assert math.isfinite(ev["val_loss"]) and ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]))


def test_encoder_needs_masked_lm(tiny_config):
    with pytest.raises(ConfigError, match="task: mlm"):
        run(tiny_config(model={"arch": "encoder"}))


def test_legacy_objective_name_points_to_task(tiny_config):
    with pytest.raises(ConfigError, match="objective.name: .*task: mlm"):
        tiny_config(model={"arch": "encoder", "mlm_head": True}, objective={"name": "masked_lm"})


# ----------------------------------------------------------------------------- golden curve
@pytest.fixture(scope="module")
def golden_run(tmp_path_factory, run_dict):
    from lmforge.tasks import config_from_dict

    root = tmp_path_factory.mktemp("golden")
    cfg = config_from_dict(run_dict(root / "run", train={"max_steps": 20, "eval_every": 10, "warmup_steps": 5,
                                                          "checkpoint_every": 10}))
    return cfg, run(cfg)


def test_golden_loss_curve(golden_run):
    """Regenerate after an intended numerical change with
    ``LMFORGE_UPDATE_GOLDEN=1 python -m pytest tests/train/test_trainer.py -k golden`` and commit the file."""
    _, summary = golden_run
    curve = losses(summary)
    assert len(curve) == 20 and all(math.isfinite(x) for x in curve)
    record = {"description": "tiny decoder (1 layer, width 32, context 32, char tokenizer) on builtin:stories "
                             "num_docs 200, seed 0, batch 8, lr 3e-3 cosine, 20 steps; see tests/train/test_trainer.py",
              "torch": torch.__version__, "losses": curve, "val_loss": summary["final_eval"]["val_loss"]}
    if os.environ.get("LMFORGE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(record, indent=2) + "\n")
    assert GOLDEN.is_file(), "no golden curve: run with LMFORGE_UPDATE_GOLDEN=1 once and commit it"
    golden = json.loads(GOLDEN.read_text())
    note = f"(golden made with torch {golden['torch']}, now {torch.__version__})"
    assert len(golden["losses"]) == len(curve)
    for step, (got, want) in enumerate(zip(curve, golden["losses"]), start=1):
        assert got == pytest.approx(want, abs=1e-4), f"step {step}: loss {got} != golden {want} {note}"
    assert record["val_loss"] == pytest.approx(golden["val_loss"], abs=1e-4), note
    assert curve[-1] < curve[0] - 0.3  # it learns


# ----------------------------------------------------------------------------- evaluation and files
def test_evaluation_metrics_and_run_files(golden_run):
    cfg, summary = golden_run
    run_dir = Path(summary["run_dir"])
    assert [e["step"] for e in summary["evals"]] == [10, 20]
    for e in summary["evals"]:
        assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    for name in ("metrics.jsonl", "config.yaml", "run_info.json", "training_curves.png", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "training_curves.png").stat().st_size > 1000
    assert load_config(run_dir / "config.yaml") == cfg
    json.loads((run_dir / "run_info.json").read_text())

    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in val] == [10, 20]
    assert [r["loss"] for r in train] == pytest.approx(losses(summary))
    assert all({"lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in train)
    assert val[-1]["loss"] == pytest.approx(summary["final_eval"]["val_loss"])
    assert val[-1]["ppl"] == pytest.approx(summary["final_eval"]["val_ppl"])

    best = Path(summary["best_checkpoint"])
    assert best.name == "best"
    meta = ckpt.verify_checkpoint(best)
    best_val = min(e["val_loss"] for e in summary["evals"])
    assert meta["metrics"]["val_loss"] == pytest.approx(best_val)
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_00000010", "step_00000020"]
    assert ckpt.verify_checkpoint(summary["last_checkpoint"])["step"] == 20


# ----------------------------------------------------------------------------- bad input
def test_missing_data_path(tiny_config, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        run(tiny_config(data={"sources": [{"path": str(tmp_path / "nope.txt")}]}))


def test_empty_corpus(tiny_config, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        run(tiny_config(data={"sources": [{"path": str(tmp_path / "empty.txt")}]}))


def test_corpus_shorter_than_one_window(tiny_config, tmp_path):
    (tmp_path / "short.txt").write_text("a short story, too short.")
    with pytest.raises(DataError, match="context 32"):
        run(tiny_config(data={"sources": [{"path": str(tmp_path / "short.txt")}]}))


def test_jsonl_without_the_text_field(tiny_config, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"content": f"story number {i} " * 10}) + "\n" for i in range(20)))
    with pytest.raises(DataError) as e:
        run(tiny_config(data={"sources": [{"path": str(f)}]}))
    assert "'text'" in str(e.value) and "content" in str(e.value)
    # and naming the right field trains
    summary = run(tiny_config(data={"sources": [{"path": str(f), "text_field": "content"}]},
                              train={"max_steps": 1}))
    assert summary["steps"] == 1


def test_resume_from_a_folder_that_is_not_a_checkpoint(tiny_config, tmp_path):
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not an lmforge checkpoint"):
        run(tiny_config(train={"resume": str(folder)}))
    with pytest.raises(CheckpointError):
        run(tiny_config(train={"resume": str(tmp_path / "missing")}))


def test_disk_full_while_saving_keeps_the_earlier_checkpoint(tiny_config, monkeypatch):
    original = ckpt.write_model_files
    calls = {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*a, **k)

    monkeypatch.setattr(ckpt, "write_model_files", full_disk)
    cfg = tiny_config(train={"max_steps": 4, "checkpoint_every": 2, "best_metric": None})
    with pytest.raises(CheckpointError, match="disk full"):
        run(cfg)
    root = Path(cfg.run.out_dir) / "checkpoints"
    found = ckpt.list_checkpoints(root)
    assert [p.name for p in found] == ["step_00000002"]
    assert ckpt.verify_checkpoint(found[0])["step"] == 2
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_bf16_autocast_on_cpu_in_a_subprocess(tiny_yaml, tmp_path):
    """bf16 autocast on CPU trains. Run in a child process with ONEDNN_MAX_CPU_ISA set: on VMs that
    advertise AMX without enabling it, a bf16 matmul otherwise dies with SIGILL."""
    cfg = tiny_yaml(train={"max_steps": 3, "precision": "bf16", "eval_every": 3})
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "pretrain", "-c", str(cfg), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == -signal.SIGILL:
        pytest.skip("this CPU cannot run bf16 matmuls even with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final: val_loss" in proc.stdout


def test_global_target_normalisation_makes_accumulation_exact(tmp_path):
    runs = [fit_toy(tmp_path, b, a) for b, a in ((8, 1), (4, 2), (1, 8))]
    ref_model, ref, obj = runs[0]
    assert obj.setup_calls == 1
    for model, result, _ in runs[1:]:
        for a, b in zip(ref.history, result.history):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        for (k, p), q in zip(ref_model.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")


def test_best_metric_typo_lists_the_real_metric_names(tmp_path):
    with pytest.raises(ConfigError, match="train.best_metric: got 'val_acc'.*val_toy_metric"):
        fit_toy(tmp_path, 4, 1, steps=1, best_metric="val_acc")
