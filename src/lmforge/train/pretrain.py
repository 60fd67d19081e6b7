"""Pretraining, end to end: config -> data -> tokenizer -> token store -> model -> trainer -> sample.

``pretrain(cfg)`` is what ``lmforge pretrain`` runs. Each step is a small function so later
recipes (SFT, DPO, GRPO) reuse the same pieces with another objective and batch source.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmforge.config import RunConfig, SourceSection, save_config
from lmforge.data.sources import SourceSpec, iter_documents
from lmforge.data.tokens import TokenStore, check_fits, random_windows, sequential_windows
from lmforge.errors import ConfigError
from lmforge.model import build, count_parameters, flops_per_token
from lmforge.objectives import make_objective
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, barrier, setup, teardown
from lmforge.train.logging import MetricsLogger, save_run_info
from lmforge.train.trainer import FitResult, Trainer, seed_everything

MASK = "<|mask|>"


def source_specs(sections: list[SourceSection] | None) -> list[SourceSpec] | None:
    if sections is None:
        return None
    return [SourceSpec(**vars(s)) for s in sections]


# ----------------------------------------------------------------------------------- pieces
def build_tokenizer(cfg: RunConfig, run_dir: Path, dist: DistInfo, extra_specials: tuple[str, ...] = ()):
    """The run's tokenizer: loaded from the run folder when it exists (resume), else trained on
    the training sources (char, bpe), built (byte) or loaded from ``tokenizer.path`` (file)."""
    from lmforge.tokenizer import (CHAR_SPECIAL_TOKENS, DEFAULT_SPECIAL_TOKENS, BPETokenizer, ByteTokenizer,
                                   CharTokenizer, load_tokenizer)

    t = cfg.tokenizer
    saved = run_dir / "tokenizer.json"
    if t.kind == "file":
        return load_tokenizer(t.path)
    if saved.is_file():
        return load_tokenizer(saved)
    if dist.is_main:
        if t.kind == "byte":
            tok = ByteTokenizer(specials=DEFAULT_SPECIAL_TOKENS + extra_specials)
        else:
            docs = []
            for spec in source_specs(cfg.data.sources):
                for d in iter_documents(spec):
                    if t.train_docs is not None and len(docs) >= t.train_docs:
                        break
                    docs.append(d)
            if t.kind == "char":
                tok = CharTokenizer.train(docs, specials=CHAR_SPECIAL_TOKENS + extra_specials)
            else:
                tok = BPETokenizer.train(docs, vocab_size=t.vocab_size, specials=DEFAULT_SPECIAL_TOKENS + extra_specials)
        run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(saved)
    barrier(dist)
    return load_tokenizer(saved)


def build_token_store(cfg: RunConfig, tokenizer, dist: DistInfo, progress: bool = True) -> TokenStore:
    """Rank 0 tokenizes (or finds the cached store); the other ranks then load the same store."""
    kwargs = dict(val_fraction=cfg.data.val_fraction, val_sources=source_specs(cfg.data.val_sources),
                  seed=cfg.run.seed)
    store = None
    if dist.is_main:
        store = TokenStore.build(source_specs(cfg.data.sources), tokenizer, cfg.data.cache_dir,
                                 progress=progress, **kwargs)
    barrier(dist)
    if store is None:
        store = TokenStore.build(source_specs(cfg.data.sources), tokenizer, cfg.data.cache_dir, progress=False,
                                 **kwargs)
    return store


class WindowBatches:
    """Random training windows as a pure function of the step.

    At step s one global batch of micro_batch x grad_accum x world windows is drawn from a
    generator seeded with (seed, s); micro-step m of rank r takes its own slice. So resuming at
    step s sees the same data, ranks never overlap, and 2 ranks x B/2 equal 1 rank x B.
    """

    def __init__(self, tokens, context: int, micro_batch: int, grad_accum: int, objective, seed: int,
                 rank: int = 0, world: int = 1):
        check_fits(tokens, context, "train")
        self.tokens, self.context, self.objective = tokens, context, objective
        self.micro_batch, self.grad_accum, self.seed = micro_batch, grad_accum, seed
        self.rank, self.world = rank, world
        self._step, self._batch = None, None

    def batch(self, step: int, micro: int) -> dict:
        if self._step != step:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            total = self.micro_batch * self.grad_accum * self.world
            x, y = random_windows(self.tokens, self.context, total, g)
            self._batch = self.objective.collate(torch.cat([x, y[:, -1:]], dim=1), g)  # windows (B, T+1)
            self._step = step
        i = (micro * self.world + self.rank) * self.micro_batch
        return {k: v[i:i + self.micro_batch] for k, v in self._batch.items()}


def eval_batches(tokens, context: int, batch_size: int, max_batches: int, objective, seed: int = 0):
    """A callable giving the same validation batches every time (strided windows, fixed masks)."""
    check_fits(tokens, context, "val")

    def batches():
        g = torch.Generator().manual_seed(seed)
        for x, y in sequential_windows(tokens, context, batch_size, max_batches=max_batches):
            yield objective.collate(torch.cat([x, y[:, -1:]], dim=1), g)

    return batches


def make_objective_for(cfg: RunConfig, tokenizer, vocab_size: int):
    if cfg.objective.name == "masked_lm":
        mask_id = tokenizer.token_to_id(MASK)
        if mask_id is None:
            mask_id = tokenizer.token_to_id("[MASK]")
        if mask_id is None:
            raise ConfigError("objective.name: masked_lm needs a mask token (<|mask|> or [MASK]) in the tokenizer")
        return make_objective("masked_lm", mask_id=mask_id, vocab_size=vocab_size, mask_prob=cfg.objective.mask_prob,
                              special_ids=tuple(tokenizer.special_tokens.values()))
    return make_objective(cfg.objective.name)


def sample_text(model, tokenizer, cfg: RunConfig) -> str | None:
    """A sample from the trained model, as the recipe's ``sample:`` section asks."""
    if model.config.arch == "encoder" or cfg.sample.max_new_tokens <= 0:
        return None
    from lmforge.generate import generate_text

    prompt = cfg.sample.prompt or "\n"
    limit = model.config.context_length - len(tokenizer.encode(prompt)) - 1
    n = cfg.sample.max_new_tokens if model.config.positional != "learned" else max(1, min(cfg.sample.max_new_tokens, limit))
    text = generate_text(model, tokenizer, prompt, max_new_tokens=n, temperature=cfg.sample.temperature,
                         top_k=cfg.sample.top_k, top_p=cfg.sample.top_p, seed=cfg.sample.seed)
    return prompt + text


