"""The one training loop. It knows nothing about which objective it runs.

Per optimizer step: ``grad_accum`` micro-batches (each ``objective.loss(model, batch)``, scaled by
1/grad_accum so the sum equals the mean over the larger batch), gradient clipping, a skipped step
when the loss or gradient is not finite, AdamW, the schedule. Around it: evaluation, best and
periodic checkpoints, exact resume, SIGINT/SIGTERM handling, metrics and progress.

Data comes from a *batch source*: ``source.batch(step, micro) -> dict``, a pure function of the
step, so resuming at step N sees exactly the batches a straight run would.
"""

from __future__ import annotations

import contextlib
import random
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
import torch.nn as nn

from lmforge.config import TrainSection
from lmforge.errors import ConfigError, TrainingError
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, any_across, barrier, mean_across
from lmforge.train.logging import MetricsLogger, Progress, mfu
from lmforge.train.optim import make_optimizer, make_scheduler


class BatchSource(Protocol):
    def batch(self, step: int, micro: int) -> dict: ...


@dataclass
class FitResult:
    step: int
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step (main rank)
    evals: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    skipped_steps: int = 0
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, model: nn.Module, objective, train_data: BatchSource, cfg: TrainSection, *,
                 run_dir: str | Path, eval_data: Callable[[], Iterable[dict]] | None = None,
                 dist_info: DistInfo | None = None, tokenizer=None, run_config: dict | None = None,
                 flops_per_token: float | None = None, logger: MetricsLogger | None = None):
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.objective = objective
        self.train_data = train_data
        self.eval_data = eval_data
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = tokenizer
        self.run_config = run_config or {}
        self.flops_per_token = flops_per_token
        self.logger = logger or MetricsLogger(self.run_dir, is_main=self.dist.is_main)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision: fp16 with loss scaling needs a CUDA device; use fp32 or bf16")
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                        self.device.type)
        self.scheduler = make_scheduler(self.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                        max_steps=cfg.max_steps, schedule=cfg.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.policy = ckpt.CheckpointPolicy(cfg.checkpoint_every, cfg.checkpoint_every_hours, cfg.keep_last,
                                            cfg.best_metric, cfg.best_mode)
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped = 0
        self._stop_requested = False
        self._plotter: subprocess.Popen | None = None
        self.train_model = self._wrap(model)
        self._params = [p for p in model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------- setup
    def _wrap(self, model: nn.Module) -> nn.Module:
        m = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            m = DDP(m, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            m = torch.compile(m)
        return m

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _no_sync(self, last_micro: bool):
        ddp = self.train_model
        ddp = getattr(ddp, "_orig_mod", ddp)  # under torch.compile
        if self.dist.enabled and not last_micro:
            return ddp.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "policy": self.policy.state_dict(), "data": {"next_step": self.step},
                "nonfinite_in_row": self.nonfinite_in_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.policy.load_state_dict(state["policy"])
        self.nonfinite_in_row = state.get("nonfinite_in_row", 0)
        self.skipped = state.get("skipped", 0)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def resume(self, resume: str | None) -> Path | None:
        """Load the checkpoint ``resume`` names ("auto": newest valid one in the run folder)."""
        path = ckpt.resolve_resume(resume, self.run_dir)
        if path is None:
            return None
        c = ckpt.load_checkpoint(path)
        c.load_weights_into(self.model)
        self.load_state_dict(c.trainer_state)
        return path

    def save(self, name: str, metrics: dict | None = None) -> Path | None:
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, name, self.model, config=self.run_config,
                                        trainer_state=self.state_dict(), tokenizer=self.tokenizer,
                                        step=self.step, metrics=metrics or {})
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------------------- loop
    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics."""
        cfg = self.cfg
        self.train_model.train()
        accum = cfg.grad_accum
        total_loss = None
        tokens = 0
        extra: dict[str, float] = {}
        for micro in range(accum):
            batch = _to(self.train_data.batch(self.step, micro), self.device)
            tokens += self.objective.tokens_in(batch)
            with self._no_sync(micro == accum - 1), self._autocast():
                loss, metrics = self.objective.loss(self.train_model, batch)
            self.scaler.scale(loss / accum if accum > 1 else loss).backward()
            total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + v / accum
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        mean_loss = mean_across(total_loss / accum if accum > 1 else total_loss, self.dist)
        finite = bool(torch.isfinite(mean_loss + grad_norm))  # one check (and one sync) for both
        loss_ok = finite or bool(torch.isfinite(mean_loss))
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.scaler.step(self.optimizer)
            self.nonfinite_in_row = 0
        elif loss_ok and self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # fp16 overflow: the scaler skips the step and lowers its scale
            self.skipped += 1
        else:
            self.nonfinite_in_row += 1
            self.skipped += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.nonfinite_in_row >= cfg.max_nonfinite:
            raise TrainingError(f"loss or gradient was not finite for {self.nonfinite_in_row} steps in a row "
                                f"(step {self.step}); lower train.lr or check the data (train.max_nonfinite="
                                f"{cfg.max_nonfinite})")
        return {"loss": float(mean_loss), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": tokens * self.dist.world_size, "skipped": not finite, **extra}

    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        with self._autocast():
            m = self.objective.evaluate(self.model, (_to(b, self.device) for b in self.eval_data()))
        return {f"val_{k}": v for k, v in m.items()}

    def fit(self) -> FitResult:
        cfg = self.cfg
        result = FitResult(step=self.step)
        progress = Progress(cfg.max_steps, initial=self.step, disable=not cfg.progress, is_main=self.dist.is_main)
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._request_stop)
            except ValueError:  # not the main thread
                pass
        self.policy.mark_saved()
        tok_window, time_window, t_last = 0, 0.0, time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                m = self.train_step()
                now = time.perf_counter()
                tok_window += m["tokens"]
                time_window += now - t_last
                t_last = now
                tps = tok_window / max(time_window, 1e-9)
                util = mfu(self.flops_per_token, tps, self.device) if self.flops_per_token else None
                record = {k: v for k, v in m.items() if k not in ("tokens", "skipped")}
                record["tokens_per_s"] = tps
                result.history.append({"step": self.step, **record})
                progress.update(self.step, m["loss"], m["lr"], tps, util)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.logger.log(self.step, {**record, "mfu": util if util is not None else float("nan")})
                    tok_window, time_window = 0, 0.0
                last = self.step == cfg.max_steps
                if self.step % cfg.eval_every == 0 or last:
                    ev = self.evaluate()
                    if ev:
                        result.evals.append({"step": self.step, **ev})
                        self.logger.log(self.step, {k.removeprefix("val_"): v for k, v in ev.items()}, split="val")
                        progress.write(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                        self._plot()
                        if cfg.best_metric and cfg.best_metric in ev and self.policy.is_best(ev):
                            result.best_checkpoint = self.save("best", ev)
                saved_now = False
                if self.policy.due(self.step) or last:
                    result.last_checkpoint = self.save(ckpt.step_name(self.step), {"loss": m["loss"]})
                    self.policy.mark_saved(step=self.step)
                    saved_now = True
                    if self.dist.is_main:
                        self.policy.prune(self.ckpt_root)
                if any_across(self._stop_requested, self.dist) and not last:
                    if not saved_now:
                        result.last_checkpoint = self.save(ckpt.step_name(self.step), {"loss": m["loss"]})
                    progress.write(f"stop requested: saved {result.last_checkpoint} at step {self.step}")
                    result.stopped_early = True
                    break
                t_last = time.perf_counter()  # throughput counts training steps, not evals and saves
        finally:
            self._stop_plotter()
            progress.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.logger.close()
        result.step = self.step
        result.skipped_steps = self.skipped
        return result

    def _plot(self) -> None:
        """Ask a low-priority plotting process to redraw training_curves.png, so training neither
        waits for matplotlib nor shares its cores with it. The process starts once (matplotlib is
        imported once) and draws on each request; ``plot_curves`` draws the final version."""
        if not self.dist.is_main or not (self.run_dir / "metrics.jsonl").exists():
            return
        if self._plotter is None or self._plotter.poll() is not None:
            try:
                self._plotter = subprocess.Popen(
                    [sys.executable, "-m", "lmforge.inspect.plots", str(self.run_dir / "metrics.jsonl"),
                     str(self.run_dir / "training_curves.png")],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if hasattr(os, "setpriority"):
                    os.setpriority(os.PRIO_PROCESS, self._plotter.pid, 19)
            except OSError:
                self._plotter = None
                _plot_curves(self.run_dir)
                return
        try:
            self._plotter.stdin.write(b"redraw\n")
            self._plotter.stdin.flush()
        except OSError:  # the plotter died: the next evaluation starts another
            self._plotter = None

    def _stop_plotter(self) -> None:
        """End the plotter without waiting for queued redraws (SIGTERM: it removes any temporary
        file); ``plot_curves`` draws the final figure."""
        if self._plotter is None:
            return
        try:
            self._plotter.terminate()
            self._plotter.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._plotter.kill()
            self._plotter.wait()
        finally:
            if self._plotter.stdin:
                self._plotter.stdin.close()
        self._plotter = None

    def plot_curves(self) -> None:
        """Draw training_curves.png from everything logged so far (call after ``fit``: the
        redraws during training run in the background and the last one may not be done)."""
        if self.dist.is_main and (self.run_dir / "metrics.jsonl").exists():
            _plot_curves(self.run_dir)


def _plot_curves(run_dir: Path) -> None:
    from lmforge.inspect.plots import plot_training_curves

    try:
        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
    except Exception as e:  # a plot must never stop training
        print(f"warning: could not plot training curves: {e}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
