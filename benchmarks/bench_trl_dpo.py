#!/usr/bin/env python
"""DPO side by side with TRL's DPOTrainer: SmolLM2-135M-Instruct (GGUF, fp32, CPU) with LoRA rank 8
(alpha 16, dropout 0, q and v) on the book's instruction-data-with-preference.json.

Both sides train the same pairs in the same order with the same batch size, max_length, beta 0.1,
sigmoid loss, constant learning rate, AdamW betas, grad clipping; the reference is the base model
with the adapters switched off on both (lmforge: ``reference: auto`` on a LoRA model; TRL: a PEFT
model and no ``ref_model``).

* lmforge drives the real pipeline, ``lmforge.tasks.run.run`` on a ``task: dpo`` config
  (``objective.format: instruction``: the book's Alpaca prompt; each completion ends with eos).
* TRL gets the prompt/chosen/rejected *strings* lmforge renders (``render_pair``), in the order
  lmforge's step sampler draws them, through a sequential sampler; it appends eos itself and
  tokenizes. Every pair's token ids are checked against lmforge's before training.

Step 0 the policy is the reference on both sides, so both losses are ln 2; the step-0 policy
log-probs of chosen and rejected (batch means) are compared too. Speed: training tokens/s (real
tokens of the chosen and rejected rows, prompts included, per second of steady-state step time,
after ``--warmup`` steps). Each side runs in its own process (peak RSS of each).

Results: ``benchmarks/results/trl_dpo.json`` and a printed table.

    .venv/bin/python benchmarks/bench_trl_dpo.py --steps 10 --warmup 2 --threads 2
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
from _common import prepare  # noqa: E402
from _trl_common import (LORA, SMOLLM2_INIT, hf_clock, hf_smollm2, lmforge_clock, load_average,  # noqa: E402
                         peak_rss_mb, peft_lora_config, run_side, versions, warn_if_busy)

DATA = "catalog:book-preferences"


def lm_config(args, out_dir: Path):
    """The lmforge run: task dpo on the book's preference data, LoRA on SmolLM2."""
    from lmforge.tasks import config_from_dict

    return config_from_dict({
        "task": "dpo",
        "run": {"name": "bench-trl-dpo", "out_dir": str(out_dir), "seed": args.seed},
        "model": {"init_from": SMOLLM2_INIT, "lora": dict(LORA)},
        "objective": {"format": "instruction", "loss_type": "sigmoid", "beta": args.beta, "reference": "auto",
                      "max_length": args.max_length, "skip_identical": True, "add_eos": True},
        # val: 2 pairs (the task needs a validation split; it runs after the last timed step)
        "data": {"sources": [{"path": DATA}], "val_sources": [{"path": DATA, "limit": 2}]},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1, "lr": args.lr,
                  "min_lr": args.lr, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                  "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "grad_clip": 1.0, "eval_every": 10**6,
                  "eval_batch_size": 2, "log_every": 1, "checkpoint_every": None, "keep_last": 1,
                  "best_metric": None, "resume": "never", "progress": False},
        "logging": {"report": False},
    })


def pairs_in_order(args, cfg):
    """lmforge's training pairs, in the order its step sampler draws them, steps 0..steps-1:
    ``[(prompt, chosen, rejected) strings]``."""
    from lmforge.data.preference_format import render_pair
    from lmforge.data.sampler import StepSampler
    from lmforge.tasks.dpo import split_for_run

    train = split_for_run(cfg)["train"]
    sampler = StepSampler(len(train), args.batch_size, 1, 1, cfg.run.seed)
    order = torch.cat([sampler.global_indices(s) for s in range(args.steps)]).tolist()
    return [render_pair(train[i][1]) for i in order]


def lmforge_ids(texts):
    """Token ids lmforge feeds (prompt, chosen + eos, rejected + eos) for each pair."""
    from lmforge.interop.gguf import open_gguf, read_metadata, tokenizer_from_gguf
    from lmforge.tasks.dpo import tokenize_pair
    from lmforge.tasks.common import resolve_init_path

    tok = tokenizer_from_gguf(read_metadata(open_gguf(resolve_init_path(SMOLLM2_INIT))))
    return [tokenize_pair(tok, p, c, r, add_eos=True) for p, c, r in texts]


def token_count(ids, max_length: int) -> int:
    """Real tokens of the chosen and rejected rows (prompt + completion, cut at max_length)."""
    return sum(min(len(p) + len(c), max_length) + min(len(p) + len(r), max_length) for p, c, r in ids)


# ------------------------------------------------------------------------------ the two sides
def side_lmforge(args, work: Path) -> dict:
    from lmforge.tasks.run import run

    out = work / "lmforge"
    if out.exists():
        shutil.rmtree(out)
    cfg = lm_config(args, out)
    clock = lmforge_clock()
    t0 = time.perf_counter()
    run(cfg, progress=False, print_fn=(lambda *a, **k: None) if args.quiet else print, callbacks=[clock])
    m0 = clock.metrics[0]
    return {"wall_seconds": time.perf_counter() - t0, "step_seconds": clock.step_seconds(),
            "seconds_per_step": clock.seconds_per_step(args.warmup),
            "losses": [m["loss"] for m in clock.metrics],
            "step0": {"loss": m0["loss"], "logps/chosen": m0["logps/chosen"], "logps/rejected": m0["logps/rejected"]},
            "peak_rss_mb": peak_rss_mb()}


