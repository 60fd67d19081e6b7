#!/usr/bin/env python
"""Tiny-shakespeare benchmark: lmforge's classic recipe against a plain reference loop, then the
modern recipe on the same wall-clock budget.

Three runs, one after another in this process (torch threads: 2, the reference machine's cores;
``--threads`` changes it):

1. ``reference`` -- a plain, self-contained GPT and training loop written in this file in the
   classic nanoGPT style (4 layers, 4 heads, width 128, context 64, batch 12, no bias, no
   dropout, AdamW (0.9, 0.99), weight decay 0.1 on 2-D parameters, lr 1e-3 with 100 warmup
   steps and cosine decay to 1e-4, grad clip 1.0, fp32, char vocabulary from the text, 90/10
   split). It does not import lmforge.
2. ``classic`` -- ``configs/shakespeare-char.yaml`` through ``lmforge.tasks.run.run``.
   The issue's target: validation loss <= 1.90 after its 2000 iterations.
3. ``modern`` -- ``configs/shakespeare-char-modern.yaml`` (RoPE, RMSNorm, SwiGLU, its own lr)
   given the wall-clock time the classic lmforge run's training loop took (see "budget" below).

Timing is identical for all runs: *train loop* is the wall time of the whole training loop
(steps + periodic evaluation + whatever else the loop does: lmforge's metrics, plots,
checkpoints); *step time* is the time inside the optimizer steps only (batch sampling, forward,
backward, clipping, AdamW); tokens/s = tokens trained / step time. For lmforge these timers wrap
``Trainer.fit``, ``Trainer.train_step`` and ``Trainer.evaluate`` from the outside (no lmforge
code is changed). *End to end* adds data preparation (tokenizer, token store; the store cache is
cleared at the start so the first lmforge run builds it, as the reference encodes its text) and
model setup. The process CPU time of each training loop is recorded too: on a machine shared with
other work it is steadier than wall time (with 2 threads on 2 busy cores, wall times can be
several times longer than on a quiet machine; the script warns when the load average is high).

Evaluation is the same for all runs:

* periodic (every 250 steps and at the last step): lmforge's protocol, also implemented in the
  reference loop -- the first 20 batches of 12 non-overlapping 64-token windows from the start
  of the validation split, token-weighted mean loss. (lmforge's char tokenizer appends one eos
  to the single document, so its 90% cut lands one character later than the reference's
  ``int(0.9 * len(text))``; the windows are shifted by that one character.)
* final "full" validation loss: computed by this file with one function for every model, on the
  exact same text (the part of the text that is in every run's validation split) and the exact
  same 200 random batches of 12 windows (fixed seed).

Budget for the modern run: a cosine schedule must know its length, so stopping a run early by
time alone would leave it at a high learning rate. Instead, right before the modern run, both
lmforge recipes are probed for a few dozen steps, interleaved (``--probe-steps``), which gives
the per-step time ratio modern/classic under the machine's current load; the modern run gets
``max_steps = floor(classic_steps * classic_step_time / modern_step_time * 0.98)``, so its
schedule completes in about the classic run's train-loop time. A hard wall-clock guard also
stops it (through the trainer's own stop request, as SIGINT would) if its train loop reaches the
classic run's train-loop time; the JSON records whether that guard fired.

Outputs (``--out-dir``, default ``benchmarks/results``): ``shakespeare.json`` (everything
below), ``shakespeare_curves.png`` (validation loss against train-loop wall time for every run).
lmforge run folders (checkpoints, metrics.jsonl) go to ``--work-dir`` (default
``runs/bench``, git-ignored) and are wiped at the start of each run.

Run from anywhere (the script changes to the repository root, where the configs' relative data
paths resolve)::

    .venv/bin/python benchmarks/bench_shakespeare.py                 # full benchmark
    .venv/bin/python benchmarks/bench_shakespeare.py --steps 100 --eval-every 25   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import prepare, write_json
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import lmforge  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(REPO / "src"))

from lmforge.tasks import load_config
from lmforge.data import catalog
from lmforge.train.trainer import Trainer

CLASSIC_CONFIG = "configs/shakespeare-char.yaml"
MODERN_CONFIG = "configs/shakespeare-char-modern.yaml"
TEXT = "catalog:tinyshakespeare"  # the recipes' data (lmforge data list)
TARGET_VAL_LOSS = 1.90
FULL_EVAL_BATCHES, FULL_EVAL_BATCH_SIZE, FULL_EVAL_SEED = 200, 12, 1234
STEP_BUDGET_SAFETY = 0.98
THREADS = 2  # the reference machine: 2 CPU cores


# ============================================================================ shared evaluation
@torch.no_grad()
def full_val_loss(model: nn.Module, ids: torch.Tensor, context: int, batches: int = FULL_EVAL_BATCHES,
                  batch_size: int = FULL_EVAL_BATCH_SIZE, seed: int = FULL_EVAL_SEED) -> float:
    """Mean next-token loss of ``model(ids (B, T)) -> logits (B, T, V)`` over ``batches`` batches
    of random windows of ``ids``; window starts come from a generator seeded with ``seed``, so
    every model is scored on the same windows (ids of char-level tokenizers align 1:1)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(batches):
        starts = torch.randint(0, len(ids) - context, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(context + 1)[None, :]
        w = ids[idx]
        logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1)))
    model.train(was_training)
    return total / batches


