"""Language-model tasks on a token stream: ``pretrain`` (causal LM) and ``mlm`` (masked LM).

Data: the sources' documents are tokenized once into a token store (memmap shards, cached);
training draws random windows, validation reads fixed strided windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import RunConfig
from lmforge.data.sampler import StepSampler
from lmforge.data.sources import SourceSpec, iter_documents
from lmforge.data.tokens import TokenStore, check_fits, sequential_windows
from lmforge.errors import ConfigError
from lmforge.generate import generate_text
from lmforge.model import count_parameters, flops_per_token
from lmforge.objectives import CausalLM, MaskedLM
from lmforge.tasks import Task
from lmforge.tasks.common import (TaskContext, TaskParts, build_model, build_tokenizer, epochs_line,
                                  source_specs)
from lmforge.train.distributed import DistInfo, barrier

MASK = "<|mask|>"


@dataclass
class PretrainOptions:
    """``objective:`` options of ``task: pretrain`` (next-token prediction has none yet)."""


@dataclass
class MLMOptions:
    """``objective:`` options of ``task: mlm``."""

    mask_prob: float = 0.15  # share of positions predicted (80% [MASK], 10% random, 10% kept)


# ------------------------------------------------------------------------------ data
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
    """Random training windows: the step sampler (``random`` mode) over the window starts.

    At step s one global batch of micro_batch x grad_accum x world windows is drawn from the
    step's generator; micro-step m of rank r takes its own slice. The objective's collate (MLM
    masks) draws from the same generator over the whole global batch, so masks too are a pure
    function of the step, whatever the number of ranks.
    """

    def __init__(self, tokens, context: int, micro_batch: int, grad_accum: int, objective, seed: int,
                 rank: int = 0, world: int = 1):
        n = check_fits(tokens, context, "train")
        self.tokens, self.context, self.objective, self.rank = tokens, context, objective, rank
        self.sampler = StepSampler(n - context, micro_batch, grad_accum, world, seed, mode="random")
        self._step, self._batch = None, None

    def batch(self, step: int, micro: int) -> dict:
        if self._step != step:
            g = self.sampler.generator(step)
            starts = self.sampler.global_indices(step, g).numpy()  # (G,)
            idx = starts[:, None] + torch.arange(self.context + 1).numpy()[None, :]
            windows = torch.from_numpy(self.tokens[idx].astype("int64"))  # (G, T+1)
            self._batch = self.objective.collate(windows, g)
            self._step = step
        s = self.sampler.slice_of(micro, self.rank)
        return {k: v[s] for k, v in self._batch.items()}


def eval_batches(tokens, context: int, batch_size: int, max_batches: int, objective, seed: int = 0):
    """A callable giving the same validation batches every time (strided windows, fixed masks)."""
    check_fits(tokens, context, "val")

    def batches():
        g = torch.Generator().manual_seed(seed)
        for x, y in sequential_windows(tokens, context, batch_size, max_batches=max_batches):
            yield objective.collate(torch.cat([x, y[:, -1:]], dim=1), g)

    return batches


def sample_text(model, tokenizer, cfg: RunConfig) -> str | None:
    """A sample from the trained model, as the recipe's ``sample:`` section asks."""
    if model.config.arch == "encoder" or cfg.sample.max_new_tokens <= 0:
        return None

    prompt = cfg.sample.prompt or "\n"
    limit = model.config.context_length - len(tokenizer.encode(prompt)) - 1
    n = cfg.sample.max_new_tokens if model.config.positional != "learned" else max(1, min(cfg.sample.max_new_tokens, limit))
    text = generate_text(model, tokenizer, prompt, max_new_tokens=n, temperature=cfg.sample.temperature,
                         top_k=cfg.sample.top_k, top_p=cfg.sample.top_p, seed=cfg.sample.seed)
    return prompt + text


# ------------------------------------------------------------------------------ builders
def documents(cfg: RunConfig):
    """A callable giving the recipe's training documents (texts), for training its tokenizer."""
    def texts():
        for spec in source_specs(cfg.data.sources):
            yield from iter_documents(spec)
    return texts


