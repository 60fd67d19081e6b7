"""The GRPO teaching recipe run for real: ``arithmetic-sft.yaml`` (stage 1) then
``grpo-arithmetic.yaml`` (stage 2), with the before/after figures the recipe is judged on.

    .venv/bin/python benchmarks/bench_grpo_arithmetic.py [--threads 2]

Reports, on the 500 held-out problems of ``grpo-arithmetic.yaml`` (never GRPO training prompts):
the stage-1 model's greedy exact match and pass@8 (sampled at the recipe's temperature), then
the GRPO model's (the last step's and the best evaluation's), the gain in points, and the wall
time of each stage with the load average at its start and end (``/proc/loadavg``: on a shared
machine the times are only comparable at equal load). Plots reward, accuracy and completion
length over the GRPO steps (from the run's ``metrics.jsonl``) to
``benchmarks/results/grpo_arithmetic_curves.png``; figures go to
``benchmarks/results/grpo_arithmetic.json``. Run folders stay under ``runs/bench/grpo-arithmetic``
(started afresh each time). ``--sft-set`` / ``--grpo-set`` pass ``key=value`` overrides to a
stage, for exploring settings (they are recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare  # noqa: E402

from lmforge import from_pretrained  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.tasks.grpo import evaluate_prompts, held_out_batches  # noqa: E402
from lmforge.tasks.common import resolve_init_path  # noqa: E402
from lmforge.tasks.grpo import split_for_run  # noqa: E402
from lmforge.tasks.run import run  # noqa: E402

SFT, GRPO_RECIPE = "configs/arithmetic-sft.yaml", "configs/grpo-arithmetic.yaml"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def stage(config: str, overrides: list[str], quiet: bool) -> tuple[dict, dict]:
    """Run one recipe; its summary and the wall time with the load before and after."""
    cfg = load_config(config, overrides)
    say = (lambda *a, **k: None) if quiet else print
    before, t0 = loadavg(), time.time()
    summary = run(cfg, progress=False, print_fn=say)
    if summary.get("stopped_early"):  # SIGINT/SIGTERM: the trainer saved and stopped; so does the benchmark
        raise SystemExit(f"{config}: stopped at step {summary.get('steps')}; no figures written")
    return summary, {"seconds": round(time.time() - t0, 1), "load_start": before, "load_end": loadavg()}


def held_out_scores(grpo_cfg, model_path: str, k: int) -> dict:
    """Greedy exact match and pass@k (sampled at the recipe's temperature) on the held-out prompts."""
    held = split_for_run(grpo_cfg)["val"]
    model, tok = from_pretrained(resolve_init_path(model_path), with_tokenizer=True)
    torch.manual_seed(0)
    m = evaluate_prompts(model, held_out_batches(held, tok, 100)(), grpo_cfg.objective, tok)
    return {"greedy_exact_match": m["exact_match"], f"pass_at_{k}": m[f"pass_at_{k}"],
            "completion_length": m["completion_length"], "prompts": len(held)}


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "train"], [r for r in rows if r.get("split") == "val"]


def plot_curves(metrics: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [r["reward"] for r in train], label="reward (mean over K x prompts)")
    axes[0].plot(steps, [r["frac_zero_std"] for r in train], label="groups with zero reward std", alpha=0.7)
    axes[0].set_title("training reward")
    axes[1].plot(steps, [r["accuracy"] for r in train], label="train accuracy (sampled)", alpha=0.7)
    axes[1].plot([r["step"] for r in val], [r["exact_match"] for r in val], "o-", label="held-out greedy exact match")
    if val and "pass_at_8" in val[0]:
        axes[1].plot([r["step"] for r in val], [r["pass_at_8"] for r in val], "s--", label="held-out pass@8")
    axes[1].set_title("accuracy")
    axes[2].plot(steps, [r["completion_length"] for r in train], label="mean")
    axes[2].plot(steps, [r["completion_length_max"] for r in train], label="max", alpha=0.7)
    axes[2].set_title("completion length (tokens)")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="runs/bench/results")
    p.add_argument("--work-dir", default="runs/bench/grpo-arithmetic")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pass-k", type=int, default=8)
    p.add_argument("--sft-set", nargs="*", default=[], help="key=value overrides of stage 1")
    p.add_argument("--grpo-set", nargs="*", default=[], help="key=value overrides of stage 2")
    p.add_argument("--name", default="grpo_arithmetic", help="stem of the JSON and PNG written")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out, work = prepare(args.out_dir, args.work_dir, args.threads)
    shutil.rmtree(work, ignore_errors=True)
    sft_dir, grpo_dir = work / "arithmetic-sft", work / "grpo-arithmetic"
    common = [f"data.cache_dir={work / 'cache'}"]

    sft_summary, sft_time = stage(SFT, [f"run.out_dir={sft_dir}", *common, *args.sft_set], args.quiet)
    grpo_overrides = [f"run.out_dir={grpo_dir}", f"model.init_from={sft_dir}", *common, *args.grpo_set]
    eval_cfg = load_config(GRPO_RECIPE, [*grpo_overrides, f"objective.eval_pass_k={args.pass_k}",
                                         "objective.sample_completions=0"])
    before = held_out_scores(eval_cfg, str(sft_dir), args.pass_k)
    print(f"stage 1: greedy {before['greedy_exact_match']:.3f}  pass@{args.pass_k} "
          f"{before[f'pass_at_{args.pass_k}']:.3f}  ({sft_time['seconds']} s, load {sft_time['load_start']})",
          flush=True)

    grpo_summary, grpo_time = stage(GRPO_RECIPE, grpo_overrides, args.quiet)
    last = max((c for c in (grpo_dir / "checkpoints").glob("step_*")), key=lambda c: c.name)
    after_last = held_out_scores(eval_cfg, str(last), args.pass_k)
    after_best = held_out_scores(eval_cfg, str(grpo_dir), args.pass_k)
    _, val = read_metrics(grpo_dir / "metrics.jsonl")
    gain = 100 * (after_last["greedy_exact_match"] - before["greedy_exact_match"])
    result = {
        "recipes": [SFT, GRPO_RECIPE], "sft_overrides": args.sft_set, "grpo_overrides": args.grpo_set,
        "threads": args.threads, "torch": torch.__version__,
        "stage1": {**before, **sft_time, "steps": sft_summary.get("steps")},
        "grpo_last": {**after_last, "checkpoint": last.name},
        "grpo_best": {**after_best, "note": "best evaluation on the same held-out prompts (selection on them)"},
        "grpo": {**grpo_time, "steps": grpo_summary.get("steps"),
                 "val_curve": [{k: r[k] for k in ("step", "exact_match", "pass_at_8") if k in r} for r in val]},
        "gain_points_last": round(gain, 1),
        "total_seconds": round(sft_time["seconds"] + grpo_time["seconds"], 1),
    }
    png = out / f"{args.name}_curves.png"
    plot_curves(grpo_dir / "metrics.jsonl", png,
                f"grpo-arithmetic: greedy {before['greedy_exact_match']:.3f} -> {after_last['greedy_exact_match']:.3f} "
                f"on {before['prompts']} held-out problems")
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