# ============================================================================ reference model
class RefAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefMLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class RefBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = RefAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = RefMLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    """The classic GPT-2 layout: token + learned position embeddings, pre-LN blocks, final LN,
    language-model head tied to the token embedding."""

    def __init__(self, vocab_size: int, context: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        self.blocks = nn.ModuleList(RefBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def ref_lr(it: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if it < warmup:
        return lr * (it + 1) / warmup
    if total <= warmup:
        return lr
    ratio = min(1.0, (it - warmup) / (total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def run_reference(text: str, steps: int, eval_every: int, eval_batches: int, seed: int, log_every: int) -> dict:
    """The plain loop. Hyperparameters are written out here on purpose (they are the recipe)."""
    context, batch_size, n_layer, n_head, n_embd = 64, 12, 4, 4, 128
    lr, min_lr, warmup, weight_decay, betas, grad_clip = 1e-3, 1e-4, 100, 0.1, (0.9, 0.99), 1.0

    t_start = time.perf_counter()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]

    torch.manual_seed(seed)
    model = RefGPT(len(chars), context, n_layer, n_head, n_embd)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    n_params = sum(p.numel() for p in params)
    print(f"[reference] {n_params:,} parameters, vocab {len(chars)}, train {len(train_data):,} / "
          f"val {len(val_data):,} chars", flush=True)

    def get_batch():
        ix = torch.randint(len(train_data) - context, (batch_size,))
        x = torch.stack([train_data[i:i + context] for i in ix])
        y = torch.stack([train_data[i + 1:i + 1 + context] for i in ix])
        return x, y

    @torch.no_grad()
    def evaluate():  # lmforge's protocol: first eval_batches batches of non-overlapping windows
        model.eval()
        total, count = 0.0, 0
        starts = list(range(0, len(val_data) - context, context))[:eval_batches * batch_size]
        for b in range(0, len(starts), batch_size):
            s = torch.tensor(starts[b:b + batch_size])
            idx = s[:, None] + torch.arange(context + 1)[None, :]
            w = val_data[idx]
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            total += float(loss) * w[:, 1:].numel()
            count += w[:, 1:].numel()
        model.train()
        return total / count

    ckpt_dir = tempfile.mkdtemp(prefix="ref-ckpt-")
    ckpt_path, best_val = os.path.join(ckpt_dir, "ckpt.pt"), float("inf")
    setup_seconds = time.perf_counter() - t_start
    history, evals, step_seconds, eval_seconds = [], [], [], []
    model.train()
    t_loop, c_loop = time.perf_counter(), time.process_time()
    for it in range(steps):
        t0 = time.perf_counter()
        cur_lr = ref_lr(it, lr, min_lr, warmup, steps)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        x, y = get_batch()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_value = loss.item()
        t1 = time.perf_counter()
        step_seconds.append(t1 - t0)
        step = it + 1
        history.append({"step": step, "loss": loss_value, "lr": cur_lr})
        if step % log_every == 0 or step == steps:
            recent = step_seconds[-log_every:]
            print(f"[reference] step {step}/{steps} loss {loss_value:.4f} lr {cur_lr:.2e} "
                  f"{1000 * statistics.median(recent):.1f} ms/step", flush=True)
        if step % eval_every == 0 or step == steps:
            e0 = time.perf_counter()
            val = evaluate()
            if val < best_val:  # like nanoGPT's train.py: save model + optimizer when val improves
                best_val = val
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": step,
                            "best_val_loss": val}, ckpt_path)
            e1 = time.perf_counter()
            eval_seconds.append(e1 - e0)
            evals.append({"step": step, "val_loss": val, "wall_s": e1 - t_loop})
            print(f"[reference] step {step}: val_loss {val:.4f}", flush=True)
    loop_seconds = time.perf_counter() - t_loop
    loop_cpu_seconds = time.process_time() - c_loop
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {
        "model": model, "val_text": text[n:], "encode": lambda s: torch.tensor([stoi[c] for c in s]),
        "summary": {
            "name": "reference", "label": "plain reference loop", "steps": steps, "params": n_params,
            "vocab_size": len(chars), "tokens_per_step": batch_size * context,
            "setup_seconds": setup_seconds, "train_loop_seconds": loop_seconds,
            "train_loop_cpu_seconds": loop_cpu_seconds,
            "end_to_end_seconds": setup_seconds + loop_seconds,
            **_step_stats(step_seconds, batch_size * context), "eval_seconds": sum(eval_seconds),
            "evals": evals, "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "final_train_loss": history[-1]["loss"] if history else None,
            "history_loss_every_10": [h["loss"] for h in history[9::10]],
        },
    }


def _step_stats(step_seconds: list[float], tokens_per_step: int) -> dict:
    n = len(step_seconds)
    total = sum(step_seconds)
    return {"step_seconds_total": total, "step_ms_median": 1000 * statistics.median(step_seconds) if n else None,
            "step_ms_mean": 1000 * total / n if n else None,
            "tokens_per_s": n * tokens_per_step / total if total > 0 else None,
            "tokens_per_s_median_step": tokens_per_step / statistics.median(step_seconds) if n else None}


# ============================================================================ lmforge runs
class TrainerTimer:
    """Times lmforge's Trainer from the outside while active: the whole ``fit``, each
    ``train_step`` and each ``evaluate``; keeps the trainer (for its final model). With
    ``time_limit`` (seconds of train loop) it asks the trainer to stop, as SIGINT would."""

    def __init__(self, time_limit: float | None = None):
        self.time_limit = time_limit
        self.step_seconds: list[float] = []
        self.evals: list[dict] = []
        self.eval_seconds: list[float] = []
        self.fit_start: float | None = None
        self.fit_seconds: float | None = None
        self.fit_cpu_seconds: float | None = None
        self.trainer: Trainer | None = None
        self.stopped_by_time = False

    def __enter__(self) -> TrainerTimer:
        self._orig = (Trainer.fit, Trainer.train_step, Trainer.evaluate)
        orig_fit, orig_step, orig_eval = self._orig
        timer = self

        def fit(trainer):
            timer.trainer = trainer
            timer.fit_start = time.perf_counter()
            c0 = time.process_time()
            try:
                return orig_fit(trainer)
            finally:
                timer.fit_seconds = time.perf_counter() - timer.fit_start
                timer.fit_cpu_seconds = time.process_time() - c0

        def train_step(trainer):
            t0 = time.perf_counter()
            metrics = orig_step(trainer)
            t1 = time.perf_counter()
            timer.step_seconds.append(t1 - t0)
            if (timer.time_limit is not None and not timer.stopped_by_time
                    and t1 - timer.fit_start >= timer.time_limit and trainer.step < trainer.cfg.max_steps):
                timer.stopped_by_time = True
                trainer._request_stop(None, None)  # what the SIGINT/SIGTERM handler does
            return metrics

        def evaluate(trainer):
            t0 = time.perf_counter()
            ev = orig_eval(trainer)
            t1 = time.perf_counter()
            timer.eval_seconds.append(t1 - t0)
            if ev:
                timer.evals.append({"step": trainer.step, "val_loss": ev.get("val_loss"),
                                    "val_ppl": ev.get("val_ppl"), "wall_s": t1 - timer.fit_start})
            return ev

        Trainer.fit, Trainer.train_step, Trainer.evaluate = fit, train_step, evaluate
        return self

    def __exit__(self, *exc) -> None:
        Trainer.fit, Trainer.train_step, Trainer.evaluate = self._orig


def _maybe_silent(quiet: bool):
    """Silence lmforge's progress lines (stderr) for probe runs."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()


def lmforge_config(path: str, work_dir: Path, name: str, overrides: list[str]):
    run_dir = work_dir / name
    cfg = load_config(path, [f"run.out_dir={run_dir}", f"data.cache_dir={work_dir / 'cache'}",
                             "train.resume=never", *overrides])
    return cfg, run_dir


def run_lmforge(name: str, label: str, config_path: str, work_dir: Path, overrides: list[str],
                time_limit: float | None = None, quiet: bool = False) -> dict:
    from lmforge.tasks.run import run as pretrain

    cfg, run_dir = lmforge_config(config_path, work_dir, name, overrides)
    if run_dir.exists():  # metrics.jsonl appends and tokenizer.json is reused: start clean
        shutil.rmtree(run_dir)
    if not quiet:
        print(f"[{name}] {config_path} {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    with TrainerTimer(time_limit) as timer, _maybe_silent(quiet):
        summary = pretrain(cfg, progress=False, print_fn=(lambda *a, **k: None) if quiet else
                           (lambda *a, **k: print(f"[{name}]", *a, **k, flush=True)))
    # pretrain's own wall time: config to the end of training, without the final sample
    end_to_end = summary.get("wall_seconds") or (time.perf_counter() - t0)
    trainer = timer.trainer
    model = trainer.model
    last_eval_step = timer.evals[-1]["step"] if timer.evals else None
    post_hoc = None
    if last_eval_step != trainer.step:  # stopped by the time guard: score the final model too
        ev = Trainer.evaluate(trainer)  # (timer no longer active: not counted in the loop time)
        post_hoc = {"step": trainer.step, "val_loss": ev.get("val_loss"), "val_ppl": ev.get("val_ppl")}
    final_val = post_hoc["val_loss"] if post_hoc else (timer.evals[-1]["val_loss"] if timer.evals else None)
    context = cfg.model_config(vocab_size=trainer.tokenizer.vocab_size).context_length
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * context
    mcfg = model.config
    return {
        "model": model, "tokenizer": trainer.tokenizer, "cfg": cfg, "context": context,
        "summary": {
            "name": name, "label": label, "config": config_path, "overrides": overrides,
            "steps": trainer.step, "max_steps": cfg.train.max_steps,
            "params": sum(p.numel() for p in model.parameters()), "vocab_size": mcfg.vocab_size,
            "model": {k: getattr(mcfg, k) for k in ("n_layer", "n_head", "n_embd", "mlp_hidden", "activation",
                                                   "norm", "positional", "bias", "tie_embeddings")},
            "train": {k: getattr(cfg.train, k) for k in ("batch_size", "lr", "min_lr", "warmup_steps",
                                                        "beta1", "beta2", "weight_decay", "grad_clip")},
            "tokens_per_step": tokens_per_step,
            "setup_seconds": timer.fit_start - t0 if timer.fit_start else None,
            "train_loop_seconds": timer.fit_seconds, "train_loop_cpu_seconds": timer.fit_cpu_seconds,
            "end_to_end_seconds": end_to_end,
            **_step_stats(timer.step_seconds, tokens_per_step), "eval_seconds": sum(timer.eval_seconds),
            "loop_overhead_seconds": timer.fit_seconds - sum(timer.step_seconds) - sum(timer.eval_seconds),
            "evals": timer.evals, "post_hoc_eval": post_hoc, "final_val_loss": final_val,
            "final_train_loss": summary.get("final_loss"), "time_limit_s": time_limit,
            "stopped_by_time_guard": timer.stopped_by_time, "sample": summary.get("sample"),
            "history_loss_every_10": [h["loss"] for h in summary.get("history", [])[9::10]],
        },
    }


def probe_step_times(work_dir: Path, steps: int, classic_overrides: list[str], modern_overrides: list[str],
                     rounds: int = 2) -> dict:
    """Median step time of each lmforge recipe, measured in interleaved short runs."""
    times: dict[str, list[float]] = {"classic": [], "modern": []}
    skip = min(10, steps // 3)  # the first steps warm up allocators and caches
    for r in range(rounds):
        for name, path, extra in (("classic", CLASSIC_CONFIG, classic_overrides),
                                  ("modern", MODERN_CONFIG, modern_overrides)):
            cfg_over = [*extra, f"train.max_steps={steps}", f"train.eval_every={10 * steps}",
                        "train.checkpoint_every=null", "train.best_metric=null", "sample.max_new_tokens=0",
                        "train.progress=false"]
            cfg, run_dir = lmforge_config(path, work_dir, f"probe-{name}", cfg_over)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            from lmforge.tasks.run import run as pretrain

            with TrainerTimer() as timer, _maybe_silent(True):
                pretrain(cfg, progress=False, print_fn=lambda *a, **k: None)
            times[name] += timer.step_seconds[skip:]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"steps_per_probe": steps, "rounds": rounds, "classic_step_ms": 1000 * med["classic"],
            "modern_step_ms": 1000 * med["modern"], "ratio_modern_over_classic": med["modern"] / med["classic"]}


# ============================================================================ report
def fmt(x, spec=".4f", none="-"):
    return none if x is None else format(x, spec)


def print_table(runs: list[dict]) -> None:
    head = (f"{'run':<26}{'steps':>6}{'loop s':>9}{'cpu s':>9}{'e2e s':>9}{'ms/step':>9}{'tok/s':>9}"
            f"{'val@last':>10}{'full val':>10}")
    print(head)
    print("-" * len(head))
    for r in runs:
        print(f"{r['label']:<26}{r['steps']:>6}{fmt(r['train_loop_seconds'], '.1f'):>9}"
              f"{fmt(r.get('train_loop_cpu_seconds'), '.1f'):>9}"
              f"{fmt(r['end_to_end_seconds'], '.1f'):>9}{fmt(r['step_ms_median'], '.2f'):>9}"
              f"{fmt(r['tokens_per_s'], ',.0f'):>9}{fmt(r['final_val_loss']):>10}{fmt(r.get('full_val_loss')):>10}")


def print_evals(runs: list[dict]) -> None:
    steps = sorted({e["step"] for r in runs for e in r["evals"]})
    if not steps:
        return
    print("\nvalidation loss (periodic eval; wall time since the training loop began)")
    print(f"{'step':>6}" + "".join(f"{r['label'][:24]:>26}" for r in runs))
    for s in steps:
        cells = []
        for r in runs:
            e = next((e for e in r["evals"] if e["step"] == s), None)
            cells.append(f"{e['val_loss']:.4f} @ {e['wall_s']:6.1f}s" if e else "")
        print(f"{s:>6}" + "".join(f"{c:>26}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="iterations of the classic and reference runs (default: the config's 2000)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluation cadence (default: the config's 250)")
    p.add_argument("--skip-reference", action="store_true", help="do not run the plain reference loop")
    p.add_argument("--skip-modern", action="store_true", help="do not run the modern recipe")
    p.add_argument("--out-dir", default="runs/bench/results", help="where the JSON and PNG go")
    p.add_argument("--work-dir", default="runs/bench", help="lmforge run folders and token cache (git-ignored)")
    p.add_argument("--probe-steps", type=int, default=40, help="steps per probe run when sizing the modern run")
    p.add_argument("--modern-steps", type=int, default=None,
                   help="fix the modern run's max_steps instead of sizing it from the probe")
    p.add_argument("--speed-tolerance", type=float, default=0.02,
                   help="'not slower' passes when lmforge tokens/s >= reference * (1 - this); measurement noise")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads (default 2, the benchmark's setting; 1 is steadier on a busy machine)")
    p.add_argument("--modern-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the modern recipe (repeatable), for tuning experiments")
    args = p.parse_args(argv)

    out_dir, work_dir = prepare(args.out_dir, args.work_dir, args.threads)
    if (work_dir / "cache").exists():  # every run builds its token store: end-to-end times compare
        shutil.rmtree(work_dir / "cache")
    work_dir.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    if load_start is not None and load_start > 0.5:
        print(f"WARNING: 1-minute load average is {load_start:.2f} on {os.cpu_count()} CPUs before starting; "
              f"other work on the machine makes the timings unreliable", flush=True)

    base = load_config(CLASSIC_CONFIG)
    steps = args.steps or base.train.max_steps
    eval_every = args.eval_every or base.train.eval_every
    seed = base.run.seed
    full_run = steps == base.train.max_steps
    common = [f"train.max_steps={steps}", f"train.eval_every={eval_every}"]
    print(f"tiny shakespeare benchmark: {steps} steps, eval every {eval_every}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs" + ("" if full_run else "  [SHORT RUN]"),
          flush=True)

    text = catalog.resolve(TEXT).read_text(encoding="utf-8")
    results: dict = {"benchmark": "shakespeare", "steps": steps, "eval_every": eval_every, "full_run": full_run,
                     "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_start": load_start,
                     "torch": torch.__version__,
                     "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "full_eval": {"batches": FULL_EVAL_BATCHES, "batch_size": FULL_EVAL_BATCH_SIZE,
                                   "seed": FULL_EVAL_SEED}}
    runs: dict[str, dict] = {}

    # 1. classic lmforge recipe
    runs["classic"] = run_lmforge("classic", "lmforge classic", CLASSIC_CONFIG, work_dir, common)
    # 2. plain reference loop
    if not args.skip_reference:
        runs["reference"] = run_reference(text, steps, eval_every, base.train.eval_batches, seed,
                                          log_every=max(1, min(250, steps // 4)))
    # 3. modern recipe on the classic run's train-loop time
    if not args.skip_modern:
        budget = runs["classic"]["summary"]["train_loop_seconds"]
        modern_over = [f"train.eval_every={eval_every}", *args.modern_override]
        if args.modern_steps:
            modern_steps, probe = args.modern_steps, None
        else:
            probe = probe_step_times(work_dir, args.probe_steps, [], modern_over)
            modern_steps = max(1, int(steps / probe["ratio_modern_over_classic"] * STEP_BUDGET_SAFETY))
            print(f"[probe] classic {probe['classic_step_ms']:.2f} ms/step, modern {probe['modern_step_ms']:.2f} "
                  f"ms/step -> modern max_steps {modern_steps} for a {budget:.1f}s budget", flush=True)
        results["modern_budget"] = {"budget_seconds": budget, "modern_max_steps": modern_steps, "probe": probe,
                                    "safety": STEP_BUDGET_SAFETY}
        runs["modern"] = run_lmforge("modern", "lmforge modern", MODERN_CONFIG, work_dir,
                                     [f"train.max_steps={modern_steps}", *modern_over], time_limit=budget)

    # final "full" validation loss: same text, same windows, for every model
    classic = runs["classic"]
    store_val_text = _lmforge_val_text(classic)
    texts = [store_val_text] + ([runs["reference"]["val_text"]] if "reference" in runs else [])
    common_val = min(texts, key=len)
    assert all(t.endswith(common_val) for t in texts), "validation splits are not suffixes of one text"
    results["full_eval"]["chars"] = len(common_val)
    for name, r in runs.items():
        if name == "reference":
            ids = r["encode"](common_val)
        else:
            ids = torch.tensor(r["tokenizer"].encode(common_val), dtype=torch.long)
        r["summary"]["full_val_loss"] = full_val_loss(r["model"], ids, 64)

    order = [k for k in ("reference", "classic", "modern") if k in runs]
    summaries = [runs[k]["summary"] for k in order]
    results["runs"] = {k: runs[k]["summary"] for k in order}

    # comparisons and checks
    checks: dict = {}
    c = classic["summary"]
    checks["classic_val_loss"] = {
        "target": TARGET_VAL_LOSS, "val_loss_at_last_step": c["final_val_loss"], "full_val_loss": c["full_val_loss"],
        "pass": (c["final_val_loss"] is not None and c["final_val_loss"] <= TARGET_VAL_LOSS) if full_run else None,
        "note": None if full_run else "short run: the target applies to the recipe's 2000 steps"}
    if "reference" in runs:
        r = runs["reference"]["summary"]
        ratio_tps = c["tokens_per_s"] / r["tokens_per_s"]
        ratio_loop = c["train_loop_seconds"] / r["train_loop_seconds"]
        checks["speed_vs_reference"] = {
            "train_loop_time_ratio_lmforge_over_reference": ratio_loop,
            "train_loop_cpu_time_ratio_lmforge_over_reference":
                c["train_loop_cpu_seconds"] / r["train_loop_cpu_seconds"],
            "end_to_end_time_ratio_lmforge_over_reference": c["end_to_end_seconds"] / r["end_to_end_seconds"],
            "tokens_per_s_ratio_lmforge_over_reference": ratio_tps,
            "median_step_tokens_per_s_ratio": c["tokens_per_s_median_step"] / r["tokens_per_s_median_step"],
            "tolerance": args.speed_tolerance,
            "pass_tokens_per_s": ratio_tps >= 1.0 - args.speed_tolerance,
            "pass_train_loop_time": ratio_loop <= 1.0 + args.speed_tolerance,
            "val_loss_gap_lmforge_minus_reference_full": c["full_val_loss"] - r["full_val_loss"]}
    if "modern" in runs:
        m = runs["modern"]["summary"]
        checks["modern_vs_classic_same_wall_clock"] = {
            "classic_train_loop_seconds": c["train_loop_seconds"], "modern_train_loop_seconds": m["train_loop_seconds"],
            "modern_steps": m["steps"], "stopped_by_time_guard": m["stopped_by_time_guard"],
            "classic_val_loss": c["final_val_loss"], "modern_val_loss": m["final_val_loss"],
            "classic_full_val_loss": c["full_val_loss"], "modern_full_val_loss": m["full_val_loss"],
            "pass": (m["full_val_loss"] < c["full_val_loss"] and m["final_val_loss"] < c["final_val_loss"]
                     and m["train_loop_seconds"] <= c["train_loop_seconds"] * 1.01)}
    results["checks"] = checks
    results["loadavg_end"] = _loadavg()

    # curves: validation loss against train-loop wall time
    from lmforge.inspect.plots import plot_loss_comparison

    curves = {f"{s['label']} ({s['steps']} steps)": [(e["wall_s"], e["val_loss"]) for e in s["evals"]]
              for s in summaries}
    png = plot_loss_comparison(curves, out_dir / "shakespeare_curves.png", xlabel="train-loop wall time (s)",
                               ylabel="validation loss (20 x 12 x 64 tokens)",
                               title=f"tiny shakespeare, {args.threads} CPU thread(s)")
    results["curves_png"] = str(png)
    json_path = out_dir / "shakespeare.json"
    write_json(json_path, results, default=str)

    print()
    print_table(summaries)
    print_evals(summaries)
    print()
    cv = checks["classic_val_loss"]
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    print(f"classic val loss at step {c['steps']}: {fmt(cv['val_loss_at_last_step'])} "
          f"(target <= {TARGET_VAL_LOSS}) {verdict[cv['pass']]}" + (f"  [{cv['note']}]" if cv["note"] else ""))
    if "speed_vs_reference" in checks:
        s = checks["speed_vs_reference"]
        print(f"lmforge / reference: tokens/s x{s['tokens_per_s_ratio_lmforge_over_reference']:.3f} "
              f"(median step x{s['median_step_tokens_per_s_ratio']:.3f}) -> {verdict[s['pass_tokens_per_s']]}; "
              f"train-loop wall time x{s['train_loop_time_ratio_lmforge_over_reference']:.3f} "
              f"(cpu x{s['train_loop_cpu_time_ratio_lmforge_over_reference']:.3f}) -> "
              f"{verdict[s['pass_train_loop_time']]}; end-to-end x{s['end_to_end_time_ratio_lmforge_over_reference']:.3f}"
              f"  [pass = within {100 * s['tolerance']:.0f}% of the reference or better]")
    if "modern_vs_classic_same_wall_clock" in checks:
        s = checks["modern_vs_classic_same_wall_clock"]
        print(f"modern vs classic on the same wall clock: {s['modern_steps']} steps in "
              f"{s['modern_train_loop_seconds']:.1f}s vs {s['classic_train_loop_seconds']:.1f}s; val "
              f"{fmt(s['modern_val_loss'])} vs {fmt(s['classic_val_loss'])}, full val {fmt(s['modern_full_val_loss'])} vs "
              f"{fmt(s['classic_full_val_loss'])}" + (" [time guard fired]" if s["stopped_by_time_guard"] else "")
              + f" -> {verdict[s['pass']]}")
    for s in summaries:
        if s.get("sample"):
            print(f"\n--- {s['label']} sample ---\n{s['sample']}")
    print(f"\nwrote {json_path}\nwrote {png}")
    return 0


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _lmforge_val_text(run: dict) -> str:
    """The validation split of an lmforge run as text (its token store, decoded)."""
    from lmforge.train.distributed import DistInfo
    from lmforge.tasks.lm import build_token_store

    store = build_token_store(run["cfg"], run["tokenizer"], DistInfo(), progress=False)  # cached
    return run["tokenizer"].decode(store.val.tolist(), skip_special_tokens=True)


if __name__ == "__main__":
    raise SystemExit(main())
