#!/usr/bin/env python
"""Tiny shakespeare in JAX beside PyTorch: ``configs/shakespeare-char.yaml`` through both trainers.

Two runs, one after the other in this process, of the same recipe (4 layers, 4 heads, width 128,
context 64, batch 12, AdamW (0.9, 0.99), wd 0.1, lr 1e-3 warmup 100 + cosine to 1e-4, clip 1.0,
fp32, 2000 iterations):

1. ``jax``     -- ``lmforge.tasks.run.run`` with ``train.backend: jax`` (``fit_jax``: one jit-compiled optax step);
2. ``pytorch`` -- ``lmforge.tasks.run.run`` (the PyTorch trainer).

Both start from the same weights (the JAX run converts the PyTorch initialisation) and draw the
same batches (same seeded window sampler), and both evaluate on the same validation windows
(first 20 batches of 12 non-overlapping 64-token windows). The target: JAX validation loss
<= 1.92 after the 2000 iterations.

Speed: tokens/s = training tokens / time inside the optimizer steps (batch sampling, forward,
backward, clipping, AdamW). PyTorch: ``Trainer.train_step`` timed from the outside. JAX: the
time between synchronisations around the queued steps, evaluation excluded; the first step,
which compiles, is reported apart (``compile_seconds``) and given both ways. torch uses
``--threads`` threads; XLA uses the machine's cores. On a shared machine absolute times are
noisy; the ratio from one run is the figure.

    python benchmarks/bench_jax_shakespeare.py               # the full recipe
    python benchmarks/bench_jax_shakespeare.py --steps 200   # a short check
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare, write_json  # noqa: E402

CONFIG = "configs/shakespeare-char.yaml"
TARGET_VAL_LOSS = 1.92


def _overrides(run_dir: Path, cache: Path, steps: int | None, eval_every: int | None) -> list[str]:
    over = [f"run.out_dir={run_dir}", f"data.cache_dir={cache}", "train.progress=false", "train.resume=never"]
    if steps:
        over.append(f"train.max_steps={steps}")
    if eval_every:
        over.append(f"train.eval_every={eval_every}")
    return over


def run_pytorch(cfg) -> dict:
    from lmforge.tasks.run import run as pretrain
    from lmforge.train.trainer import Trainer

    step_times: list[float] = []
    original = Trainer.train_step

    def timed(self):
        t0 = time.perf_counter()
        m = original(self)
        step_times.append(time.perf_counter() - t0)
        return m

    Trainer.train_step = timed
    try:
        t0 = time.perf_counter()
        s = pretrain(cfg, progress=False, print_fn=lambda *a, **k: None)
        wall = time.perf_counter() - t0
    finally:
        Trainer.train_step = original
    tokens = s["steps"] * cfg.train.batch_size * cfg.model_config(65).context_length
    return {"steps": s["steps"], "final_val_loss": s["final_eval"]["val_loss"], "evals": s["evals"],
            "step_seconds": sum(step_times), "tokens_per_s": tokens / sum(step_times),
            "first_step_seconds": step_times[0], "wall_seconds": wall, "sample": s.get("sample")}


def run_jax(cfg) -> dict:
    from lmforge.tasks.run import run  # train.backend: jax runs lmforge.jax.train.fit_jax

    t0 = time.perf_counter()
    s = run(cfg, progress=False, print_fn=lambda *a, **k: None)
    wall = time.perf_counter() - t0
    tokens = s["steps"] * cfg.train.batch_size * cfg.model_config(65).context_length
    with_compile = tokens / (s["train_step_seconds"] + s["compile_seconds"])
    return {"steps": s["steps"], "final_val_loss": s["final_eval"]["val_loss"], "evals": s["evals"],
            "step_seconds": s["train_step_seconds"], "tokens_per_s": s["tokens_per_s"],
            "tokens_per_s_with_compile": with_compile, "compile_seconds": s["compile_seconds"],
            "wall_seconds": wall, "sample": s.get("sample"), "last_checkpoint": s["last_checkpoint"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="iterations (default: the config's 2000)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluation cadence (default: the config's)")
    p.add_argument("--out-dir", default="runs/bench/results")
    p.add_argument("--work-dir", default="runs/bench-jax")
    p.add_argument("--json-name", default="jax_shakespeare.json", help="file name of the results in --out-dir")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--torch-steps", type=int, default=None,
                   help="iterations of the PyTorch run (default: the same as JAX); fewer gives a speed-only "
                        "comparison when the machine is too busy for two full runs")
    args = p.parse_args(argv)

    out_dir, work = prepare(args.out_dir, args.work_dir, args.threads)
    if work.exists():
        shutil.rmtree(work)
    import jax
    import torch

    from lmforge.tasks import load_config

    cache = work / "cache"
    cfg_t = load_config(CONFIG, _overrides(work / "pytorch", cache, args.torch_steps or args.steps, args.eval_every))
    cfg_j = load_config(CONFIG, _overrides(work / "jax", cache, args.steps, args.eval_every) + ["train.backend=jax"])
    full = cfg_j.train.max_steps == load_config(CONFIG).train.max_steps
    print(f"tiny shakespeare, {cfg_j.train.max_steps} steps (pytorch {cfg_t.train.max_steps}), torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    load_start = os.getloadavg()[0]
    runs = {"jax": run_jax(cfg_j)}
    print(f"jax:     val {runs['jax']['final_val_loss']:.4f}, {runs['jax']['tokens_per_s']:,.0f} tok/s "
          f"(compile {runs['jax']['compile_seconds']:.1f}s)", flush=True)
    runs["pytorch"] = run_pytorch(cfg_t)
    print(f"pytorch: val {runs['pytorch']['final_val_loss']:.4f}, {runs['pytorch']['tokens_per_s']:,.0f} tok/s",
          flush=True)

    j, t = runs["jax"], runs["pytorch"]
    checks = {
        "jax_val_loss": {"target": TARGET_VAL_LOSS, "value": j["final_val_loss"],
                         "pass": j["final_val_loss"] <= TARGET_VAL_LOSS if full else None},
        "val_loss_gap_jax_minus_pytorch": (j["final_val_loss"] - t["final_val_loss"]
                                           if t["steps"] == j["steps"] else None),
        "tokens_per_s_ratio_jax_over_pytorch": j["tokens_per_s"] / t["tokens_per_s"],
        "tokens_per_s_ratio_jax_with_compile_over_pytorch": j["tokens_per_s_with_compile"] / t["tokens_per_s"],
    }
    result = {"benchmark": "jax_shakespeare", "config": CONFIG, "steps": cfg_j.train.max_steps,
              "pytorch_steps": cfg_t.train.max_steps, "full_run": full,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
              "python": platform.python_version(), "cpu_count": os.cpu_count(), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg()[0], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "runs": runs, "checks": checks}
    path = out_dir / args.json_name
    write_json(path, result, default=str)

    print(f"\n{'run':<10}{'steps':>7}{'val loss':>10}{'step s':>9}{'tok/s':>10}")
    for name, r in runs.items():
        print(f"{name:<10}{r['steps']:>7}{r['final_val_loss']:>10.4f}{r['step_seconds']:>9.1f}{r['tokens_per_s']:>10,.0f}")
    verdict = {True: "PASS", False: "FAIL", None: "n/a (short run)"}
    print(f"\njax val loss {j['final_val_loss']:.4f} (target <= {TARGET_VAL_LOSS}) {verdict[checks['jax_val_loss']['pass']]}")
    print(f"tokens/s jax / pytorch: x{checks['tokens_per_s_ratio_jax_over_pytorch']:.3f} "
          f"(x{checks['tokens_per_s_ratio_jax_with_compile_over_pytorch']:.3f} counting the compile)")
    print(f"\n--- jax sample ---\n{j['sample']}\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
