#!/usr/bin/env python
"""fp32 linear layers on this CPU: PyTorch's ``F.linear`` (MKL) beside oneDNN with a packed copy
of the weight (``lmforge.model.packed``), for the shapes lmforge generates and trains with.

* ``smollm2 pass``: one pass over SmolLM2-135M's 121 linear weights as lmforge holds them (30
  layers of fused q/k/v, o, fused gate/up, down, then the 49,152 x 576 LM head), each called
  once, so that each weight is read from memory as in a real forward pass, at 1 row (decoding one
  token), 8 rows (a GRPO rollout batch) and 512 rows (a prompt). Random weights of the real shapes.
* ``square n``: a pass over 64 different n x n weights (cold, as above) at 1 row, for the size
  below which packing does not pay (``lmforge.model.packed.MIN_ELEMENTS``).

Three kernels: ``F.linear``; oneDNN with the weight packed for 1 input row; and packed for
``PACK_ROWS`` rows (what lmforge uses: the 1-row layout streams slower, even for one row). Each
figure is the median of ``--rounds`` passes, the kernels interleaved in one process; the largest
|difference| between F.linear's and lmforge's packed outputs is reported as well. Results:
``benchmarks/results/packed_linear.json`` and a printed table.

    .venv/bin/python benchmarks/bench_packed_linear.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare  # noqa: E402

from lmforge.model.packed import PACK_ROWS  # noqa: E402

SMOLLM2 = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def _pass_ms(fns, xs) -> float:
    t = time.perf_counter()
    for f, x in zip(fns, xs):
        f(x)
    return (time.perf_counter() - t) * 1000


def compare(shapes, rows: int, rounds: int) -> dict:
    """Median ms per pass over ``shapes`` for each kernel, and the largest F.linear/packed difference."""
    torch.manual_seed(0)
    ws = [torch.randn(o, i) / i ** 0.5 for o, i in shapes]
    xs = [torch.randn(rows, i) for _, i in shapes]

    def onednn(hint):
        packs = [torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in ws]
        return [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packs]

    with torch.inference_mode():
        kernels = {"linear": [lambda x, w=w: F.linear(x, w) for w in ws], "packed_1": onednn(1),
                   "packed": onednn(PACK_ROWS)}
        diff = max((kernels["linear"][k](xs[k]) - kernels["packed"][k](xs[k])).abs().max().item()
                   for k in range(min(len(ws), 8)))
        times = {name: [] for name in kernels}
        for fns in kernels.values():
            _pass_ms(fns, xs)  # warm-up
        for r in range(rounds):  # interleaved, order reversed every other round
            for name, fns in list(kernels.items())[:: 1 if r % 2 == 0 else -1]:
                times[name].append(_pass_ms(fns, xs))
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"rows": rows, "linear_ms": ms["linear"], "packed_1_row_ms": ms["packed_1"], "packed_ms": ms["packed"],
            "speedup": ms["linear"] / ms["packed"], "speedup_1_row_layout": ms["linear"] / ms["packed_1"],
            "max_abs_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/bench/results")
    args = ap.parse_args()
    out, _ = prepare(args.out_dir, "runs/bench", args.threads)
    results = []
    for rows in (1, 8, 512):
        results.append({"case": "smollm2 pass", **compare(SMOLLM2, rows, args.rounds)})
    for n in (64, 128, 192, 256, 384, 576):
        results.append({"case": f"square {n}", "elements": n * n, **compare([(n, n)] * 64, 1, args.rounds)})
    print(f"{'case':<14} {'rows':>5} {'F.linear ms':>12} {'packed(1) ms':>13} {f'packed({PACK_ROWS}) ms':>13} "
          f"{'speedup':>8} {'max |diff|':>11}")
    for r in results:
        print(f"{r['case']:<14} {r['rows']:>5} {r['linear_ms']:>12.2f} {r['packed_1_row_ms']:>13.2f} "
              f"{r['packed_ms']:>13.2f} {r['speedup']:>7.2f}x {r['max_abs_diff']:>11.2e}")
    path = out / "packed_linear.json"
    path.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
                                "pack_rows": PACK_ROWS, "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