def _build_lm(ctx: TaskContext, masked: bool) -> TaskParts:
    cfg, t = ctx.cfg, ctx.cfg.train
    tokenizer = build_tokenizer(ctx, documents(cfg), (MASK,) if masked else ())
    model = build_model(ctx, tokenizer.vocab_size)
    mcfg = model.config
    if masked:
        if mcfg.arch != "encoder":
            raise ConfigError(f"task: mlm trains an encoder; model.arch is {mcfg.arch!r}")
        mask_id = tokenizer.token_to_id(MASK)
        if mask_id is None:
            mask_id = tokenizer.token_to_id("[MASK]")
        if mask_id is None:
            raise ConfigError("task: mlm needs a mask token (<|mask|> or [MASK]) in the tokenizer")
        objective = MaskedLM(mask_id=mask_id, vocab_size=mcfg.vocab_size, mask_prob=cfg.objective.mask_prob,
                             special_ids=tuple(tokenizer.special_tokens.values()))
    else:
        if mcfg.arch == "encoder":
            raise ConfigError("task: pretrain trains a causal decoder; an encoder trains with task: mlm")
        objective = CausalLM()
    store = build_token_store(cfg, tokenizer, ctx.dist, progress=ctx.progress and ctx.dist.is_main)
    if len(store.val) == 0:
        raise ConfigError("data.val_fraction: the validation split is empty; raise val_fraction or give val_sources")
    context = mcfg.context_length
    dist = ctx.dist
    train_data = WindowBatches(store.train, context, t.batch_size, t.grad_accum, objective, cfg.run.seed,
                               dist.rank, dist.world_size)
    val_data = eval_batches(store.val, context, t.eval_batch_size, t.eval_batches, objective, cfg.run.seed)
    fpt = flops_per_token(mcfg, context)
    tokens_per_step = t.batch_size * t.grad_accum * dist.world_size * context
    epochs = epochs_line(ctx, len(store.train) / tokens_per_step)  # an epoch: the training tokens once

    def finish(best_model, summary: dict) -> dict:
        if not dist.is_main or summary.get("stopped_early") or cfg.sample.max_new_tokens <= 0:
            return {}
        sample = sample_text(best_model.eval(), tokenizer, cfg)
        if sample is None:
            return {}
        ctx.say("\n--- sample ---\n" + sample + "\n--------------")
        return {"sample": sample}

    return TaskParts(
        model=model, tokenizer=tokenizer, objective=objective, train_data=train_data, eval_data=val_data,
        flops_per_token=fpt, tokens_per_step=tokens_per_step, finish=finish,
        describe=[f"data: {store}",
                  f"model: {mcfg.arch} {mcfg.name or ''} {count_parameters(model):,} parameters "
                  f"({count_parameters(model, exclude_embeddings=True):,} without embeddings), "
                  f"{fpt / 1e6:.2f} MFLOPs/token (train), context {context}, vocab {mcfg.vocab_size}",
                  f"batch: {t.batch_size} x {t.grad_accum} accum x {dist.world_size} procs x {context} tokens = "
                  f"{tokens_per_step:,} tokens/step ({epochs}) on {dist.device}"])


def _check_lm(cfg: RunConfig) -> list[str]:
    if cfg.init_from:
        return []
    arch = cfg.model_config(vocab_size=cfg.model.get("vocab_size") or 1).arch
    if cfg.task == "mlm" and arch != "encoder":
        return [f"task: mlm trains an encoder; model.arch is {arch!r} (expected encoder, e.g. preset bert-mini)"]
    if cfg.task == "pretrain" and arch == "encoder":
        return ["task: pretrain trains a causal decoder; an encoder trains with task: mlm"]
    return []


def _check_mlm(cfg: RunConfig) -> list[str]:
    p = _check_lm(cfg)
    if not 0 < cfg.objective.mask_prob < 1:
        p.append(f"objective.mask_prob: got {cfg.objective.mask_prob}, expected a number in (0, 1)")
    return p


def eval_lm(model, tokenizer, run_config: dict, req) -> dict:
    """Loss and perplexity of a causal LM on ``req.data`` (``lmforge eval``), over consecutive
    windows of the model's context (or ``req.context``)."""
    spec = SourceSpec(path=req.data, text_field=req.text_field or "text", limit=req.limit, split=req.split,
                      doc_separator=req.doc_separator)
    store = TokenStore.build([spec], tokenizer, req.cache_dir, val_fraction=0.0, progress=req.progress)
    context = req.context or model.config.context_length
    device = next(model.parameters()).device

    def batches():
        for x, y in sequential_windows(store.train, context, req.batch_size, max_batches=req.max_batches,
                                       split_name=req.data):
            yield {"input_ids": x.to(device), "targets": y.to(device)}

    return {"tokens": int(len(store.train)), **CausalLM().evaluate(model, batches())}


PRETRAIN = Task("pretrain", "causal language modelling (next-token prediction) on a token stream",
                PretrainOptions, lambda ctx: _build_lm(ctx, masked=False), _check_lm, for_eval=eval_lm)
MLM = Task("mlm", "masked language modelling (BERT) on a token stream", MLMOptions,
           lambda ctx: _build_lm(ctx, masked=True), _check_mlm)


def prepare_lm_data(ctx: TaskContext):
    """(tokenizer, token store) of a causal-LM recipe: the run folder's tokenizer when there is one,
    else trained or loaded as for a PyTorch run (the JAX backend trains on these)."""
    tokenizer = build_tokenizer(ctx, documents(ctx.cfg))
    return tokenizer, build_token_store(ctx.cfg, tokenizer, ctx.dist, progress=ctx.progress)
