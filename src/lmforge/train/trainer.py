"""The one training loop. It knows nothing about which objective it runs.

Per optimizer step: ``grad_accum`` micro-batches, each ``objective.loss(model, batch)`` (the mean
over that micro-batch's targets) weighted by its share of the step's targets across all
micro-batches and ranks, so the step's loss is the mean over the global batch however padding or
masked labels fall; gradient clipping, a skipped step when the loss or gradient is not finite,
AdamW, the schedule. Around it: evaluation, best and periodic checkpoints, exact resume,
SIGINT/SIGTERM handling, metrics and progress; callbacks (``lmforge.train.callbacks``) for the
rest (curve plots, timers).

Data comes from a *batch source*: ``source.batch(step, micro) -> dict``, a pure function of the
step, so resuming at step N sees exactly the batches a straight run would.
"""

from __future__ import annotations

import contextlib
import random
import signal
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
from lmforge.train.distributed import DistInfo, any_across, barrier, max_across, sum_across
from lmforge.train.logging import PROGRESS_EXTRAS, MetricsLogger, Progress, mfu
from lmforge.train.optim import make_optimizer, make_scheduler


class BatchSource(Protocol):
    def batch(self, step: int, micro: int) -> dict: ...


@dataclass
class FitResult:
    step: int
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step (main rank)
    evals: list[dict] = field(default_factory=list)
    stopped_early: bool = False  # a stop was requested (SIGINT/SIGTERM, a callback): resume continues the run
    early_stopped: bool = False  # train.patience evaluations passed without a new best: the run is done
    skipped_steps: int = 0
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def metrics_across(metrics: dict[str, float], dist) -> dict[str, float]:
    """An objective's step metrics over all ranks (each rank's is a mean over its micro-batches):
    the mean of the ranks' values, the maximum for ``*_max`` keys. One or two all-reduces."""
    if not dist.enabled or not metrics:
        return metrics
    keys = sorted(metrics)  # every rank's objective returns the same keys
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)  # (K,)
    means = sum_across(values, dist).cpu() / dist.world_size
    out = dict(zip(keys, means.tolist()))
    peaks = [k for k in keys if k.endswith("_max")]
    if peaks:
        out.update(zip(peaks, max_across(torch.tensor([metrics[k] for k in peaks], dtype=torch.float64), dist).tolist()))
    return out


