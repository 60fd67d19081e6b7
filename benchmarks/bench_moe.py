#!/usr/bin/env python
"""Mixture of experts against its dense twin on tiny shakespeare, for the same wall-clock time.

Two runs, one after the other in this process, through ``lmforge.tasks.run.run``:

1. ``moe`` -- ``configs/moe-shakespeare.yaml``: 4 layers of width 128, each MLP replaced by 4
   SwiGLU experts of width 192 with top-2 routing (dropless), load-balancing and z-loss.
2. ``dense`` -- ``configs/moe-shakespeare-dense.yaml``: the same model with one SwiGLU MLP of
   width 384, i.e. the same parameters per token (active parameters; the MoE adds a 128 x 4
   router per layer) and about half the MLP parameters in total.

Each run trains until its training loop has taken ``--seconds`` of wall time (a callback asks
the trainer to stop, as SIGINT would), evaluating every ``--eval-every`` steps (lmforge's
protocol: the first ``eval_batches`` batches of the validation split; evaluation time counts in
the budget for both). Both keep their recipe's learning-rate schedule of ``--max-steps`` steps,
so a short budget stops both early in it: the curves compare the two at equal time, not trained
to convergence. The final model of each run is evaluated once more after the stop.

Outputs in ``--out`` (default ``runs/bench/results``, git-ignored; the committed figures were
written with ``--out benchmarks/results``): ``moe.json`` (per run: parameters total and
active, steps, tokens/s, the evaluations with their wall times, final validation loss; the MoE's
last expert usage per layer), ``moe_curves.png`` (validation loss and training cross-entropy
against train-loop wall time), ``moe_expert_usage.png`` (the MoE run's expert usage, the run
report's plot). Run folders go to ``--work-dir`` (default ``runs/bench-moe``, wiped per run).

On a shared or small machine timings are noisy; treat short runs as preliminary::

    .venv/bin/python benchmarks/bench_moe.py --seconds 75 --eval-every 20 --eval-batches 4
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, prepare, write_json
from lmforge.inspect.figures import new_figure, save_png
from lmforge.inspect.report import expert_usage, metric_series, plot_expert_usage
from lmforge.model import count_active_parameters, count_parameters
from lmforge.tasks import load_config
from lmforge.tasks.run import run
from lmforge.train.callbacks import Callback
from lmforge.train.logging import read_metrics

RUNS = {"moe": "configs/moe-shakespeare.yaml", "dense": "configs/moe-shakespeare-dense.yaml"}


class WallClock(Callback):
    """Stops the run once its training loop has run ``seconds``; records what happened when."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = 0.0
        self.evals: list[dict] = []
        self.train: list[dict] = []
        self.trainer = None
        self.step_seconds = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def on_fit_start(self, trainer) -> None:
        self.t0 = time.perf_counter()
        self.trainer = trainer

    def on_step_start(self, trainer) -> None:
        self._step_t0 = time.perf_counter()

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.step_seconds += time.perf_counter() - self._step_t0
        self.train.append({"step": trainer.step, "seconds": self.elapsed(),
                           "ce_loss": metrics.get("ce_loss", metrics["loss"])})
        if self.elapsed() >= self.seconds:
            trainer.request_stop()

    def on_evaluate(self, trainer, metrics: dict) -> None:
        self.evals.append({"step": trainer.step, "seconds": self.elapsed(), "val_loss": metrics.get("val_loss")})


def train_one(name: str, config: str, work: Path, args) -> dict:
    run_dir = work / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = load_config(config, [f"run.out_dir={run_dir}", f"data.cache_dir={work / 'cache'}", "train.resume=never",
                               f"train.max_steps={args.max_steps}", f"train.eval_every={args.eval_every}",
                               f"train.eval_batches={args.eval_batches}", "train.log_every=5",
                               "logging.report=false", "sample.max_new_tokens=0"])
    clock = WallClock(args.seconds)
    print(f"[{name}] {config}: training for {args.seconds:.0f} s", flush=True)
    run(cfg, progress=False, print_fn=lambda *a, **k: None, callbacks=[clock])
    trainer = clock.trainer
    loop_seconds = clock.elapsed()
    final = trainer.evaluate()  # the model where the clock stopped it
    model = trainer.model
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * model.config.context_length
    out = {"config": config, "parameters": count_parameters(model),
           "active_parameters": count_active_parameters(model),
           "steps": trainer.step, "train_loop_seconds": loop_seconds, "step_seconds": clock.step_seconds,
           "tokens_per_s": trainer.step * tokens_per_step / clock.step_seconds if clock.step_seconds else None,
           "evals": clock.evals, "final_val_loss": final.get("val_loss"), "train": clock.train[::5]}
    series = metric_series(read_metrics(run_dir / "metrics.jsonl"))
    usage = expert_usage(series)
    if usage:
        out["expert_usage_last"] = {f"L{layer}": [usage[layer][e][1][-1] for e in sorted(usage[layer])]
                                    for layer in sorted(usage)}
        out["_usage"] = usage
    print(f"[{name}] {trainer.step} steps, final val loss {out['final_val_loss']:.4f}", flush=True)
    return out


def plot_curves(runs: dict, path: Path) -> Path:
    fig = new_figure(11.0, 4.0)
    ax, ax2 = fig.subplots(1, 2)
    for name, r in runs.items():
        xs = [e["seconds"] for e in r["evals"]] + [r["train_loop_seconds"]]
        ys = [e["val_loss"] for e in r["evals"]] + [r["final_val_loss"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({r['active_parameters'] / 1e3:.0f}k active / "
                                                  f"{r['parameters'] / 1e3:.0f}k params)")
        ax2.plot([t["seconds"] for t in r["train"]], [t["ce_loss"] for t in r["train"]], lw=1, label=name)
    for a, title in ((ax, "validation loss"), (ax2, "training cross-entropy")):
        a.set_xlabel("train-loop wall time (s)")
        a.set_title(title)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=RESULTS, help="where the JSON and PNGs go")
    p.add_argument("--work-dir", default="runs/bench-moe")
    p.add_argument("--seconds", type=float, default=60.0, help="train-loop wall time of each run")
    p.add_argument("--max-steps", type=int, default=2000, help="the learning-rate schedule's length")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (2 threads on 2 busy shared cores ran 10x slower)")
    args = p.parse_args(argv)
    out, work = prepare(args.out, args.work_dir, args.threads)
    runs = {name: train_one(name, config, work, args) for name, config in RUNS.items()}
    usage = runs["moe"].pop("_usage", None)
    curves = plot_curves(runs, out / "moe_curves.png")
    files = {"curves": curves.name}
    if usage:
        files["expert_usage"] = save_png(plot_expert_usage(usage, last=5), out / "moe_expert_usage.png").name
    result = {"benchmark": "moe-vs-dense tiny shakespeare, equal wall clock", "seconds_per_run": args.seconds,
              "threads": args.threads, "torch": torch.__version__, "machine": platform.platform(),
              "python": sys.version.split()[0], "load_average_1min_at_end": os.getloadavg()[0],
              "runs": runs, "files": files,
              "note": "preliminary: short runs on a shared machine, both stopped early in a "
                      f"{args.max_steps}-step schedule"}
    write_json(out / "moe.json", result)
    for name, r in runs.items():
        print(f"{name:6s} params {r['parameters']:>8d}  active {r['active_parameters']:>8d}  steps {r['steps']:>5d}  "
              f"tok/s {r['tokens_per_s'] or 0:>8.0f}  final val loss {r['final_val_loss']:.4f}")
    print(f"wrote {out / 'moe.json'}, {', '.join(str(out / f) for f in files.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
