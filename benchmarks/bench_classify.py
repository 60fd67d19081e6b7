"""Classification recipes, run for real on their catalog datasets (SMS spam, SST-2), and MiniLM fine-tuning side by side
with transformers' Trainer.

Parts (``--parts``, default all):

* ``spam``: ``spam-gpt-pretrain.yaml`` then ``spam-gpt.yaml`` (stratified 70/10/20 split):
  test accuracy, spam F1, wall time of both stages; then the same pretrained model on the
  balanced 747/747 protocol of the book's chapter 6 (``data.balance=true``).
* ``bert``: ``sst2-bert-mlm.yaml`` then ``sst2-bert.yaml``: SST-2 dev accuracy, wall time.
* ``minilm``: ``sst2-minilm.yaml`` (lmforge) and ``BertForSequenceClassification`` + ``Trainer``
  on the same weights, sentences, batch size, max length, learning rate, warmup and number of
  steps: training examples/s (training loop only) and dev accuracy of both.

Results: ``benchmarks/results/classify.json`` and a printed table. Each lmforge run's folder
(curves, confusion matrices, eval_report.json) stays under ``runs/bench/classify/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare  # noqa: E402

from lmforge.config import load_config  # noqa: E402
from lmforge.train.callbacks import Callback  # noqa: E402
from lmforge.tasks.run import run  # noqa: E402


class FitTimer(Callback):
    """Wall time of the training loop, without evaluations (examples/s of training alone)."""

    def __init__(self):
        self.step_seconds = 0.0
        self.eval_seconds = 0.0
        self.steps = 0
        self._t = None

    def on_step_start(self, trainer):
        self._t = time.perf_counter()

    def on_step_end(self, trainer, metrics):
        self.step_seconds += time.perf_counter() - self._t
        self.steps += 1


def lm_run(config: str, work: Path, name: str, overrides: list[str], quiet: bool) -> tuple[dict, FitTimer, float]:
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    cfg = load_config(config, [f"run.out_dir={out}", f"data.cache_dir={work / 'cache'}", *overrides])
    timer = FitTimer()
    t0 = time.perf_counter()
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(f"[{name}]", *a, **k, flush=True))
    summary = run(cfg, progress=False, print_fn=say, callbacks=[timer])
    return summary, timer, time.perf_counter() - t0


def report(summary: dict, split: str) -> dict:
    return (summary.get("reports") or {}).get(split) or {}


# ------------------------------------------------------------------------------ parts
def part_spam(work: Path, quiet: bool) -> dict:
    pre, _, t_pre = lm_run("configs/spam-gpt-pretrain.yaml", work, "spam-gpt-pretrain", [], quiet)
    init = f"model.init_from={work / 'spam-gpt-pretrain'}"
    cls, timer, t_cls = lm_run("configs/spam-gpt.yaml", work, "spam-gpt", [init], quiet)
    test = report(cls, "test")
    bal, _, t_bal = lm_run("configs/spam-gpt.yaml", work, "spam-gpt-balanced",
                           [init, "data.balance=true", "train.max_steps=300", "train.eval_every=50"], quiet)
    btest = report(bal, "test")
    return {
        "pretrain_seconds": t_pre, "pretrain_final_val_loss": (pre.get("final_eval") or {}).get("val_loss"),
        "classify_seconds": t_cls, "total_seconds": t_pre + t_cls,
        "test_accuracy": test.get("accuracy"), "spam_f1": test.get("per_class", {}).get("spam", {}).get("f1"),
        "test_examples": test.get("examples"), "test_confusion": test.get("confusion_matrix"),
        "val_accuracy": report(cls, "val").get("accuracy"),
        "balanced": {"seconds": t_bal, "test_accuracy": btest.get("accuracy"), "test_examples": btest.get("examples"),
                     "spam_f1": btest.get("per_class", {}).get("spam", {}).get("f1"),
                     "note": "pretraining saw the stratified split's training texts, which may include "
                             "messages of this protocol's test split (unlabelled)"},
        "targets": {"test_accuracy": 0.985, "spam_f1": 0.94, "total_seconds": 600},
    }


def part_bert(work: Path, quiet: bool) -> dict:
    pre, _, t_pre = lm_run("configs/sst2-bert-mlm.yaml", work, "sst2-bert-mlm", [], quiet)
    cls, timer, t_cls = lm_run("configs/sst2-bert.yaml", work, "sst2-bert",
                               [f"model.init_from={work / 'sst2-bert-mlm'}"], quiet)
    dev = report(cls, "val")
    return {"mlm_seconds": t_pre, "mlm_final_val_loss": (pre.get("final_eval") or {}).get("val_loss"),
            "classify_seconds": t_cls, "total_seconds": t_pre + t_cls, "dev_accuracy": dev.get("accuracy"),
            "dev_macro_f1": dev.get("macro_f1"), "targets": {"dev_accuracy": 0.82, "total_seconds": 1500}}


def hf_minilm(folder: Path, train_records: list[dict], dev_records: list[dict], cfg) -> dict:
    """transformers' BertForSequenceClassification + Trainer with the recipe's settings."""
    import numpy as np
    import torch
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    t = cfg.train
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2)
    model.config.hidden_dropout_prob = cfg.model.get("dropout", 0.1)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, recs):
            self.enc = tok([r["sentence"] for r in recs], truncation=True, max_length=cfg.objective.max_length)
            self.labels = [int(r["label"]) for r in recs]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                    "token_type_ids": self.enc["token_type_ids"][i], "labels": self.labels[i]}

    args = TrainingArguments(output_dir=str(Path("runs/bench/classify/hf-minilm")), per_device_train_batch_size=t.batch_size,
                             per_device_eval_batch_size=t.eval_batch_size, learning_rate=t.lr, weight_decay=t.weight_decay,
                             warmup_steps=t.warmup_steps, max_steps=t.max_steps, lr_scheduler_type="cosine",
                             adam_beta1=t.beta1, adam_beta2=t.beta2, max_grad_norm=t.grad_clip, logging_steps=50,
                             save_strategy="no", report_to=[], seed=cfg.run.seed, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(train_records),
                      data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    pred = trainer.predict(Rows(dev_records))
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"train_seconds": seconds, "examples_per_s": t.max_steps * t.batch_size / seconds,
            "hf_reported_samples_per_s": out.metrics.get("train_samples_per_second"), "dev_accuracy": acc}


def part_minilm(work: Path, quiet: bool) -> dict:
    from lmforge.data.sources import SourceSpec, iter_records
    from lmforge.tasks.common import package_path

    cfg = load_config("configs/sst2-minilm.yaml")
    folder = package_path(cfg.model["init_from"])
    src = cfg.data.sources[0]
    train_records = list(iter_records(SourceSpec(path=src.path, limit=src.limit)))
    dev_records = list(iter_records(SourceSpec(path=cfg.data.val_sources[0].path)))
    ours, timer, t_ours = lm_run("configs/sst2-minilm.yaml", work, "sst2-minilm", [], quiet)
    dev = report(ours, "val")
    ex = timer.steps * cfg.train.batch_size
    lm = {"wall_seconds": t_ours, "train_loop_seconds": timer.step_seconds,
          "examples_per_s": ex / timer.step_seconds, "dev_accuracy": dev.get("accuracy")}
    hf = hf_minilm(folder, train_records, dev_records, cfg)
    return {"lmforge": lm, "transformers": hf, "speedup_examples_per_s": lm["examples_per_s"] / hf["examples_per_s"],
            "accuracy_gap_points": 100 * (lm["dev_accuracy"] - hf["dev_accuracy"]),
            "examples": len(train_records), "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
            "max_length": cfg.objective.max_length,
            "targets": {"dev_accuracy": 0.88, "speedup": 1.3, "total_seconds": 1500}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="spam,bert,minilm")
    p.add_argument("--out-dir", default="runs/bench/results")
    p.add_argument("--work-dir", default="runs/bench/classify")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out, work = prepare(args.out_dir, args.work_dir, args.threads)
    path = out / "classify.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for part in args.parts.split(","):
        fn = {"spam": part_spam, "bert": part_bert, "minilm": part_minilm}[part]
        print(f"== {part}", flush=True)
        r = fn(work, args.quiet)
        r["load_average_at_start"] = load
        r["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results[part] = r
        path.write_text(json.dumps(results, indent=2))
        print(json.dumps(r, indent=2), flush=True)
    print_table(results)
    return 0


def print_table(r: dict) -> None:
    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    print("\n| recipe | metric | value | target |\n|---|---|---|---|")
    if "spam" in r:
        s = r["spam"]
        print(f"| spam-gpt | test accuracy | {f(s['test_accuracy'])} | >= 0.985 |")
        print(f"| spam-gpt | spam F1 | {f(s['spam_f1'])} | >= 0.94 |")
        print(f"| spam-gpt | wall time (both stages) | {f(s['total_seconds'], '.0f')} s | <= 600 s |")
        print(f"| spam-gpt balanced 747/747 | test accuracy | {f(s['balanced']['test_accuracy'])} | (book: 0.9567) |")
    if "bert" in r:
        b = r["bert"]
        print(f"| sst2-bert | dev accuracy | {f(b['dev_accuracy'])} | >= 0.82 |")
        print(f"| sst2-bert | wall time (both stages) | {f(b['total_seconds'], '.0f')} s | <= 1500 s |")
    if "minilm" in r:
        m = r["minilm"]
        print(f"| sst2-minilm | dev accuracy lmforge / transformers | {f(m['lmforge']['dev_accuracy'])} / "
              f"{f(m['transformers']['dev_accuracy'])} | >= 0.88, within 1 point |")
        print(f"| sst2-minilm | train examples/s lmforge / transformers | {f(m['lmforge']['examples_per_s'], '.1f')} / "
              f"{f(m['transformers']['examples_per_s'], '.1f')} = x{f(m['speedup_examples_per_s'], '.2f')} | >= x1.3 |")
        print(f"| sst2-minilm | lmforge wall time | {f(m['lmforge']['wall_seconds'], '.0f')} s | <= 1500 s |")


if __name__ == "__main__":
    sys.exit(main())
