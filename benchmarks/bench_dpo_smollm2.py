#!/usr/bin/env python
"""``configs/dpo-smollm2-lora.yaml`` run for real, then looked at from three sides.

1. The recipe (SmolLM2-135M-Instruct + LoRA, DPO on the book's preference data, 929/55/110 in
   file order): wall time, validation metrics at step 0 and at the end, and the best model's
   metrics on the 110 held-out test pairs (targets: accuracy >= 0.90, mean margin above the
   book's ~2 at beta 0.1). ``--skip-train`` reads an existing run folder instead.
2. 500 Anthropic HH-RLHF harmless test pairs (a different distribution; no target), rendered with
   SmolLM2's chat template, scored by the model before (adapters off: the base) and after:
   likelihood preference (summed log-prob of chosen > rejected) before and after, and the DPO
   reward accuracy / margin of the trained adapters against the base.
3. Three held-out test prompts answered greedily before (adapters off) and after.

Results: ``benchmarks/results/dpo_smollm2_lora.json`` and a printed table.

    .venv/bin/python benchmarks/bench_dpo_smollm2.py                # train (~40 min) + look
    .venv/bin/python benchmarks/bench_dpo_smollm2.py --skip-train   # look at runs/dpo-smollm2-lora
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare  # noqa: E402

import lmforge  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.model.lora import adapters_disabled  # noqa: E402
from lmforge.objectives.dpo import DPO  # noqa: E402
from lmforge.tasks.dpo import DPOOptions, precompute_reference  # noqa: E402
from lmforge.tasks.dpo import EncodedPairs, fixed_batches, source_pairs, split_for_run  # noqa: E402
from lmforge.tasks.sft import greedy_answers  # noqa: E402
from lmforge.data.sources import SourceSpec  # noqa: E402
from lmforge.train.logging import read_metrics  # noqa: E402
from lmforge.tasks.run import run  # noqa: E402

RECIPE = "configs/dpo-smollm2-lora.yaml"
HH = "catalog:hh-rlhf-harmless-test"


def train(run_dir: Path) -> float:
    cfg = load_config(RECIPE, [f"run.out_dir={run_dir}", "train.resume=never"])
    t0 = time.perf_counter()
    run(cfg, progress=True)
    return time.perf_counter() - t0


def pair_table(model, enc: EncodedPairs, objective: DPO, tokenizer, max_length: int, batch: int,
               adapters: bool) -> torch.Tensor:
    """(N, 2) summed log-probs [chosen, rejected] of every pair, adapters on or off."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    spec = {"x": {"size": len(enc), "batches": fixed_batches(enc, batch, pad, max_length, "x", by_length=True)}}
    if adapters:
        return precompute_reference(objective, model, torch.device("cpu"), spec)["x"]
    with adapters_disabled(model):
        return precompute_reference(objective, model, torch.device("cpu"), spec)["x"]


def preference_figures(before: torch.Tensor, after: torch.Tensor, beta: float) -> dict:
    """Likelihood preference before/after and the DPO reward metrics of ``after`` against ``before``."""
    margins = beta * ((after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1]))  # (N,)
    return {"pairs": int(before.shape[0]),
            "likelihood_accuracy_before": float((before[:, 0] > before[:, 1]).float().mean()),
            "likelihood_accuracy_after": float((after[:, 0] > after[:, 1]).float().mean()),
            "reward_accuracy": float((margins > 0).float().mean()),
            "reward_margin_mean": float(margins.mean())}


