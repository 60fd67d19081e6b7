"""The one run function: any task, end to end.

``run(cfg)`` is what ``lmforge train`` (alias ``pretrain``) runs:

    task builder (lmforge.tasks)  -> model, tokenizer, objective, batch sources
    run folder                    -> config.yaml (once), run_info.json, metrics.jsonl
    Trainer (the one loop)        -> checkpoints, resume, evaluation, callbacks (curves)
    task finish                   -> sample / test reports with the best checkpoint
    summary                       -> returned (and printed by the CLI)

Nothing here knows which task it runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lmforge.config import RunConfig, save_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.fsutil import atomic_write, is_disk_full, one_line
from lmforge.inspect.curves import CurvePlotter
from lmforge.inspect.report import log_sample, report_after_run
from lmforge.perf import fit_threads_to_load, format_flops, measured_matmul_flops
from lmforge.store import read_config
from lmforge.tasks import get_task
from lmforge.tasks.common import TaskContext
from lmforge.tasks.lm import prepare_lm_data
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, barrier, setup, teardown
from lmforge.train.freeze import apply_trainable
from lmforge.train.logging import MetricsLogger, peak_flops, save_run_info, truncate_metrics
from lmforge.train.trainer import FitResult, Trainer, seed_everything


def run(cfg: RunConfig, *, progress: bool = True, print_fn=print, callbacks: list | None = None) -> dict:
    """Train as ``cfg`` says; returns a summary (steps, last losses, checkpoint paths, task results)."""
    if cfg.train.backend == "jax":  # the JAX twin of the trainer (causal LM on one process)
        if cfg.task != "pretrain":
            raise ConfigError(f"train.backend: jax trains task: pretrain only; got task: {cfg.task} "
                              f"(use train.backend=torch)")
        return _run_jax(cfg, progress, print_fn)
    dist = setup(cfg.run.device)
    threads = torch.get_num_threads()  # _run may lower it on a busy machine: for this run only
    try:
        summary = _run(cfg, dist, progress, print_fn if dist.is_main else (lambda *a, **k: None), callbacks or [])
        barrier(dist)  # rank 0 still plots and samples: leave the process group together (gloo aborts otherwise)
        return summary
    finally:
        teardown()
        torch.set_num_threads(threads)


def _run_jax(cfg: RunConfig, progress: bool, say) -> dict:
    """A whole JAX run: the same tokenizer and token store as a PyTorch run, then ``fit_jax``."""
    from lmforge.jax.train import fit_jax  # the optional extra: imported only for backend=jax

    ctx = TaskContext(cfg=cfg, run_dir=Path(cfg.run.out_dir), dist=DistInfo(), progress=progress, say=say)
    tokenizer, store = prepare_lm_data(ctx)
    say(f"data: {store}")
    save_config(cfg, Path(cfg.run.out_dir) / "config.yaml")
    return fit_jax(cfg, tokenizer, store, cfg.run.out_dir, say)


def _prepare_folder(cfg: RunConfig, run_dir: Path, resume_from: Path | None, dist: DistInfo) -> None:
    """A fresh run never mixes with an earlier one in the same folder: the old metrics and
    checkpoints are set aside (renamed with a time stamp, and said so); a resumed run drops the
    metric rows past its checkpoint's step (they are re-run)."""
    if not dist.is_main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            old = run_dir / "metrics.jsonl"
            if old.exists():
                old.rename(run_dir / f"metrics.{stamp}.jsonl")
            ckpts = run_dir / "checkpoints"
            if ckpts.is_dir() and any(ckpts.iterdir()):
                aside = run_dir / f"checkpoints.{stamp}"
                ckpts.rename(aside)
                print(f"note: {run_dir} held checkpoints of an earlier run; moved them to {aside} "
                      f"(train.resume=auto continues a run instead)")
        else:
            truncate_metrics(run_dir / "metrics.jsonl", ckpt.verify_checkpoint(resume_from, checksums=False)["step"])
        save_run_info(run_dir, cfg.to_dict())  # config.yaml (written once, here) + run_info.json
    except OSError as e:
        if is_disk_full(e):
            raise CheckpointError(f"disk full while preparing run folder {run_dir}: {one_line(e)}; "
                                  f"free some space and run again (nothing was lost)") from None
        raise CheckpointError(f"cannot write to run folder {run_dir}: {one_line(e)}") from None