# ----------------------------------------------------------------------------------- entry
def pretrain(cfg: RunConfig, *, progress: bool = True, print_fn=print) -> dict:
    """Train as ``cfg`` says; returns a summary (steps, last losses, checkpoint paths, sample)."""
    dist = setup(cfg.run.device)
    try:
        summary = _pretrain(cfg, dist, progress, print_fn if dist.is_main else (lambda *a, **k: None))
        barrier(dist)  # rank 0 still plots and samples: leave the process group together (gloo aborts otherwise)
        return summary
    finally:
        teardown()


def _pretrain(cfg: RunConfig, dist: DistInfo, progress: bool, say) -> dict:
    t_start = time.time()
    run_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    extra = (MASK,) if cfg.objective.name == "masked_lm" else ()
    tokenizer = build_tokenizer(cfg, run_dir, dist, extra)
    mcfg = cfg.model_config(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                          f"tokens; set it to at least that, or null to take the tokenizer's")
    if mcfg.arch == "encoder" and cfg.objective.name != "masked_lm":
        raise ConfigError("objective.name: an encoder trains with masked_lm")
    store = build_token_store(cfg, tokenizer, dist, progress=progress and dist.is_main)
    say(f"data: {store}")
    if len(store.val) == 0:
        raise ConfigError("data.val_fraction: the validation split is empty; raise val_fraction or give val_sources")

    seed_everything(cfg.run.seed)
    model = build(mcfg)
    objective = make_objective_for(cfg, tokenizer, mcfg.vocab_size)
    context = mcfg.context_length
    t = cfg.train
    train_data = WindowBatches(store.train, context, t.batch_size, t.grad_accum, objective, cfg.run.seed,
                               dist.rank, dist.world_size)
    val_data = eval_batches(store.val, context, t.eval_batch_size, t.eval_batches, objective, cfg.run.seed)
    fpt = flops_per_token(mcfg, context)
    say(f"model: {mcfg.arch} {mcfg.name or ''} {count_parameters(model):,} parameters "
        f"({count_parameters(model, exclude_embeddings=True):,} without embeddings), {fpt / 1e6:.2f} MFLOPs/token "
        f"(train), context {context}, vocab {mcfg.vocab_size}")
    say(f"batch: {t.batch_size} x {t.grad_accum} accum x {dist.world_size} procs x {context} tokens = "
        f"{t.batch_size * t.grad_accum * dist.world_size * context:,} tokens/step on {dist.device}")

    run_config = cfg.to_dict()
    resume_from = ckpt.resolve_resume(t.resume, run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:  # a fresh run: keep an earlier run's metrics aside, do not mix curves
            old = run_dir / "metrics.jsonl"
            if old.exists():
                old.rename(run_dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        save_config(cfg, run_dir / "config.yaml")
        save_run_info(run_dir, run_config)
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, run_name=cfg.run.name, config=run_config,
                           is_main=dist.is_main)
    trainer = Trainer(model, objective, train_data, t, run_dir=run_dir, eval_data=val_data, dist_info=dist,
                      tokenizer=tokenizer, run_config=run_config, flops_per_token=fpt, logger=logger)
    resumed = trainer.resume(str(resume_from)) if resume_from is not None else None
    if resumed is not None:
        say(f"resumed from {resumed} at step {trainer.step}")
    result: FitResult = trainer.fit()
    trainer.plot_curves()
    summary = {
        "steps": result.step, "stopped_early": result.stopped_early, "skipped_steps": result.skipped_steps,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "final_eval": result.evals[-1] if result.evals else None,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "history": result.history, "evals": result.evals, "run_dir": str(run_dir),
        "wall_seconds": time.time() - t_start, "resumed_from": str(resumed) if resumed else None,
    }
    if result.evals:
        say("final: " + "  ".join(f"{k} {v:.4f}" for k, v in result.evals[-1].items() if k != "step"))
    if dist.is_main and not result.stopped_early and cfg.sample.max_new_tokens > 0:
        sample = sample_text(model.eval(), tokenizer, cfg)
        if sample is not None:
            summary["sample"] = sample
            say("\n--- sample ---\n" + sample + "\n--------------")
    return summary
