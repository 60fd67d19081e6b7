"""What every task builder shares: the context it gets, the parts it returns, and the two
pieces most tasks need: the run's tokenizer and its model (fresh, or ``model.init_from``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch.nn as nn

from lmforge.config import RunConfig, SourceSection
from lmforge.data.sources import SourceSpec
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import ModelConfig, build
from lmforge.model.lora import LoraConfig, apply_lora
from lmforge.store import from_pretrained, resolve_model_path
from lmforge.tokenizer import (CHAR_SPECIAL_TOKENS, DEFAULT_SPECIAL_TOKENS, BPETokenizer, ByteTokenizer,
                               CharTokenizer, load_tokenizer)
from lmforge.train.distributed import DistInfo, barrier
from lmforge.train.trainer import seed_everything


@dataclass
class TaskContext:
    cfg: RunConfig
    run_dir: Path
    dist: DistInfo
    progress: bool = True
    say: Callable[..., None] = print


@dataclass
class TaskParts:
    model: nn.Module
    tokenizer: Any
    objective: Any
    train_data: Any  # a batch source: .batch(step, micro) -> dict
    eval_data: Callable[[], Iterable[dict]] | None  # a callable giving the same validation batches each time
    evaluate: Callable | None = None  # (model, batches) -> validation metrics; None: the objective's evaluate
    flops_per_token: float | None = None
    tokens_per_step: int | None = None  # for the start-up line; None when examples vary in length
    describe: list[str] = field(default_factory=list)  # lines printed at start-up (data, model, batch)
    finish: Callable[[nn.Module, dict], dict] | None = None  # after fit: (best model, summary) -> extra summary
    callbacks: list = field(default_factory=list)  # the task's own trainer callbacks (e.g. sample answers)


def epochs_line(ctx: TaskContext, steps_per_epoch: float) -> str:
    """How the run's steps relate to its data, for the start-up line. With ``train.epochs`` this is
    where ``train.max_steps`` is set: enough optimizer steps to pass over the training data that
    many times (rounded up), the same on every start of the run, so a resumed run keeps its
    schedule and its place in the epoch."""
    t = ctx.cfg.train
    if t.epochs is None:
        return f"{steps_per_epoch:.1f} steps/epoch, {t.max_steps / steps_per_epoch:.2f} epochs"
    t.max_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
    return f"{steps_per_epoch:.1f} steps/epoch x train.epochs {t.epochs:g} = train.max_steps {t.max_steps}"


def source_specs(sections: list[SourceSection] | None) -> list[SourceSpec] | None:
    if sections is None:
        return None
    return [SourceSpec(**vars(s)) for s in sections]


# ------------------------------------------------------------------------------ tokenizer
def build_tokenizer(ctx: TaskContext, texts: Callable[[], Iterable[str]], extra_specials: tuple[str, ...] = ()):
    """The run's tokenizer: the run folder's (resume), ``tokenizer.path`` (kind file), the
    ``model.init_from`` model's own, or trained on ``texts()`` (char, bpe) / built (byte)."""
    cfg, dist = ctx.cfg, ctx.dist
    t = cfg.tokenizer
    saved = ctx.run_dir / "tokenizer.json"
    if t.kind == "file":
        return load_tokenizer(t.path)
    resumed = saved.is_file()
    # every rank looks before rank 0 may write the file: a rank that looked later would see it,
    # skip the barrier below and leave rank 0 waiting there forever
    barrier(dist)
    if resumed:
        return load_tokenizer(saved)
    if dist.is_main:
        if cfg.init_from:
            tok = init_tokenizer(cfg.init_from)
        elif t.kind == "byte":
            tok = ByteTokenizer(specials=DEFAULT_SPECIAL_TOKENS + extra_specials)
        else:
            docs = []
            for d in texts():
                if t.train_docs is not None and len(docs) >= t.train_docs:
                    break
                docs.append(d)
            if t.kind == "char":
                tok = CharTokenizer.train(docs, specials=CHAR_SPECIAL_TOKENS + extra_specials)
            else:
                tok = BPETokenizer.train(docs, vocab_size=t.vocab_size, specials=DEFAULT_SPECIAL_TOKENS + extra_specials)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(saved)
    barrier(dist)
    return load_tokenizer(saved)


