"""Tests for lmforge.train.logging and lmforge.inspect.plots: JSONL metrics, sinks, progress, MFU,
plots."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.errors import ConfigError, DataError
from lmforge.train import logging as lg
from lmforge.train.logging import (
    MetricsLogger, Progress, git_commit, gpu_peak_flops, mfu, peak_flops, read_metrics, save_run_info,
)


# --- MetricsLogger / read_metrics ------------------------------------------------------------
def test_jsonl_written_and_read_back(tmp_path):
    with MetricsLogger(tmp_path / "run") as logger:
        logger.log(1, {"loss": 2.5, "lr": 1e-3})
        logger.log(1, {"loss": torch.tensor(2.75), "tokens": 128}, split="val")
        # each line is flushed as it is written
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["split"] for r in records] == ["train", "val"]
    assert records[0]["step"] == 1 and records[0]["loss"] == 2.5 and records[0]["lr"] == 1e-3
    assert records[1]["loss"] == 2.75 and records[1]["tokens"] == 128
    assert all(isinstance(r["time"], float) for r in records)
    assert read_metrics(tmp_path / "run") == records  # a run folder works too


def test_logger_appends_on_resume_and_rejects_bad_metrics(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 1.0})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(2, {"step": 3})
        with pytest.raises(ValueError, match="'name'"):
            logger.log(2, {"name": "abc"})
    with MetricsLogger(tmp_path) as logger:
        logger.log(2, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_truncated_last_line_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n'
                    '{"step": 2, "split": "train", "loss": 0.9}\n'
                    '{"step": 3, "split": "tr')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match=":2:"):
        read_metrics(path)
    with pytest.raises(DataError, match="no such metrics file"):
        read_metrics(tmp_path / "missing.jsonl")


def test_non_main_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    logger = MetricsLogger(run, is_main=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not run.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_missing_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"lmforge\[tensorboard\]"):
        MetricsLogger(tmp_path, tensorboard=True)
    with pytest.raises(ConfigError, match=r"lmforge\[tensorboard\]"):  # on every rank
        MetricsLogger(tmp_path, tensorboard=True, is_main=False)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"lmforge\[wandb\]"):
        MetricsLogger(tmp_path, wandb=True)


def test_sinks_receive_prefixed_scalars(tmp_path, monkeypatch):
    """TensorBoard and W&B wiring, with stand-ins for the optional packages."""
    calls: dict[str, list] = {"tb": [], "wandb": [], "init": [], "closed": []}

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            calls["tb"].append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls["closed"].append("tb")

    class FakeRun:
        def log(self, data, step):
            calls["wandb"].append((data, step))

        def finish(self):
            calls["closed"].append("wandb")

    fake_wandb = types.ModuleType("wandb")
    fake_wandb.__spec__ = importlib.util.spec_from_loader("wandb", loader=None)
    fake_wandb.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setattr(lg, "_require", lambda *a: None)
    monkeypatch.setattr(lg, "_open_tensorboard", lambda log_dir: FakeWriter())

    logger = MetricsLogger(tmp_path, tensorboard=True, wandb=True, wandb_project="p", run_name="r",
                           config={"train": {"lr": 1e-3, "betas": (0.9, 0.95)}})
    logger.log(5, {"loss": 1.5}, split="val")
    logger.close()
    logger.close()  # idempotent
    assert calls["tb"] == [("val/loss", 1.5, 5)]
    assert calls["wandb"] == [({"val/loss": 1.5}, 5)]
    assert calls["init"][0]["project"] == "p" and calls["init"][0]["name"] == "r"
    assert calls["init"][0]["config"] == {"train": {"lr": 1e-3, "betas": [0.9, 0.95]}}
    assert calls["closed"] == ["tb", "wandb"]


# --- Progress --------------------------------------------------------------------------------
def test_progress_disabled_is_usable_and_silent(capsys):
    for kwargs in ({"disable": True}, {"is_main": False}):
        p = Progress(10, **kwargs)
        p.update(1, loss=2.0, lr=1e-3, tokens_per_s=1000.0, mfu=0.1)
        p.close()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    # disable=True hides the bar only; messages still print on the main rank, never elsewhere
    Progress(10, disable=True).write("eval loss 1.0")
    Progress(10, is_main=False).write("hidden")
    err = capsys.readouterr().err
    assert "eval loss 1.0" in err and "hidden" not in err


def test_progress_non_tty_prints_plain_lines(capsys):
    p = Progress(total_steps=10, initial=2, print_every=4)
    assert not p.tty
    for step in range(3, 10):
        p.update(step, loss=3.0 / step, lr=1e-3, tokens_per_s=12345.0, mfu=0.25, grad_norm=0.5)
    p.write("checkpoint saved")
    p.close()  # step 9 was not a print step: printed on close
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    steps = [ln.split("|")[0].strip() for ln in lines if ln.startswith("step")]
    assert steps == ["step  3/10", "step  4/10", "step  8/10", "step  9/10"]
    assert "checkpoint saved" in lines
    first = lines[0]
    for piece in ("loss 1.0000", "lr 1.00e-03", "tok/s 12.3k", "mfu 25.0%", "grad_norm 0.5", "eta"):
        assert piece in first
    assert "\r" not in "".join(lines)


def test_progress_tty_uses_tqdm(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    stream = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stream)
    p = Progress(total_steps=5)
    assert p.tty
    for step in range(1, 6):
        p.update(step, loss=1.5, lr=2e-4, tokens_per_s=999.0)
    p.write("eval done")
    p.close()
    text = stream.getvalue()
    assert "5/5" in text and "loss=1.5000" in text and "eval done" in text


# --- MFU ---------------------------------------------------------------------------------------
def test_mfu_numbers(monkeypatch):
    monkeypatch.delenv("LMFORGE_PEAK_FLOPS", raising=False)
    assert mfu(1e6, 1e5, "cpu") == pytest.approx(0.4)
    assert mfu(1e6, 1e5, torch.device("cpu"), dtype=torch.bfloat16) == pytest.approx(0.4)
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e12")
    assert mfu(1e6, 1e5, "cpu") == pytest.approx(0.1)
    assert peak_flops("meta") == 1e12
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "fast")
    with pytest.raises(ConfigError, match="LMFORGE_PEAK_FLOPS"):
        mfu(1e6, 1e5, "cpu")
    monkeypatch.delenv("LMFORGE_PEAK_FLOPS")
    assert mfu(1e6, 1e5, "meta") is None  # unknown peak


def test_gpu_peak_table():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == 494.5e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == 67e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 156e12
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080") is None
    # 1e9 FLOPs/token at 494,500 tok/s on an H100 in bf16 is half of peak
    assert 1e9 * 494_500 / gpu_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(0.5)


# --- provenance --------------------------------------------------------------------------------
def test_git_commit(tmp_path):
    assert git_commit(tmp_path) is None
    assert git_commit(tmp_path / "missing") is None
    here = git_commit(Path(__file__).parent)
    assert here is None or (len(here) == 40 and all(c in "0123456789abcdef" for c in here))


def test_save_run_info_writes_both_files(tmp_path):
    config = {"model": {"d_model": 32, "betas": (0.9, 0.95)}, "out_dir": tmp_path / "x", "dtype": torch.float32}
    save_run_info(tmp_path / "run", config)
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg == {"model": {"d_model": 32, "betas": [0.9, 0.95]}, "out_dir": str(tmp_path / "x"),
                   "dtype": "torch.float32"}
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    for key in ("git_commit", "torch_version", "device", "argv", "start_time"):
        assert key in info
    assert info["torch_version"] == torch.__version__
    assert info["argv"] == sys.argv
    save_run_info(tmp_path / "run", config)  # a resume keeps the earlier start
    info2 = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info2["previous_starts"][0]["start_time"] == info["start_time"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "run_info.json"]
