"""GPU paths on a CUDA machine: fp32 / bf16 autocast / fp16 + loss scaling, with and without
torch.compile, through the real `pretrain` pipeline; checks the flash SDPA kernel accepts our
causal attention, and that generation works in bf16. Prints a table and writes JSON.

    python benchmarks/gpu_check.py [--steps 60] [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch


def flash_check() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.model import build

    model = build({"preset": "llama-small", "vocab_size": 512}).cuda().to(torch.bfloat16)
    x = torch.randint(0, 512, (4, 512), device="cuda")
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend), torch.no_grad():
                y = model(x)
            out[name] = bool(torch.isfinite(y.float()).all())
        except RuntimeError as e:
            out[name] = f"failed: {str(e).splitlines()[0][:100]}"
    with torch.no_grad():
        ref = model.float()(x)
        with sdpa_kernel(SDPBackend.MATH):
            math_out = model(x)
    out["fp32_math_vs_default_maxdiff"] = float((ref - math_out).abs().max())
    return out


def train_run(precision: str, compile_: bool, steps: int, root: Path) -> dict:
    from lmforge.tasks import config_from_dict
    from lmforge.tasks.run import run as pretrain

    cfg = config_from_dict({
        "run": {"out_dir": str(root / f"{precision}-{int(compile_)}"), "seed": 0, "device": "cuda"},
        "model": {"preset": "llama-small", "vocab_size": None, "context_length": 256},
        "tokenizer": {"kind": "byte"},
        "data": {"sources": [{"path": "builtin:stories", "num_docs": 3000}], "val_fraction": 0.05,
                 "cache_dir": str(root / "cache")},
        "train": {"max_steps": steps, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10, "precision": precision,
                  "compile": compile_, "eval_every": steps, "eval_batches": 5, "checkpoint_every": None,
                  "progress": False, "log_every": 10},
        "sample": {"max_new_tokens": 0},
    })
    t0 = time.time()
    s = pretrain(cfg, progress=False, print_fn=lambda *a, **k: None)
    hist = s["history"]
    tail = hist[len(hist) // 2:]  # after compile warm-up
    tps = sum(h["tokens_per_s"] for h in tail) / len(tail)
    return {"precision": precision, "compile": compile_, "steps": s["steps"], "first_loss": hist[0]["loss"],
            "final_loss": hist[-1]["loss"], "val_loss": s["final_eval"]["val_loss"], "tokens_per_s": tps,
            "skipped": s["skipped_steps"], "wall_s": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/bench/results/gpu_check.json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flash": flash_check(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16", "fp16"):
            for compile_ in (False, True):
                r = train_run(precision, compile_, args.steps, Path(tmp))
                result["runs"].append(r)
                print(f"{precision:5s} compile={compile_!s:5s} loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} "
                      f"val {r['val_loss']:.3f}  {r['tokens_per_s']:,.0f} tok/s  skipped {r['skipped']}  "
                      f"({r['wall_s']:.0f}s)", flush=True)
    from lmforge.generate import generate
    from lmforge.model import build

    m = build({"preset": "llama-small", "vocab_size": 512}).cuda().to(torch.bfloat16)
    a = generate(m, [1, 2, 3], max_new_tokens=64, temperature=0)
    b = generate(m, [1, 2, 3], max_new_tokens=64, temperature=0, use_cache=False)
    result["bf16_generate_cached_equals_uncached_tokens"] = sum(x == y for x, y in zip(a, b)) / len(a)
    print("flash:", result["flash"])
    print("bf16 generate cached==uncached token share:", result["bf16_generate_cached_equals_uncached_tokens"])
    ok = all(math.isfinite(r["final_loss"]) and r["final_loss"] < r["first_loss"] for r in result["runs"])
    result["all_runs_learn"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("all runs learn:", ok)


if __name__ == "__main__":
    main()