def _run(cfg: RunConfig, dist: DistInfo, progress: bool, say, callbacks: list) -> dict:
    t_start = time.time()
    run_dir = Path(cfg.run.out_dir)
    if dist.device.type == "cpu" and not dist.enabled:  # busy shared cores: one thread, said with the override
        fit_threads_to_load(say)
    seed_everything(cfg.run.seed)
    task = get_task(cfg.task)
    ctx = TaskContext(cfg=cfg, run_dir=run_dir, dist=dist, progress=progress, say=say)
    parts = task.build(ctx)
    if cfg.model.get("lora"):  # the adapters (and a new head) train; the base is frozen
        total = sum(p.numel() for p in parts.model.parameters())
        trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
    else:
        trainable, total = apply_trainable(parts.model, cfg.train.trainable)
    for line in parts.describe:
        say(line)
    if trainable != total:
        why = "LoRA adapters, base frozen" if cfg.model.get("lora") else f"train.trainable={cfg.train.trainable}"
        say(f"trainable: {trainable:,} of {total:,} parameters ({why})")
    if progress and dist.is_main:  # a slow machine or a slow program? the yardstick beside MFU

        peak = peak_flops(dist.device)
        say(f"machine: fp32 matmul measured at {format_flops(measured_matmul_flops(dist.device))} now"
            + (f"; MFU is reported against {format_flops(peak)}" if peak else ""))

    run_config = cfg.to_dict()
    resume_from = ckpt.resolve_resume(cfg.train.resume, run_dir)
    _prepare_folder(cfg, run_dir, resume_from, dist)
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, run_name=cfg.run.name, config=run_config,
                           is_main=dist.is_main)
    trainer = Trainer(parts.model, parts.objective, parts.train_data, cfg.train, run_dir=run_dir,
                      eval_data=parts.eval_data, dist_info=dist, tokenizer=parts.tokenizer, run_config=run_config,
                      flops_per_token=parts.flops_per_token, logger=logger, evaluate=parts.evaluate,
                      callbacks=[CurvePlotter(run_dir, title=cfg.run.name), *parts.callbacks, *callbacks])
    resumed = None
    if resume_from is not None:  # already verified by resolve_resume above
        trainer.load_checkpoint(resume_from)
        resumed = resume_from
    if resumed is not None:
        say(f"resumed from {resumed} at step {trainer.step}")
        before = ((read_config(resumed) or {}).get("train") or {}).get("max_steps")
        if before is not None and before != cfg.train.max_steps:  # the LR schedule is stretched or cut
            say(f"note: train.max_steps is {cfg.train.max_steps} now but {before} in the checkpoint resumed from; "
                f"the learning-rate schedule follows {cfg.train.max_steps} from step {trainer.step} on")
    result: FitResult = trainer.fit()
    summary = {
        "task": cfg.task, "steps": result.step, "stopped_early": result.stopped_early,
        "early_stopped": result.early_stopped,
        "skipped_steps": result.skipped_steps,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "final_eval": result.evals[-1] if result.evals else None,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "history": result.history, "evals": result.evals, "run_dir": str(run_dir),
        "train_seconds": time.time() - t_start, "resumed_from": str(resumed) if resumed else None,
    }
    if result.evals:
        say("final: " + "  ".join(f"{k} {v:.4f}" for k, v in result.evals[-1].items() if k != "step"))
    if parts.finish is not None and not result.stopped_early:
        t_finish = time.time()
        say(f"after training: task {cfg.task}'s results on the best model ...")
        model = trainer.model
        best = run_dir / "checkpoints" / "best"
        if result.best_checkpoint is not None or (cfg.train.best_metric and best.is_dir()):
            ckpt.load_checkpoint(best).load_weights_into(model)  # the task's results are the best model's
            summary["evaluated_checkpoint"] = str(best)
        results = parts.finish(model, summary) or {}
        summary.update(results)
        say(f"after training: done in {time.time() - t_finish:.0f}s")
        scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars and dist.is_main:  # e.g. sft's test_loss / test_ppl: printed and kept in the run folder
            say("results: " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
            atomic_write(run_dir / "results.json", json.dumps({"step": result.step, **scalars}, indent=1) + "\n")
    if dist.is_main and summary.get("sample"):
        log_sample(run_dir, result.step, summary["sample"])
    summary["wall_seconds"] = time.time() - t_start
    if dist.is_main and not result.stopped_early and cfg.logging.report:
        say(f"report: writing {run_dir / 'report.html'} (curves, evaluations, samples) ...")
        report_after_run(run_dir, enabled=True, say=say)
    return summary
