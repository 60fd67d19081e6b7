"""lmforge.inspect.report: the run report of a tiny run, without checkpoint or samples, and bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from lmforge.errors import DataError
from lmforge.inspect.report import log_sample, read_samples, report_after_run, write_report
from lmforge.model import build
from lmforge.model.layers import Attention
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer

TEXT = "the cat sat on the mat. the cat sat on the hat."


def _model(**fields):
    torch.manual_seed(0)
    cfg = {"vocab_size": 48, "context_length": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, **fields}
    model = build(cfg).eval()
    with torch.no_grad():  # untrained weights are nearly uniform: make the attention peaky
        for m in model.modules():
            if isinstance(m, Attention):
                m.qkv.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train([TEXT + " ROMEO:,\n"], specials=DEFAULT_SPECIAL_TOKENS)


# ---------------------------------------------------------------------------- report
def _tiny_run(run, tok, model=None, samples=True):
    from lmforge.store import save_model

    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 6):
        lines.append({"step": step, "split": "train", "time": step, "loss": 4 - 0.3 * step, "lr": 1e-3,
                      "tokens_per_s": 900.0 + step, "grad_norm": 1.0 / step})
    for step in (3, 5):
        lines.append({"step": step, "split": "val", "time": step, "loss": 4 - 0.25 * step,
                      "ppl": math.exp(4 - 0.25 * step), "token_accuracy": 0.1 * step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = {"run": {"name": "tiny-report"}, "sample": {"prompt": "the cat"}, "model": {"n_layer": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "run_info.json").write_text(json.dumps({"git_commit": "abc123", "torch": torch.__version__}))
    if samples:
        log_sample(run, 5, "the cat sat <on> the mat")
    if model is not None:
        save_model(model, run / "checkpoints" / "best", tokenizer=tok, config=cfg)
    return run


def test_report_of_a_tiny_run(tok, tmp_path):
    run = _tiny_run(tmp_path / "run", tok, _model())
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    for name in ("loss", "lr", "tokens_per_s", "grad_norm", "ppl", "token_accuracy"):
        assert name in page, name
    assert "tiny-report" in page and "abc123" in page and "the cat sat &lt;on&gt; the mat" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"(https?:|ftp:)?//[a-z]", text) and "url(" not in text  # no external URLs
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == 4  # metrics, weight stats, histograms, attention
    assert "checkpoints/best" in page
    with open(run / "samples.jsonl", "a") as f:
        f.write('{"step": 6, "te')  # a line cut short by a crash is skipped
    assert [s["step"] for s in read_samples(run)] == [5]


def test_report_without_checkpoint_or_samples(tok, tmp_path):
    run = _tiny_run(tmp_path / "run", tok, samples=False)
    page = write_report(run, tmp_path / "out" / "r.html").read_text()
    assert "no samples logged" in page and "no checkpoint plots" in page
    assert page.count("data:image/png;base64,") == 1


def test_report_bad_input(tok, tmp_path):
    with pytest.raises(DataError, match="no metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no metrics logged"):
        write_report(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        write_report(tmp_path / "nope")
    said = []
    assert report_after_run(tmp_path, say=said.append) is None and "could not write the run report" in said[0]
    assert report_after_run(tmp_path, enabled=False, say=said.append) is None and len(said) == 1
