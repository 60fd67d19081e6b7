"""PPO against GRPO on the arithmetic teaching task, for the same training wall clock.

    .venv/bin/python benchmarks/bench_ppo_vs_grpo.py [--out runs/bench/results/ppo_vs_grpo] \\
        [--stage1 runs/arithmetic-sft] [--seconds 600] [--eval-every 60]

Stage 1 is ``configs/arithmetic-sft.yaml`` (reused with ``--stage1 RUN_FOLDER``, else trained
here, ``--sft-set key=value`` to shrink it); then ``configs/grpo-arithmetic.yaml`` and
``configs/ppo-arithmetic.yaml`` each start from it and train for ``--seconds`` of training time
(evaluations excluded, one method after the other on the same machine). Every ``--eval-every``
seconds of training, and at the start and end, the held-out greedy exact match of the recipes'
own split (``tasks.grpo.evaluate_prompts``, the same prompts for both) is recorded against the
number of completions sampled so far (GRPO: prompts x K per rollout batch; PPO: one per prompt;
a rollout batch reused for num_iterations / ppo_epochs steps counts once). Writes OUT.json (the
curves, steps, seconds, load average) and OUT.png (exact match vs samples drawn, and vs time).
``--grpo-set`` / ``--ppo-set`` / ``--common-set`` pass ``key=value`` overrides (recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, prepare, write_json  # noqa: E402

from lmforge.config import read_recipe  # noqa: E402
from lmforge.tasks import config_from_dict  # noqa: E402
from lmforge.tasks.grpo import split_for_run  # noqa: E402
from lmforge.tasks.run import run  # noqa: E402
from lmforge.train.callbacks import Callback  # noqa: E402

SFT, GRPO_RECIPE, PPO_RECIPE = "configs/arithmetic-sft.yaml", "configs/grpo-arithmetic.yaml", "configs/ppo-arithmetic.yaml"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class TimedCurve(Callback):
    """Stops the run after ``seconds`` of training time (steps only; evaluations excluded) and
    evaluates held-out exact match every ``every`` seconds of it, at the start and at the end."""

    def __init__(self, seconds: float, every: float, samples_per_rollout: int, reuse: int):
        self.seconds, self.every = seconds, every
        self.samples_per_rollout, self.reuse = samples_per_rollout, reuse
        self.train_s, self.next_eval, self.curve, self._t0 = 0.0, every, [], None

    def _record(self, trainer) -> None:
        ev = trainer.evaluate()
        rollouts = math.ceil(trainer.step / self.reuse)  # rollout batches drawn so far
        self.curve.append({"step": trainer.step, "samples": rollouts * self.samples_per_rollout,
                           "train_seconds": round(self.train_s, 2), "exact_match": ev["val_exact_match"]})
        print(f"  step {trainer.step:4d}  samples {self.curve[-1]['samples']:6d}  train {self.train_s:6.1f} s  "
              f"held-out exact match {ev['val_exact_match']:.3f}", flush=True)

    def on_fit_start(self, trainer) -> None:
        self._record(trainer)

    def on_step_start(self, trainer) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.train_s += time.perf_counter() - self._t0
        done = self.train_s >= self.seconds
        if done or self.train_s >= self.next_eval:
            self._record(trainer)
            self.next_eval = self.train_s + self.every
        if done:
            trainer.request_stop()


def method_run(name: str, recipe: str, overrides: list[str], args, stage1: Path, work: Path) -> dict:
    raw = read_recipe(recipe, [f"run.out_dir={work / name}", f"model.init_from={stage1}",
                               f"data.cache_dir={work / 'cache'}", "train.max_steps=1000000",
                               "train.eval_every=1000000", "train.eval_at_start=false", "train.progress=false",
                               "train.checkpoint_every=null",
                               f"train.eval_batch_size={args.eval_batch_size}", "objective.eval_pass_k=0",
                               "objective.sample_completions=0", "train.best_metric=null", *args.common_set,
                               *overrides])
    if args.num_docs:
        raw["data"]["sources"][0]["num_docs"] = args.num_docs
    cfg = config_from_dict(raw)
    o, t = cfg.objective, cfg.train
    held_out = len(split_for_run(cfg)["val"])
    per_rollout = t.batch_size * t.grad_accum * getattr(o, "num_generations", 1)
    reuse = getattr(o, "num_iterations", 1)
    timer = TimedCurve(args.seconds, args.eval_every, per_rollout, reuse)
    print(f"{name}: {per_rollout} completions per rollout batch, {reuse} step(s) each", flush=True)
    before, t0 = loadavg(), time.time()
    summary = run(cfg, progress=False, print_fn=lambda *a, **k: None, callbacks=[timer])
    return {"recipe": recipe, "overrides": overrides, "held_out_prompts": held_out, "steps": summary.get("steps"),
            "completions_per_rollout": per_rollout, "steps_per_rollout": reuse, "curve": timer.curve,
            "train_seconds": round(timer.train_s, 1), "wall_seconds": round(time.time() - t0, 1),
            "load_start": before, "load_end": loadavg()}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, r in result["methods"].items():
        c = r["curve"]
        axes[0].plot([p["samples"] for p in c], [p["exact_match"] for p in c], "o-", label=name)
        axes[1].plot([p["train_seconds"] for p in c], [p["exact_match"] for p in c], "o-", label=name)
    axes[0].set_xlabel("completions sampled")
    axes[1].set_xlabel("training seconds (evaluations excluded)")
    for ax in axes:
        ax.set_ylabel("held-out greedy exact match")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PPO vs GRPO from the same stage 1, {result['seconds']:g} s of training each "
                 f"({result['held_out_prompts']} held-out problems)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=f"{RESULTS}/ppo_vs_grpo", help="OUT.json and OUT.png are written")
    p.add_argument("--work-dir", default="runs/bench/ppo-vs-grpo")
    p.add_argument("--stage1", default=None, help="an arithmetic-sft run folder to start from (default: train one)")
    p.add_argument("--seconds", type=float, default=600.0, help="training seconds per method")
    p.add_argument("--eval-every", type=float, default=60.0, help="training seconds between evaluations")
    p.add_argument("--num-docs", type=int, default=0, help="arithmetic problems (held-out: val_fraction of them)")
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sft-set", nargs="*", default=[], help="key=value overrides of stage 1")
    p.add_argument("--grpo-set", nargs="*", default=[], help="key=value overrides of the GRPO run")
    p.add_argument("--ppo-set", nargs="*", default=[], help="key=value overrides of the PPO run")
    p.add_argument("--common-set", nargs="*", default=[], help="key=value overrides of both runs")
    args = p.parse_args(argv)
    out_stem = Path(args.out).resolve()
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    _, work = prepare(str(out_stem.parent), args.work_dir, args.threads)
    shutil.rmtree(work, ignore_errors=True)
    result = {"seconds": args.seconds, "threads": args.threads, "torch": torch.__version__,
              "common_overrides": args.common_set}
    if args.stage1:
        stage1 = Path(args.stage1).resolve()
        result["stage1"] = {"reused": str(stage1)}
    else:
        stage1 = work / "arithmetic-sft"
        t0 = time.time()
        sft = read_recipe(SFT, [f"run.out_dir={stage1}", f"data.cache_dir={work / 'cache'}", "train.progress=false",
                                *args.sft_set])
        summary = run(config_from_dict(sft), progress=False, print_fn=lambda *a, **k: None)
        result["stage1"] = {"overrides": args.sft_set, "steps": summary.get("steps"),
                            "seconds": round(time.time() - t0, 1)}
        print(f"stage 1: {summary.get('steps')} steps in {result['stage1']['seconds']} s", flush=True)
    result["methods"] = {
        "grpo": method_run("grpo", GRPO_RECIPE, args.grpo_set, args, stage1, work),
        "ppo": method_run("ppo", PPO_RECIPE, args.ppo_set, args, stage1, work),
    }
    counts = {r["held_out_prompts"] for r in result["methods"].values()}
    if len(counts) != 1:
        raise SystemExit(f"the two runs held out different numbers of prompts {sorted(counts)}; expected the same split")
    result["held_out_prompts"] = counts.pop()
    write_json(out_stem.with_suffix(".json"), result)
    plot(result, out_stem.with_suffix(".png"))
    print(json.dumps({k: {"steps": v["steps"], "final": v["curve"][-1]} for k, v in result["methods"].items()},
                     indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
