"""Training-curve PNGs drawn from a run's ``metrics.jsonl``.

Records are the ones :class:`lmforge.train.logging.MetricsLogger` writes: ``{"step", "split",
"time", **metrics}``. Keys used: ``loss`` (any split), ``lr`` and ``tokens_per_s`` (train), and
``ppl`` / ``perplexity`` on evaluation splits (otherwise ``exp(loss)``). Every split other than
``"train"`` counts as an evaluation split. Records of the same split and step are merged,
later values winning (a resumed run may log a step twice).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global
backend switch) and written atomically: a temporary file beside the target, fsync, rename.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lmforge.errors import DataError
from lmforge.inspect.figures import new_figure, save_png
from lmforge.train.logging import read_metrics

TRAIN = "train"
_PPL_KEYS = ("ppl", "perplexity")
_THROUGHPUT_KEY = "tokens_per_s"


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _latest_per_step(records: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    """Records grouped by split, one per step (the last logged), sorted by step."""
    by_split: dict[str, dict[int, dict]] = {}
    for r in records:
        if "step" not in r:
            continue
        split = str(r.get("split", TRAIN))
        merged = by_split.setdefault(split, {})
        step = int(r["step"])
        # the same step may be logged in several calls (loss, then lr): merge, later values win
        merged[step] = {**merged.get(step, {}), **r}
    return {s: [steps[k] for k in sorted(steps)] for s, steps in by_split.items()}


def _series(records: Sequence[Mapping], keys: Sequence[str], transform=None):
    """(steps, values) of the first present key in ``keys``, skipping non-finite values."""
    xs, ys = [], []
    for r in records:
        for key in keys:
            if key in r:
                v = _finite(r[key])
                if v is not None and transform is not None:
                    v = transform(v)
                if v is not None:
                    xs.append(int(r["step"]))
                    ys.append(v)
                break
    return xs, ys


def _exp(loss: float) -> float | None:
    return math.exp(loss) if loss < 700 else None


def _minor_log_label(v: float, _pos=None) -> str:
    """Label minor log ticks at 2x, 3x and 5x a power of ten only (4, 6, ... stay unlabelled)."""
    if v <= 0:
        return ""
    mantissa = round(v / 10 ** math.floor(math.log10(v)), 6)
    return f"{v:g}" if mantissa in (2.0, 3.0, 5.0) else ""


def _empty(ax, msg: str) -> None:
    ax.text(0.5, 0.5, msg, transform=ax.transAxes, ha="center", va="center", color="gray")


def _eval_metric_names(evals: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """Every metric the evaluations logged, in first-seen order (loss and step bookkeeping aside)."""
    names: list[str] = []
    for recs in evals.values():
        for r in recs:
            for k in r:
                if k not in ("step", "split", "time", "loss", "perplexity") and k not in names \
                        and _finite(r[k]) is not None:
                    names.append(k)
    return names


def _set_scale(ax, values: Sequence[float], log: bool) -> None:
    """Log scale only when the values span more than a decade; a narrower log axis would get no
    major tick and so no label (a perplexity between 8.9 and 9.8, say)."""
    from matplotlib.ticker import FuncFormatter

    pos = [v for v in values if v > 0]
    if log and pos and max(pos) / min(pos) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 20, not 2x10^1
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))


def plot_training_curves(metrics: Sequence[Mapping] | str | os.PathLike, out_png: str | os.PathLike,
                         title: str | None = None) -> Path:
    """Draw the loss (train and validation), one panel per evaluation metric (perplexity,
    accuracy, F1, reward, ...), the learning rate and, when logged, throughput, against step.

    ``metrics`` is a list of records as in ``metrics.jsonl``, or a path to that file (or to the
    run folder). Returns the written path.
    """
    if isinstance(metrics, (str, os.PathLike)):
        metrics = read_metrics(metrics)
    splits = _latest_per_step(metrics)
    train = splits.get(TRAIN, [])
    evals = {s: recs for s, recs in splits.items() if s != TRAIN}
    metric_names = _eval_metric_names(evals)
    if evals and not any(k in _PPL_KEYS for k in metric_names):
        has_loss = any("loss" in r for recs in evals.values() for r in recs)
        if has_loss and all(k not in metric_names for k in ("accuracy", "macro_f1")):
            metric_names.insert(0, "ppl")  # LM runs without a logged perplexity: exp(loss)

    tput = _series(train, (_THROUGHPUT_KEY,))
    n_panels = 1 + max(len(metric_names), 1) + 1 + (1 if tput[0] else 0)
    fig = new_figure(8.0, 2.2 * n_panels + 0.6)
    axes = fig.subplots(n_panels, 1, sharex=True)

    ax = axes[0]
    xs, ys = _series(train, ("loss",))
    if xs:
        ax.plot(xs, ys, lw=1.0, alpha=0.8, label="train loss")
    for split, recs in sorted(evals.items()):
        exs, eys = _series(recs, ("loss",))
        if exs:
            ax.plot(exs, eys, marker="o", ms=3, lw=1.5, label=f"{split} loss")
    if ax.lines:
        ax.legend(loc="upper right", fontsize=8)
    else:
        _empty(ax, "no loss logged")
    ax.set_ylabel("loss")

    for i, name in enumerate(metric_names or ["ppl"]):
        ax = axes[1 + i]
        is_ppl = name in _PPL_KEYS
        seen: list[float] = []
        for split, recs in sorted(evals.items()):
            pxs, pys = _series(recs, _PPL_KEYS if is_ppl else (name,))
            if is_ppl and not pxs:
                pxs, pys = _series(recs, ("loss",), transform=_exp)
            if pxs:
                ax.plot(pxs, pys, marker="o", ms=3, lw=1.5, label=f"{split} {name}")
                seen += pys
        if ax.lines:
            _set_scale(ax, seen, log=is_ppl)
            ax.legend(loc="best", fontsize=8)
        else:
            _empty(ax, "no validation data")
        ax.set_ylabel(f"val {'perplexity' if is_ppl else name}")

    ax = axes[-2] if tput[0] else axes[-1]
    xs, ys = _series(train, ("lr",))
    if xs:
        ax.plot(xs, ys, lw=1.2, color="tab:green")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        _empty(ax, "no learning rate logged")
    ax.set_ylabel("learning rate")

    if tput[0]:
        ax = axes[-1]
        ax.plot(tput[0], tput[1], lw=1.0, color="tab:purple")
        ax.set_ylabel("tokens/s")

    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, out_png)


def plot_loss_comparison(curves: Mapping[str, Sequence[tuple[float, float]]], out_png: str | os.PathLike,
                         xlabel: str = "wall time (s)", ylabel: str = "validation loss",
                         title: str | None = None) -> Path:
    """Draw several runs' ``(x, y)`` curves (e.g. wall time vs validation loss) in one PNG.

    ``curves`` maps a run label to its points; points are sorted by x and non-finite ones
    dropped. Returns the written path.
    """
    if not curves:
        raise DataError("plot_loss_comparison: no curves given; expected {label: [(x, y), ...]}")
    fig = new_figure(7.0, 4.5)
    ax = fig.subplots()
    for label, points in curves.items():
        pts = sorted((x, y) for x, y in ((_finite(a), _finite(b)) for a, b in points)
                     if x is not None and y is not None)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        ax.plot(xs, ys, marker="o" if len(pts) <= 40 else None, ms=3, lw=1.5, label=str(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, out_png)


def _serve(metrics: str, out_png: str, title: str | None = None) -> None:
    """Redraw ``out_png`` from ``metrics`` once per line read on stdin, until stdin closes or
    the parent process is gone (checked every second: a SIGKILLed trainer leaves no plotter).

    The trainer runs this as a low-priority child process (``python -m lmforge.inspect.plots``)
    so matplotlib is imported once and never runs on the training process's cores first."""
    import select
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits cleanly: no half-written temp file
    parent = os.getppid()
    fd = sys.stdin.fileno()
    eof = False
    while not eof:
        while not select.select([fd], [], [], 1.0)[0]:  # wait for a request, watching the parent
            if os.getppid() != parent:
                return
        if not os.read(fd, 4096):
            return
        while select.select([fd], [], [], 0)[0]:  # requests that piled up meanwhile: one drawing serves all
            if not os.read(fd, 4096):
                eof = True
                break
        if os.getppid() != parent:
            return
        try:
            plot_training_curves(metrics, out_png, title=title)
        except Exception as e:  # a plot must never stop anything
            print(f"could not plot {metrics}: {e}", file=sys.stderr)


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    title = args[args.index("--title") + 1] if "--title" in args else None
    _serve(args[0], args[1], title or None)
