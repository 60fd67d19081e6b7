"""Greedy exact match (and pass@k with sampling) of models on the held-out prompts of a GRPO
recipe: the before/after figures of the alignment teaching recipes.

    .venv/bin/python benchmarks/eval_arithmetic.py --model runs/arithmetic-sft runs/dpo-scratch runs/grpo-arithmetic
    .venv/bin/python benchmarks/eval_arithmetic.py --pass-k 0 --model runs/scan/checkpoints/step_* --out F.json

Each --model is a run folder (its best checkpoint) or a checkpoint; ``--pass-k 0`` skips the
sampled pass@k (greedy only: a scan over a run's checkpoints takes seconds). The held-out prompts are the
ones configs/grpo-arithmetic.yaml evaluates on (its data section and seed). Results are printed
and written to ``--out`` (default runs/bench/results/eval_arithmetic.json: the committed
benchmarks/results files are never overwritten unless named), with paths relative to the repository.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lmforge import from_pretrained
from lmforge.tasks import load_config
from lmforge.tasks.grpo import evaluate_prompts, held_out_batches
from lmforge.tasks.common import resolve_init_path
from lmforge.tasks.grpo import split_for_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO as ROOT, RESULTS, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "grpo-arithmetic.yaml"))
    ap.add_argument("--model", nargs="+", required=True)
    ap.add_argument("--pass-k", type=int, default=8)
    ap.add_argument("--out", default=f"{RESULTS}/eval_arithmetic.json",
                    help="where the JSON goes (default: %(default)s, git-ignored)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"objective.eval_pass_k={args.pass_k}", "objective.sample_completions=0",
                                    f"model.init_from={args.model[0]}"])  # only the held-out prompts are used
    held = split_for_run(cfg)["val"]
    rows = {}
    for name in args.model:
        model, tok = from_pretrained(resolve_init_path(name), with_tokenizer=True)
        t0 = time.time()
        m = evaluate_prompts(model, held_out_batches(held, tok, 100)(), cfg.objective, tok)
        rows[name] = {**m, "prompts": len(held), "seconds": round(time.time() - t0, 1)}
        sampled = f"  pass@{args.pass_k} {m[f'pass_at_{args.pass_k}']:.3f}" if args.pass_k else ""
        print(f"{name:32s} greedy exact match {m['exact_match']:.3f}{sampled}  ({len(held)} held-out prompts)")
    print(f"wrote {write_json(args.out, {'config': args.config, 'results': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
