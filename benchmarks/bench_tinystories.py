#!/usr/bin/env python
"""TinyStories, scaled to a 2-core CPU: ``configs/tinystories.yaml`` on the local TinyStories
subset, with overrides that fit a few minutes of training.

What runs: the real recipe file (``configs/tinystories.yaml``: byte-level BPE trained on the
data, the ``small`` GPT-2-style model -- 4 layers, 4 heads, width 128, context 256, GELU,
dropout 0.1, tied embeddings -- AdamW (0.9, 0.95), cosine schedule) through
``lmforge.tasks.run.run``. The overrides (printed, and stored in the JSON) only scale
it down and point it at local files:

* data: ``catalog:tinystories-train-subset`` (~200 stories) then
  ``catalog:tinystories-valid-subset`` (~900 stories), ~1 MB. These files
  do not mark story boundaries, so each file is one document and lmforge's 90/10 split cuts the
  token stream: validation is the last 10% of the tokens, i.e. roughly the last 100 stories of
  TinyStories' own validation split, a contiguous block no training window overlaps (only the
  story straddling the cut is shared). Splitting by paragraph (``doc_separator: "\\n\\n"``)
  would put paragraphs of the same story on both sides and an end-of-text token after every
  paragraph, so it is not used.
* tokenizer: BPE with 2,048 tokens (8,000 in the recipe is far too many for ~1 MB of text).
* train: ``--steps`` (default 800) steps of 16 windows x 256 tokens, no gradient accumulation,
  lr 1e-3 -> 1e-4 with 50 warmup steps (the recipe's 3e-4 and 500 warmup steps suit its 10k-step
  run with 16x accumulation, not a few hundred steps), evaluation every ``--eval-every`` steps
  on the whole validation split.

Outputs (``--out-dir``, default ``benchmarks/results``): ``tinystories.json`` (config
overrides, data and model sizes, the evaluation table, timings, the sample) and
``tinystories_curves.png`` (lmforge's ``training_curves.png`` of the run). The run folder
(``--work-dir``/tinystories, default ``runs/bench/tinystories``, git-ignored) is wiped first.

    .venv/bin/python benchmarks/bench_tinystories.py             # ~5-8 minutes on 2 quiet cores
    .venv/bin/python benchmarks/bench_tinystories.py --steps 100 --eval-every 25   # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from _common import prepare, write_json

REPO = Path(__file__).resolve().parents[1]
try:
    import lmforge  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(REPO / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shakespeare import TrainerTimer  # noqa: E402  (times Trainer.fit/train_step/evaluate)
from lmforge.tasks import load_config
from lmforge.data import catalog

CONFIG = "configs/tinystories.yaml"
TRAIN_DATA = ("catalog:tinystories-train-subset", "catalog:tinystories-valid-subset")  # lmforge data list
THREADS = 2


def overrides(work_dir: Path, steps: int, eval_every: int, vocab_size: int, context: int, batch_size: int) -> list[str]:
    sources = ", ".join(f"{{path: {name}}}" for name in TRAIN_DATA)
    return [
        f"run.out_dir={work_dir / 'tinystories'}",
        f"data.cache_dir={work_dir / 'cache'}",
        f"data.sources=[{sources}]",
        "data.val_sources=null",
        "data.val_fraction=0.1",
        f"tokenizer.vocab_size={vocab_size}",
        f"model.context_length={context}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch_size}",
        "train.grad_accum=1",
        "train.lr=1.0e-3",
        "train.min_lr=1.0e-4",
        f"train.warmup_steps={min(50, max(1, steps // 10))}",
        f"train.eval_every={eval_every}",
        "train.eval_batches=1000",  # the whole validation split
        "train.log_every=10",
        f"train.checkpoint_every={steps}",
        "train.checkpoint_every_hours=null",
        "train.keep_last=1",
        "train.resume=never",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluation cadence (default: steps / 8)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (default 2048)")
    p.add_argument("--context", type=int, default=256, help="context length (default 256, the preset's)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (default 2)")
    p.add_argument("--out-dir", default="runs/bench/results", help="where the JSON and PNG go")
    p.add_argument("--work-dir", default="runs/bench", help="run folder and token cache (git-ignored)")
    args = p.parse_args(argv)

    out_dir, work_dir = prepare(args.out_dir, args.work_dir, args.threads)
    run_dir = work_dir / "tinystories"
    if run_dir.exists():  # a fresh run: metrics.jsonl appends, tokenizer.json would be reused
        shutil.rmtree(run_dir)
    eval_every = args.eval_every or max(1, args.steps // 8)
    over = overrides(work_dir, args.steps, eval_every, args.vocab_size, args.context, args.batch_size)
    cfg = load_config(CONFIG, over)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_start is not None and load_start > 0.5:
        print(f"WARNING: 1-minute load average is {load_start:.2f} on {os.cpu_count()} CPUs before starting; "
              f"timings will be slower than on a quiet machine", flush=True)
    print(f"TinyStories benchmark: {CONFIG} with overrides\n  " + "\n  ".join(over), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)

    from lmforge.train.distributed import DistInfo
    from lmforge.tasks.lm import build_token_store
    from lmforge.tasks.run import run as pretrain

    t0 = time.perf_counter()
    with TrainerTimer() as timer:  # times Trainer.fit / evaluate from outside (see bench_shakespeare.py)
        summary = pretrain(cfg, progress=False)
    wall = time.perf_counter() - t0

    trainer = timer.trainer
    meta = build_token_store(cfg, trainer.tokenizer, DistInfo(), progress=False).meta  # the cached store
    mcfg = trainer.model.config
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * mcfg.context_length
    steps_done = summary["steps"]
    loop_seconds = timer.fit_seconds
    evals = [{"step": e["step"], "val_loss": e["val_loss"], "val_ppl": e["val_ppl"], "wall_s": t["wall_s"]}
             for e, t in zip(summary["evals"], timer.evals)]
    ppls = [e["val_ppl"] for e in evals]
    falling = len(ppls) >= 2 and ppls[-1] < ppls[0]
    monotone = all(b <= a for a, b in zip(ppls, ppls[1:]))
    best = min(evals, key=lambda e: e["val_loss"]) if evals else None
    model_facts = {k: getattr(mcfg, k) for k in ("n_layer", "n_head", "n_embd", "context_length", "vocab_size",
                                                 "activation", "dropout", "positional", "tie_embeddings")}
    model_facts["params"] = sum(p.numel() for p in trainer.model.parameters())
    model_facts["uniform_loss"] = math.log(mcfg.vocab_size)

    png_src = run_dir / "training_curves.png"
    png = out_dir / "tinystories_curves.png"
    if png_src.is_file():
        shutil.copyfile(png_src, png)
    results = {
        "benchmark": "tinystories", "config": CONFIG, "overrides": over, "steps": steps_done,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "data": {k: meta.get(k) for k in ("train_tokens", "val_tokens", "split", "split_note", "vocab_size")},
        "train_chars": sum(catalog.get(name).size for name in TRAIN_DATA),  # bytes, as before
        "model": model_facts,
        "tokens_per_step": tokens_per_step,
        "epochs": steps_done * tokens_per_step / meta["train_tokens"] if meta.get("train_tokens") else None,
        "wall_seconds_end_to_end": wall, "train_loop_seconds": loop_seconds,
        "tokens_per_s": steps_done * tokens_per_step / loop_seconds if loop_seconds else None,
        "step_seconds_total": sum(timer.step_seconds), "eval_seconds": sum(timer.eval_seconds),
        "evals": evals, "val_ppl_falling": falling, "val_ppl_monotone": monotone,
        "best_eval": best, "final_eval": evals[-1] if evals else None,
        "final_train_loss": summary.get("final_loss"), "sample": summary.get("sample"),
        "curves_png": str(png) if png.is_file() else None,
        "train_loss_every_10": [h["loss"] for h in summary.get("history", [])[9::10]],
    }
    json_path = out_dir / "tinystories.json"
    write_json(json_path, results, default=str)

    d = results["data"]
    print(f"\ndata: {d['train_tokens']:,} train / {d['val_tokens']:,} val tokens (BPE {d['vocab_size']}), "
          f"split: {d['split_note']}")
    m = results["model"]
    print(f"model: {m['params']:,} parameters, {m['n_layer']} layers x {m['n_embd']} wide, context {m['context_length']}; "
          f"{steps_done} steps x {tokens_per_step:,} tokens = {results['epochs']:.1f} epochs")
    print(f"time: {fmt(loop_seconds, '.1f')} s training loop, {wall:.1f} s end to end, "
          f"{fmt(results['tokens_per_s'], ',.0f')} tokens/s")
    print(f"\n{'step':>6}{'val loss':>10}{'val ppl':>10}{'wall s':>9}")
    for e in evals:
        print(f"{e['step']:>6}{e['val_loss']:>10.4f}{e['val_ppl']:>10.2f}{fmt(e['wall_s'], '.1f'):>9}")
    print(f"\nvalidation perplexity {'fell' if falling else 'did NOT fall'}: {ppls[0]:.2f} -> {ppls[-1]:.2f}"
          + ("" if monotone else " (not monotone: it rose at some evaluation)") if ppls else "no evaluations")
    if results["sample"]:
        print(f"\n--- sample ({cfg.sample.max_new_tokens} tokens max, temperature {cfg.sample.temperature}, "
              f"top-k {cfg.sample.top_k}) ---\n{results['sample']}\n---")
    print(f"\nwrote {json_path}" + (f"\nwrote {png}" if png.is_file() else ""))
    return 0


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


if __name__ == "__main__":
    raise SystemExit(main())