def hh_pairs(tokenizer, n: int, max_length: int, max_prompt_length: int) -> EncodedPairs:
    o = DPOOptions(format="hh", max_length=max_length, max_prompt_length=max_prompt_length, skip_identical=True,
                   skip_empty=True)
    pairs = source_pairs(SourceSpec(path=HH, limit=n), o)[:n]
    return EncodedPairs(pairs, tokenizer, o, max_length, f"max_length {max_length}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/dpo-smollm2-lora")
    ap.add_argument("--skip-train", action="store_true", help="look at an existing run folder")
    ap.add_argument("--hh-pairs", type=int, default=500)
    ap.add_argument("--hh-max-length", type=int, default=512)
    ap.add_argument("--responses", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also-run", nargs="*", default=[],
                    help="other run folders of the recipe (e.g. other LoRA settings): their eval_report.json is kept")
    ap.add_argument("--out", default="runs/bench/results/dpo_smollm2_lora.json")
    args = ap.parse_args()
    out_dir, _ = prepare(str(Path(args.out).parent), "runs", args.threads)
    run_dir = Path(args.run_dir)

    seconds = None if args.skip_train else train(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    if seconds is None:  # the run's own clock: its start to its last logged line (final evaluation excluded)
        start = json.loads((run_dir / "run_info.json").read_text())["start_time"]
        seconds = metrics[-1]["time"] - datetime.fromisoformat(start).timestamp()
    history = [m for m in metrics if m.get("split") == "val"]
    report = json.loads((run_dir / "eval_report.json").read_text())

    model, tok = lmforge.from_pretrained(run_dir, with_tokenizer=True)
    cfg = load_config(RECIPE, [f"run.out_dir={run_dir}"])
    o = cfg.objective
    objective = DPO(o.loss_type, o.beta, o.label_smoothing, o.gamma, o.average_logps)
    beta = o.beta

    # ---- HH-RLHF, before (adapters off) and after
    t0 = time.perf_counter()
    hh = hh_pairs(tok, args.hh_pairs, args.hh_max_length, args.hh_max_length - 128)
    hh_before = pair_table(model, hh, objective, tok, args.hh_max_length, 8, adapters=False)
    hh_after = pair_table(model, hh, objective, tok, args.hh_max_length, 8, adapters=True)
    hh_fig = {**preference_figures(hh_before, hh_after, beta), "seconds": time.perf_counter() - t0,
              "prompts_cut": hh.prompts_cut, "completions_cut": hh.completions_cut}

    # ---- the book's test pairs: the same figures from per-pair tables (a cross-check of eval_report)
    test = EncodedPairs(split_for_run(cfg)["test"], tok, o, o.max_length, "max_length")
    t_before = pair_table(model, test, objective, tok, o.max_length, 8, adapters=False)
    t_after = pair_table(model, test, objective, tok, o.max_length, 8, adapters=True)
    test_fig = preference_figures(t_before, t_after, beta)

    # ---- responses before/after
    from lmforge.data.preference_format import render_pair

    prompts = [render_pair(p)[0] for _, p in split_for_run(cfg)["test"][:args.responses]]
    with adapters_disabled(model):
        before = greedy_answers(model, tok, prompts, args.new_tokens, batch_size=1)
    after = greedy_answers(model, tok, prompts, args.new_tokens, batch_size=1)
    responses = [{"prompt": p, "before": b.strip(), "after": a.strip()} for p, b, a in zip(prompts, before, after)]

    result = {
        "recipe": RECIPE, "run_dir": str(run_dir), "wall_seconds": seconds,
        "val_step0": history[0] if history else None, "val_final": history[-1] if history else None,
        "eval_report": report, "test_from_tables": test_fig, "hh_rlhf": hh_fig, "responses": responses,
        "other_runs": {d: {"config": (Path(d) / "config.yaml").read_text(),
                           "eval_report": json.loads((Path(d) / "eval_report.json").read_text())}
                       for d in args.also_run},
        "targets": {"test_accuracy": 0.90, "test_margin_above": 2.0},
        "met": {"test_accuracy": report["test"]["rewards/accuracy"] >= 0.90,
                "test_margin": report["test"]["rewards/margins"] > 2.0},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
    }
    path = out_dir / Path(args.out).name
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))

    t = report["test"]
    print(f"\n{'':34}{'figure':>12}  target")
    print(f"{'test accuracy (110 pairs)':34}{t['rewards/accuracy']:12.3f}  >= 0.90")
    print(f"{'test mean margin':34}{t['rewards/margins']:12.3f}  > 2 (book)")
    print(f"{'HH-RLHF likelihood acc before':34}{hh_fig['likelihood_accuracy_before']:12.3f}")
    print(f"{'HH-RLHF likelihood acc after':34}{hh_fig['likelihood_accuracy_after']:12.3f}")
    print(f"{'HH-RLHF reward accuracy':34}{hh_fig['reward_accuracy']:12.3f}")
    print(f"{'HH-RLHF reward margin':34}{hh_fig['reward_margin_mean']:12.3f}")
    if seconds:
        print(f"{'wall time (s)':34}{seconds:12.0f}")
    for r in responses:
        print(f"\n--- {r['prompt'][-120:]!r}\nbefore: {r['before'][:300]}\nafter:  {r['after'][:300]}")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