def init_tokenizer(path: str):
    _, tok = from_pretrained(resolve_init_path(path), with_tokenizer=True)
    if tok is None:
        raise ConfigError(f"model.init_from: {path} has no tokenizer; set tokenizer.kind: file and tokenizer.path")
    return tok


def resolve_init_path(path: str) -> Path:
    """``model.init_from``: any name ``lmforge.store`` resolves (a run folder gives its best
    checkpoint, else its newest valid one; ``python:PACKAGE/sub`` a folder inside a package)."""
    return resolve_model_path(path)[0]


# ------------------------------------------------------------------------------ model
# Fields a run may change on a model it starts from; the rest define the weights' shapes.
INIT_OVERRIDABLE = ("dropout", "pooling", "num_classes", "labels", "init_std", "name", "lora")


def build_model(ctx: TaskContext, vocab_size: int, **head: Any) -> nn.Module:
    """A fresh model from the ``model:`` section, or ``model.init_from`` with its weights; ``head``
    adds task fields (num_classes, labels, pooling). Seeded, so every rank builds the same."""
    cfg = ctx.cfg
    seed_everything(cfg.run.seed)
    if not cfg.init_from:
        mcfg = cfg.model_config(vocab_size=vocab_size)
        if vocab_size > mcfg.vocab_size:
            raise ConfigError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's {vocab_size} "
                              f"tokens; set it to at least that, or null to take the tokenizer's")
        if head:
            mcfg = ModelConfig.from_dict({**mcfg.to_dict(), **head})
        model = build(mcfg)
    else:
        model = model_from_init(cfg.init_from, cfg.model_overrides(), head, vocab_size)
    return with_lora(model, cfg.model.get("lora"))


def with_lora(model: nn.Module, lora: dict | None) -> nn.Module:
    """``model.lora: {rank, alpha, dropout, targets}``: adapters on the base, which is frozen (a
    classification head stays trainable)."""
    if not lora:
        return model
    d = dict(lora)
    if getattr(model, "classifier", None) is not None:
        d["also_train"] = tuple(d.get("also_train", ())) + ("classifier.",)
    try:
        return apply_lora(model, LoraConfig(**d))
    except TypeError as e:
        raise ConfigError(f"model.lora: {e}") from None
    except ConfigError as e:
        raise ConfigError([f"model.{p}" for p in e.problems]) from None


def model_from_init(path: str, overrides: dict, head: dict, vocab_size: int) -> nn.Module:
    """Load ``path`` (lmforge checkpoint/model folder, run folder or Hugging Face folder), apply
    the allowed config changes and task heads, and copy every weight that still fits; only a
    (new) classification head starts from fresh initialisation."""
    base = from_pretrained(resolve_init_path(path))
    overrides = {k: v for k, v in overrides.items() if v is not None}  # null: keep the loaded value
    fixed = sorted(k for k in overrides if k not in INIT_OVERRIDABLE and overrides[k] != getattr(base.config, k, None))
    if fixed:
        raise ConfigError([f"model.{k}: cannot change when model.init_from is set (the weights fix it); "
                           f"changeable: {', '.join(INIT_OVERRIDABLE)}" for k in fixed])
    if vocab_size > base.config.vocab_size:
        raise ConfigError(f"model.init_from: {path} has vocab_size {base.config.vocab_size} but the tokenizer has "
                          f"{vocab_size} tokens; use the model's own tokenizer")
    mcfg = ModelConfig.from_dict({**base.config.to_dict(), **overrides, **head})
    model = build(mcfg)
    state = base.state_dict()
    same_head = (mcfg.num_classes == base.config.num_classes and mcfg.labels == base.config.labels)
    if not same_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("classifier.")] + list(unexpected)
    if bad:
        raise CheckpointError(f"model.init_from: {path}: weights do not fit the model: {', '.join(bad[:5])}")
    model.train()
    return model
