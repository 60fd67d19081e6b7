"""One static HTML page per run: ``write_report(run_dir)`` -> ``run_dir/report.html``.

The page holds the resolved config, the run info, one curve per logged metric, the evaluation
metrics table, the expert usage of a mixture-of-experts model (the share of tokens each layer's
router sent to each expert: ``expert_usage/L{layer}/E{expert}`` metrics), samples logged during
training (``samples.jsonl``: ``{"step", "text"}`` per line), and the attention and weight plots of the best (else newest) checkpoint. Every image is embedded
as a data URI and nothing is fetched from the network, so the file opens offline anywhere.

``report_after_run(run_dir)`` is the variant for the end of a training run: it never raises (a
report must not fail a finished run) and returns the path or None.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lmforge.errors import DataError, LMForgeError
from lmforge.fsutil import atomic_write
from lmforge.inspect import weights as W
from lmforge.inspect.attention_maps import attention, plot_attention_grid
from lmforge.inspect.figures import new_figure
from lmforge.store import from_pretrained, resolve_model_path
from lmforge.train.logging import read_metrics

REPORT_FILE = "report.html"
SAMPLES_FILE = "samples.jsonl"
_SKIP_KEYS = ("step", "split", "time")


# ------------------------------------------------------------------------------------ reading
def _metric_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl; expected a run folder written by a training run")
    records = read_metrics(path)
    if not any(_numeric_keys(r) for r in records):
        raise DataError(f"{path}: no metrics logged yet; expected at least one record with a number")
    return records


def _numeric_keys(r: dict) -> list[str]:
    return [k for k, v in r.items() if k not in _SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]


def metric_series(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{metric: {split: (steps, values)}}, one value per (split, step), the last logged winning."""
    merged: dict[tuple[str, int], dict] = {}
    for r in records:
        if "step" in r:
            key = (str(r.get("split", "train")), int(r["step"]))
            merged[key] = {**merged.get(key, {}), **r}
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for (split, step), r in sorted(merged.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        for k in _numeric_keys(r):
            v = float(r[k])
            if math.isfinite(v):
                xs, ys = out.setdefault(k, {}).setdefault(split, ([], []))
                xs.append(step)
                ys.append(v)
    return out


def eval_table(records: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the evaluation records (every split but 'train'), by step."""
    merged: dict[tuple[int, str], dict] = {}
    for r in records:
        split = str(r.get("split", "train"))
        if split != "train" and "step" in r:
            key = (int(r["step"]), split)
            merged[key] = {**merged.get(key, {}), **r}
    cols = sorted({k for r in merged.values() for k in _numeric_keys(r)})
    rows = [[step, split] + [r.get(c) for c in cols] for (step, split), r in sorted(merged.items())]
    return ["step", "split"] + cols, rows


def log_sample(run_dir: str | os.PathLike, step: int, text: str) -> None:
    """Append one sample to ``run_dir/samples.jsonl`` (the report shows every logged sample)."""
    path = Path(run_dir) / SAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": int(step), "time": time.time(), "text": text}) + "\n")


def read_samples(run_dir: Path) -> list[dict]:
    """Records of ``samples.jsonl`` ({"step", "text"}); a cut-off last line is skipped."""
    path = run_dir / SAMPLES_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("text"), str):
            out.append(r)
    return out


# ------------------------------------------------------------------------------------ figures
def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def plot_metric_panels(series: dict[str, dict[str, tuple[list[int], list[float]]]]):
    """A figure with one panel per metric (every split's line in it)."""
    names = sorted(series, key=lambda k: (k != "loss", k))
    cols = 2 if len(names) > 1 else 1
    rows = -(-len(names) // cols)
    fig = new_figure(6.0 * cols, 2.6 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for n, name in enumerate(names):
        ax = axes[n // cols][n % cols]
        for split, (xs, ys) in sorted(series[name].items()):
            many = len(xs) > 40
            ax.plot(xs, ys, lw=1.0 if many else 1.5, marker=None if many else "o", ms=3, label=split)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for n in range(len(names), rows * cols):
        axes[n // cols][n % cols].axis("off")
    fig.tight_layout()
    return fig


USAGE_PREFIX = "expert_usage/"


def expert_usage(series: dict[str, dict[str, tuple[list[int], list[float]]]]) -> dict[int, dict[int, tuple]]:
    """{layer: {expert: (steps, shares)}} from the ``expert_usage/L{layer}/E{expert}`` training metrics."""
    out: dict[int, dict[int, tuple]] = {}
    for name, splits in series.items():
        if not name.startswith(USAGE_PREFIX) or "train" not in splits:
            continue
        try:
            layer, expert = (int(part[1:]) for part in name[len(USAGE_PREFIX):].split("/"))
        except ValueError:
            continue
        out.setdefault(layer, {})[expert] = splits["train"]
    return out


def plot_expert_usage(usage: dict[int, dict[int, tuple]], last: int = 20):
    """Left: each layer's share of tokens per expert, averaged over the last ``last`` logged steps
    (a heatmap; balanced routing is 1/E everywhere). Right: the busiest expert's share per layer
    over training (1/E when balanced, 1/k, its most with top-k routing, when every token picks it)."""
    layers = sorted(usage)
    n_exp = 1 + max(e for row in usage.values() for e in row)
    grid = [[0.0] * n_exp for _ in layers]
    for i, layer in enumerate(layers):
        for e, (_, ys) in usage[layer].items():
            tail = ys[-last:]
            grid[i][e] = sum(tail) / len(tail)
    fig = new_figure(11.0, 0.5 * len(layers) + 2.6)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1.0]})
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, aspect="auto")
    top = max(max(row) for row in grid)
    for i in range(len(layers)):
        for e in range(n_exp):
            ax.text(e, i, f"{grid[i][e]:.2f}", ha="center", va="center", fontsize=7,
                    color="k" if grid[i][e] > 0.6 * top else "w")
    ax.set_xticks(range(n_exp), [str(e) for e in range(n_exp)], fontsize=8)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers], fontsize=8)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_title(f"share of tokens per expert (last {last} logged steps; uniform = {1 / n_exp:.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    for layer in layers:
        rows = usage[layer]
        steps = rows[min(rows)][0]
        busiest = [max(rows[e][1][k] for e in rows) for k in range(len(steps))]
        ax2.plot(steps, busiest, lw=1.2, label=f"layer {layer}")
    ax2.axhline(1 / n_exp, color="k", ls="--", lw=0.8, label="uniform")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("step", fontsize=8)
    ax2.set_title("busiest expert's share of tokens (top-k: at most 1/k)", fontsize=9)
    ax2.tick_params(labelsize=8)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _sample_text(run_dir: Path, cfg: dict, tokenizer, n_tokens: int) -> str:
    """A text for the attention plots: a logged sample, else the start of the first training
    file, else the sample prompt; cut to about ``n_tokens`` tokens."""
    candidates = [s["text"] for s in read_samples(run_dir)]
    for src in ((cfg.get("data") or {}).get("sources") or []):
        p = Path(str(src.get("path", ""))) if isinstance(src, dict) else None
        if p is not None and p.is_file() and p.suffix in (".txt", ".md", ""):
            with open(p, encoding="utf-8", errors="replace") as f:
                candidates.append(f.read(4000))
    prompt = (cfg.get("sample") or {}).get("prompt")
    candidates += [prompt] if prompt else []
    candidates.append("The quick brown fox jumps over the lazy dog. The quick brown fox")
    for text in candidates:
        ids = tokenizer.encode(text)
        if len(ids) >= 8:
            return tokenizer.decode(ids[:n_tokens], skip_special_tokens=False)
    return candidates[-1]


def _model_section(run_dir: Path, cfg: dict, text: str | None, tmp: Path) -> tuple[str, list[str]]:
    """HTML of the checkpoint's attention and weight plots (and notes on what was skipped)."""
    notes: list[str] = []
    try:
        folder, _ = resolve_model_path(run_dir)
        model, tok = from_pretrained(folder, with_tokenizer=True)
    except LMForgeError as e:
        return "", [f"no checkpoint plots: {e}"]
    parts = [f"<p>checkpoint: <code>{html.escape(str(folder))}</code></p>"]
    records = W.weight_stats(model)
    parts.append(_img(_file_data_uri(W.plot_weight_stats(records, tmp / "wstats.png")), "weight statistics per layer"))
    parts.append(_img(_file_data_uri(W.plot_weight_histograms(model, tmp / "whist.png")), "weight histograms"))
    parts.append(_details("weight matrices (JSON)", html.escape(json.dumps(records, indent=1))))
    if model.config.arch == "bigram":
        notes.append("no attention plots: a bigram model has no attention layers")
    else:
        n = min(32, model.config.context_length)
        text = text or _sample_text(run_dir, cfg, tok, n)
        try:
            maps = attention(model, tok, text)
            maps = maps.window(0, 32) if len(maps.ids) > 32 else maps
            png = plot_attention_grid(maps, tmp / "attn.png")
            parts.append(f"<p>text: <code>{html.escape(text)}</code></p>")
            parts.append(_img(_file_data_uri(png), "attention maps (rows: queries, columns: keys)"))
        except LMForgeError as e:
            notes.append(f"no attention plots: {e}")
    return "\n".join(parts), notes


# ---------------------------------------------------------------------------------------- HTML
def _img(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary><pre>{body}</pre></details>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("" if v is None else str(v))


def _table(cols: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = """body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1em 0; } figcaption { color: #666; font-size: 90%; } .note { color: #a60; }"""


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, text: str | None = None,
                 with_model: bool = True) -> Path:
    """Write the run's ``report.html`` (or ``out``); returns its path.

    ``text`` is the text whose attention is drawn (default: a logged sample or the start of the
    training data); ``with_model=False`` leaves out the checkpoint's attention and weight plots.
    A folder without ``metrics.jsonl`` (or with no metric in it) is a DataError.
    """
    import tempfile

    import yaml

    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"{run}: not a folder; expected a run folder (with metrics.jsonl, config.yaml)")
    records = _metric_records(run)
    cfg_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    try:
        cfg = yaml.safe_load(cfg_text) or {} if cfg_text else {}
    except yaml.YAMLError:
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    info = json.loads((run / "run_info.json").read_text()) if (run / "run_info.json").is_file() else {}
    title = str((cfg.get("run") or {}).get("name") or run.name)

    series = metric_series(records)
    usage = expert_usage(series)  # mixture of experts: one plot for all its per-expert metrics
    series = {k: v for k, v in series.items() if not k.startswith(USAGE_PREFIX)}
    parts = [f"<h1>run report: {html.escape(title)}</h1>",
             f"<p>{html.escape(str(run.resolve()))} &middot; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             "<h2>Metrics</h2>", _img(_png_data_uri(plot_metric_panels(series)), "one panel per logged metric: "
                                      + ", ".join(sorted(series)))]
    if usage:
        parts += ["<h2>Expert usage</h2>", _img(_png_data_uri(plot_expert_usage(usage)),
                                                "the share of tokens each layer's router sent to each expert")]
    cols, rows = eval_table(records)
    parts += ["<h2>Evaluation</h2>", _table(cols, rows) if rows else "<p>no evaluation logged</p>"]
    samples = read_samples(run)
    parts.append("<h2>Samples</h2>")
    if samples:
        parts += [f"<h3>step {html.escape(str(s.get('step', '?')))}</h3><pre>{html.escape(s['text'])}</pre>"
                  for s in samples]
    else:
        parts.append(f"<p>no samples logged (no {SAMPLES_FILE} in the run folder)</p>")
    if with_model:
        parts.append("<h2>Best checkpoint</h2>")
        with tempfile.TemporaryDirectory() as tmp:
            body, notes = _model_section(run, cfg, text, Path(tmp))
        parts += [body] + [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(cfg_text or 'no config.yaml in the run folder')}</pre>",
              "<h2>Run info</h2>", f"<pre>{html.escape(json.dumps(info, indent=2) if info else 'no run_info.json')}</pre>"]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} report</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    target = Path(out) if out is not None else run / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, page)


def report_after_run(run_dir: str | os.PathLike, enabled: bool = True, say=print) -> Path | None:
    """``write_report`` for the end of a training run: returns None when disabled, and turns any
    failure into one warning line instead of an exception (the run itself has succeeded)."""
    if not enabled:
        return None
    try:
        path = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - a report must never fail a finished run
        say(f"warning: could not write the run report: {type(e).__name__}: {e}")
        return None
    say(f"report: {path}")
    return path
