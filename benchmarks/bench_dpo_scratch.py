#!/usr/bin/env python
"""The DPO teaching recipe run for real: ``arithmetic-sft.yaml`` (stage 1) then ``dpo-scratch.yaml``
(DPO on built-in pairs: the right answer chosen, a plausible wrong one rejected).

Reports the DPO run's validation preference figures at step 0 and after (reward accuracy and
margin: does the policy now rank right over wrong by more than the reference does?), and, on the
500 held-out problems of ``grpo-arithmetic.yaml``, greedy exact match and pass@8 of the stage-1
model and of the DPO model (does preferring right answers make the model *answer* right more
often?), with the wall time of each stage. Figures: ``benchmarks/results/dpo_scratch.json``.

    .venv/bin/python benchmarks/bench_dpo_scratch.py        # ~5 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare  # noqa: E402
from bench_grpo_arithmetic import GRPO_RECIPE, SFT, held_out_scores, stage  # noqa: E402

from lmforge.config import load_config  # noqa: E402
from lmforge.train.logging import read_metrics  # noqa: E402

DPO_RECIPE = "configs/dpo-scratch.yaml"
SHOWN = ("loss", "rewards/accuracy", "rewards/margins", "logps/chosen", "logps/rejected")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="runs/bench/results")
    p.add_argument("--work-dir", default="runs/bench/dpo-scratch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pass-k", type=int, default=8)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out, work = prepare(args.out_dir, args.work_dir, args.threads)
    shutil.rmtree(work, ignore_errors=True)
    sft_dir, dpo_dir = work / "arithmetic-sft", work / "dpo-scratch"
    common = [f"data.cache_dir={work / 'cache'}"]

    sft_summary, sft_time = stage(SFT, [f"run.out_dir={sft_dir}", *common], args.quiet)
    dpo_summary, dpo_time = stage(DPO_RECIPE, [f"run.out_dir={dpo_dir}", f"model.init_from={sft_dir}", *common],
                                  args.quiet)
    eval_cfg = load_config(GRPO_RECIPE, [f"run.out_dir={work / 'eval'}", f"model.init_from={sft_dir}", *common,
                                         f"objective.eval_pass_k={args.pass_k}", "objective.sample_completions=0"])
    before = held_out_scores(eval_cfg, str(sft_dir), args.pass_k)
    after = held_out_scores(eval_cfg, str(dpo_dir), args.pass_k)
    val = [{k: m[k] for k in ("step", *SHOWN) if k in m}
           for m in read_metrics(dpo_dir / "metrics.jsonl") if m.get("split") == "val"]
    result = {
        "recipes": [SFT, DPO_RECIPE], "threads": args.threads, "torch": torch.__version__,
        "stage1": {**sft_time, "steps": sft_summary.get("steps")},
        "dpo": {**dpo_time, "steps": dpo_summary.get("steps"), "val_curve": val},
        "held_out_problems": {"stage1": before, "dpo_best": after,
                              "note": "grpo-arithmetic.yaml's 500 held-out prompts, greedy and sampled answers"},
        "total_seconds": round(sft_time["seconds"] + dpo_time["seconds"], 1),
    }
    (out / "dpo_scratch.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| DPO step | val reward accuracy | val margin | val logps chosen / rejected |\n|---|---|---|---|")
    for m in val:
        print(f"| {m['step']} | {m['rewards/accuracy']:.3f} | {m['rewards/margins']:.3f} | "
              f"{m['logps/chosen']:.2f} / {m['logps/rejected']:.2f} |")
    k = f"pass_at_{args.pass_k}"
    print(f"\nheld-out greedy exact match {before['greedy_exact_match']:.3f} -> {after['greedy_exact_match']:.3f}, "
          f"{k} {before[k]:.3f} -> {after[k]:.3f}; wall time {result['total_seconds']:.0f} s "
          f"(stage 1 {sft_time['seconds']:.0f} s, DPO {dpo_time['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