def side_trl(args, work: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = lm_config(args, work / "lmforge-config-only")
    texts = pairs_in_order(args, cfg)
    t0 = time.perf_counter()
    model, tok = hf_smollm2()
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in texts])
    targs = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=args.seed, bf16=False, fp16=False,
        gradient_checkpointing=False)  # TRL's default is True; lmforge recomputes nothing either
    clock = hf_clock()
    trainer = DPOTrainer(model=model, args=targs, processing_class=tok, train_dataset=data,
                         peft_config=peft_lora_config(), callbacks=[clock])
    ds = trainer.train_dataset
    theirs = list(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    ours = lmforge_ids(texts)
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if tuple(map(list, a)) != tuple(map(list, b))]
    if len(theirs) != len(ours):
        raise SystemExit(f"TRL kept {len(theirs)} of {len(ours)} pairs")
    setup = time.perf_counter() - t0
    trainer.train()
    m0 = clock.metrics[0]
    return {"wall_seconds": time.perf_counter() - t0, "setup_seconds": setup, "step_seconds": clock.step_seconds(),
            "seconds_per_step": clock.seconds_per_step(args.warmup),
            "losses": [m.get("loss") for m in clock.metrics],
            "step0": {"loss": m0["loss"], "logps/chosen": m0["logps/chosen"], "logps/rejected": m0["logps/rejected"]},
            "token_ids_mismatched_pairs": mismatched, "pairs": len(ours),
            "tokens": token_count(ours, args.max_length),
            "timed_tokens": token_count(ours[args.warmup * args.batch_size:], args.max_length),
            "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------ main
def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(args, lm: dict, hf: dict) -> dict:
    tokens = hf["timed_tokens"]  # the same pairs on both sides (checked token by token)
    timed = args.steps - args.warmup
    lm_tps = tokens / (lm["seconds_per_step"] * timed)
    hf_tps = tokens / (hf["seconds_per_step"] * timed)
    s0, t0 = lm["step0"], hf["step0"]
    return {
        "tokens_per_s": {"lmforge": lm_tps, "trl": hf_tps}, "speedup": lm_tps / hf_tps,
        "step0": {"lmforge": s0, "trl": t0, "ln2": math.log(2),
                  "rel_diff": {k: rel(s0[k], t0[k]) for k in s0}},
        "step0_agree": all(rel(s0[k], t0[k]) < 1e-3 for k in s0),
        "token_ids_identical": not hf["token_ids_mismatched_pairs"],
        "targets": {"speedup": 1.5, "step0_rel_diff": 1e-3},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="runs/bench/results")
    p.add_argument("--work-dir", default="runs/bench/trl_dpo")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--side", choices=["both", "lmforge", "trl"], default="both", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out, work = prepare(args.out_dir, args.work_dir, args.threads)
    work.mkdir(parents=True, exist_ok=True)
    if args.side != "both":
        r = (side_lmforge if args.side == "lmforge" else side_trl)(args, work)
        Path(args.result).write_text(json.dumps(r))
        return 0
    load = warn_if_busy()
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    lm = run_side(Path(__file__).resolve(), "lmforge", passed, work / "lmforge.json", args.threads)
    hf = run_side(Path(__file__).resolve(), "trl", passed, work / "trl.json", args.threads)
    result = {"lmforge": lm, "trl": hf, **compare(args, lm, hf),
              "settings": {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (fp32)", "lora": LORA, "data": DATA,
                           "steps": args.steps, "warmup_steps": args.warmup, "batch_size_pairs": args.batch_size,
                           "max_length": args.max_length, "beta": args.beta, "loss": "sigmoid", "lr": args.lr,
                           "schedule": "constant", "optimizer": "AdamW (0.9, 0.999), wd 0, clip 1.0",
                           "trl_gradient_checkpointing": False,
                           "threads": args.threads, "seed": args.seed, "device": "cpu"},
              "versions": versions(), "load_average_at_start": load, "load_average_at_end": load_average(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "trl_dpo.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    lm, hf, s0 = r["lmforge"], r["trl"], r["step0"]
    print("\n| DPO, SmolLM2-135M LoRA | lmforge | TRL DPOTrainer | ratio / agreement |\n|---|---|---|---|")
    print(f"| training tokens/s | {r['tokens_per_s']['lmforge']:.1f} | {r['tokens_per_s']['trl']:.1f} | "
          f"x{r['speedup']:.2f} (target >= x1.5) |")
    print(f"| s/step (steady) | {lm['seconds_per_step']:.2f} | {hf['seconds_per_step']:.2f} | |")
    for k in ("loss", "logps/chosen", "logps/rejected"):
        print(f"| step-0 {k} | {s0['lmforge'][k]:.5f} | {s0['trl'][k]:.5f} | rel diff {s0['rel_diff'][k]:.1e} |")
    print(f"| peak RSS | {lm['peak_rss_mb']:.0f} MB | {hf['peak_rss_mb']:.0f} MB | |")
    print(f"| token ids identical | | | {r['token_ids_identical']} ({len(hf['token_ids_mismatched_pairs'])} "
          f"of {hf['pairs']} pairs differ) |")
    print(f"| load average start / end | | | {r['load_average_at_start']} / {r['load_average_at_end']} |")


if __name__ == "__main__":
    sys.exit(main())
