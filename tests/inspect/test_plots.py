"""lmforge.inspect.plots: training curves and loss comparisons written as PNG files."""

from __future__ import annotations

import math

import pytest

from lmforge.errors import DataError
from lmforge.inspect import plot_loss_comparison, plot_training_curves
from lmforge.train.logging import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_metrics(steps: int = 60, eval_every: int = 20) -> list[dict]:
    records = []
    for s in range(1, steps + 1):
        records.append({"step": s, "split": "train", "time": 1000.0 + s, "loss": 4.0 * math.exp(-s / 30) + 1.0,
                        "lr": 3e-4 * min(1.0, s / 10), "tokens_per_s": 5000.0 + s})
        if s % eval_every == 0:
            records.append({"step": s, "split": "val", "time": 1000.0 + s, "loss": 4.2 * math.exp(-s / 30) + 1.1})
    return records


# --- plots -------------------------------------------------------------------------------------
def test_plot_training_curves_writes_png(tmp_path):
    out = plot_training_curves(synthetic_metrics(), tmp_path / "plots" / "curves.png", title="tiny run")
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left


def test_plot_training_curves_from_jsonl_path(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for r in synthetic_metrics(30, 10):
            logger.log(r["step"], {k: v for k, v in r.items() if k not in ("step", "split", "time")},
                       split=r["split"])
        logger.log(30, {"loss": float("nan")})  # a diverged step does not break the plot
    out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    # no validation data, no lr: still a (mostly empty) figure
    out = plot_training_curves([{"step": 1, "split": "train", "loss": 2.0}], tmp_path / "d.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_loss_comparison_writes_png(tmp_path):
    curves = {"gpt2-style": [(0.0, 4.0), (10.0, 3.2), (20.0, 2.9)],
              "llama-style": [(20.0, 2.7), (0.0, 4.0), (10.0, 3.0), (30.0, float("inf"))]}
    out = plot_loss_comparison(curves, tmp_path / "cmp.png", title="recipes")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    with pytest.raises(DataError):
        plot_loss_comparison({}, tmp_path / "none.png")
