#!/usr/bin/env python
"""``configs/sft-oasst.yaml`` run for real: multi-turn chat SFT of SmolLM2-135M-Instruct (LoRA) on
the 100 OpenAssistant conversation trees of catalog:oasst-100-trees, every assistant turn trained.

Figures: validation loss / perplexity on assistant tokens at step 0 (the base model) and at each
later evaluation, wall time, training tokens/s, and greedy answers to the recipe's validation
prompts (each tree's first conversation up to its last reply) from the base (the adapters
switched off) and from the tuned model. ``--skip-train`` reads an existing run folder.
Results: ``benchmarks/results/sft_oasst.json`` and a printed table.

    .venv/bin/python benchmarks/bench_sft_oasst.py          # ~20 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare  # noqa: E402

import lmforge  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.model.lora import adapters_disabled  # noqa: E402
from lmforge.tasks.sft import prompt_text, split_for_run, greedy_answers  # noqa: E402
from lmforge.train.logging import read_metrics  # noqa: E402
from lmforge.tasks.run import run  # noqa: E402

RECIPE = "configs/sft-oasst.yaml"


def median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/sft-oasst")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides of the recipe")
    ap.add_argument("--skip-train", action="store_true", help="look at an existing run folder")
    ap.add_argument("--answers", type=int, default=3, help="validation prompts answered before/after")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--out", default="runs/bench/results/sft_oasst.json")
    args = ap.parse_args()
    out_dir, _ = prepare(str(Path(args.out).parent), "runs", args.threads)
    run_dir = Path(args.run_dir)
    cfg = load_config(RECIPE, [f"run.out_dir={run_dir}", "train.resume=never", *args.set])
    load_start = os.getloadavg()
    wall, steps = None, None
    if not args.skip_train:
        t0 = time.perf_counter()
        steps = run(cfg, progress=True).get("steps")
        wall = time.perf_counter() - t0

    metrics = read_metrics(run_dir / "metrics.jsonl")
    val = [m for m in metrics if m.get("split") == "val"]
    train = [m for m in metrics if m.get("split") == "train"]
    model, tok = lmforge.from_pretrained(run_dir, with_tokenizer=True)  # the best checkpoint
    _, val_recs, _ = split_for_run(cfg)
    prompts = [p for p in (prompt_text(r, cfg.objective, tok) for r in val_recs) if p][:args.answers]
    with adapters_disabled(model):
        before = greedy_answers(model, tok, prompts, args.new_tokens, batch_size=1)
    after = greedy_answers(model, tok, prompts, args.new_tokens, batch_size=1)
    result = {
        "recipe": RECIPE, "run_dir": str(run_dir), "overrides": args.set,
        "val": [{k: m[k] for k in ("step", "loss", "ppl") if k in m} for m in val],
        "train_loss_first_last": [train[0]["loss"], train[-1]["loss"]] if train else None,
        "train_tokens_per_s_median": median([m["tokens_per_s"] for m in train if "tokens_per_s" in m]),
        "steps": steps or (train[-1]["step"] if train else None), "wall_seconds": wall,
        "train_seconds_from_log": train[-1]["time"] - val[0]["time"] if train and val else None,
        "answers": [{"prompt": p, "before": b.strip(), "after": a.strip()} for p, b, a in zip(prompts, before, after)],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out_dir / Path(args.out).name
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print("\n| step | val loss (assistant tokens) | val ppl |\n|---|---|---|")
    for m in result["val"]:
        print(f"| {m['step']} | {m['loss']:.4f} | {m.get('ppl', float('nan')):.2f} |")
    print(f"\n{result['steps']} steps, training {result['train_seconds_from_log']:.0f} s; results: {path}")
    for a in result["answers"]:
        print(f"\n--- {a['prompt'][-160:]!r}\nbefore: {str(a['before'])[:300]}\nafter:  {str(a['after'])[:300]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