class Trainer:
    def __init__(self, model: nn.Module, objective, train_data: BatchSource, cfg: TrainSection, *,
                 run_dir: str | Path, eval_data: Callable[[], Iterable[dict]] | None = None,
                 dist_info: DistInfo | None = None, tokenizer=None, run_config: dict | None = None,
                 flops_per_token: float | None = None, logger: MetricsLogger | None = None,
                 callbacks: list | None = None, evaluate: Callable[[nn.Module, Iterable[dict]], dict] | None = None):
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.objective = objective
        self.objective.setup(self.model, self.device)
        self.callbacks = list(callbacks or [])
        self.train_data = train_data
        self.eval_data = eval_data
        self.evaluate_batches = evaluate or objective.evaluate  # (model, batches) -> validation metrics
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
        self.evals_since_best = 0  # evaluations since best_metric last improved (train.patience)
        self.skipped = 0
        self._stop_requested = False
        self._best_checked = False
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
                "nonfinite_in_row": self.nonfinite_in_row, "skipped": self.skipped,
                "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.policy.load_state_dict(state["policy"])
        self.nonfinite_in_row = state.get("nonfinite_in_row", 0)
        self.skipped = state.get("skipped", 0)
        self.evals_since_best = state.get("evals_since_best", 0)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def resume(self, resume: str | None) -> Path | None:
        """Load the checkpoint ``resume`` names ("auto": newest valid one in the run folder)."""
        path = ckpt.resolve_resume(resume, self.run_dir)  # verifies the checksums
        if path is None:
            return None
        c = ckpt.load_checkpoint(path, verified=True)
        c.load_weights_into(self.model)
        self.load_state_dict(c.trainer_state)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Load weights and trainer state from a checkpoint whose checksums were just verified."""
        c = ckpt.load_checkpoint(path, verified=True)
        c.load_weights_into(self.model)
        self.load_state_dict(c.trainer_state)

    def save(self, name: str, metrics: dict | None = None) -> Path | None:
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, name, self.model, config=self.run_config,
                                        trainer_state=self.state_dict(), tokenizer=self.tokenizer,
                                        step=self.step, metrics=metrics or {})
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------------------- loop
    def request_stop(self) -> None:
        """End the run at the next step boundary, with a checkpoint (what SIGINT/SIGTERM do)."""
        self._stop_requested = True

    def _request_stop(self, signum, frame):
        self.request_stop()

    def _callback(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics.

        Each micro-batch's mean loss is weighted by n_micro / N, where N counts the targets of the
        whole step on every rank, so the gradient is that of the mean over the global batch (DDP
        averages gradients over ranks, hence the factor world_size).
        """
        cfg = self.cfg
        self.train_model.train()
        accum = cfg.grad_accum
        batches = [_to(self.train_data.batch(self.step, micro), self.device) for micro in range(accum)]
        counts = [float(self.objective.targets_in(b)) for b in batches]
        total_targets = float(sum_across(torch.tensor(sum(counts), dtype=torch.float64), self.dist))
        world = self.dist.world_size
        total_loss = torch.zeros((), device=self.device)
        tokens = 0
        extra: dict[str, float] = {}
        for micro, batch in enumerate(batches):
            tokens += self.objective.tokens_in(batch)
            share = counts[micro] / total_targets if total_targets > 0 else 0.0  # this micro-batch's weight
            with self._no_sync(micro == accum - 1), self._autocast():
                loss, metrics = self.objective.loss(self.train_model, batch)
            self.scaler.scale(loss * (share * world)).backward()
            total_loss = total_loss + loss.detach().float() * share
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + v / accum
        extra = metrics_across(extra, self.dist)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        mean_loss = sum_across(total_loss, self.dist)  # the shares of all ranks add up to 1
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
            m = self.evaluate_batches(self.model, (_to(b, self.device) for b in self.eval_data()))
        ev = {f"val_{k}": v for k, v in m.items()}
        self._check_best_metric(ev)
        return ev

    def _check_best_metric(self, ev: dict) -> None:
        """``train.best_metric`` must name a metric the evaluation returns (checked on the first one)."""
        if self._best_checked or not ev:
            return
        self._best_checked = True
        name = self.cfg.best_metric
        if name and name not in ev:
            raise ConfigError(f"train.best_metric: got {name!r}, but the evaluation returns "
                              f"{', '.join(sorted(ev))}; expected one of those (or null)")

    def _evaluate_and_log(self, result: FitResult, progress) -> dict:
        """Evaluate now: the metrics go to the result, metrics.jsonl, the progress line and callbacks."""
        ev = self.evaluate()
        if ev:
            result.evals.append({"step": self.step, **ev})
            self.logger.log(self.step, {k.removeprefix("val_"): v for k, v in ev.items()}, split="val")
            progress.write(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            self._callback("on_evaluate", ev)
        return ev

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
        self._callback("on_fit_start")
        tok_window, time_window, t_last = 0, 0.0, time.perf_counter()
        try:
            if cfg.eval_at_start and self.step == 0:  # the "before" figures (not a best checkpoint)
                self._evaluate_and_log(result, progress)
                t_last = time.perf_counter()
            while self.step < cfg.max_steps:
                self._callback("on_step_start")
                m = self.train_step()
                self._callback("on_step_end", m)
                now = time.perf_counter()
                tok_window += m["tokens"]
                time_window += now - t_last
                t_last = now
                tps = tok_window / max(time_window, 1e-9)
                util = mfu(self.flops_per_token, tps, self.device) if self.flops_per_token else None
                record = {k: v for k, v in m.items() if k not in ("tokens", "skipped")}
                record["tokens_per_s"] = tps
                result.history.append({"step": self.step, **record})
                progress.update(self.step, m["loss"], m["lr"], tps, util,
                                **{k: m[k] for k in PROGRESS_EXTRAS if k in m})  # e.g. GRPO's reward
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.logger.log(self.step, {**record, "mfu": util if util is not None else float("nan")})
                    tok_window, time_window = 0, 0.0
                last = self.step == cfg.max_steps
                out_of_patience = False
                if self.step % cfg.eval_every == 0 or last:
                    ev = self._evaluate_and_log(result, progress)
                    if ev and cfg.best_metric and cfg.best_metric in ev:
                        if self.policy.is_best(ev):
                            result.best_checkpoint = self.save("best", ev)
                            self.evals_since_best = 0
                        else:
                            self.evals_since_best += 1
                        out_of_patience = bool(cfg.patience) and self.evals_since_best >= cfg.patience
                saved_now = False
                if self.policy.due(self.step) or last:
                    result.last_checkpoint = self.save(ckpt.step_name(self.step), {"loss": m["loss"]})
                    self.policy.mark_saved(step=self.step)
                    saved_now = True
                    if self.dist.is_main:
                        self.policy.prune(self.ckpt_root)
                if out_of_patience and not last:  # every rank saw the same evaluation: they stop together
                    if not saved_now:
                        result.last_checkpoint = self.save(ckpt.step_name(self.step), {"loss": m["loss"]})
                    progress.write(f"early stopping at step {self.step}: no better {cfg.best_metric} in "
                                   f"{cfg.patience} evaluations (train.patience); the best is kept in checkpoints/best")
                    result.early_stopped = True
                    break
                if any_across(self._stop_requested, self.dist) and not last:
                    if not saved_now:
                        result.last_checkpoint = self.save(ckpt.step_name(self.step), {"loss": m["loss"]})
                    progress.write(f"stop requested: saved {result.last_checkpoint} at step {self.step}")
                    result.stopped_early = True
                    break
                t_last = time.perf_counter()  # throughput counts training steps, not evals and saves
        finally:
            progress.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.logger.close()
            result.step = self.step
            result.skipped_steps = self.skipped
            self._callback("on_fit_end", result)
        return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
