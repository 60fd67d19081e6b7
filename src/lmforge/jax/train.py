"""Training in JAX: the recipe of lmforge's PyTorch trainer, as one jit-compiled step.

The same recipe, piece by piece:

* AdamW (optax) with the same weight-decay groups as ``lmforge.train.optim.param_groups``: the
  matrices of linear layers decay; embeddings (a tied LM head included), norms and biases do not.
  In Flax those are exactly the ``kernel`` parameters.
* the same learning-rate schedule as ``lmforge.train.optim.lr_at`` (linear warmup, then cosine,
  linear or constant), as a traced function of optax's step count;
* gradient clipping by global norm (``train.grad_clip``; 0 disables it);
* a step whose loss or gradient is not finite is skipped (weights and optimizer state kept), and
  ``train.max_nonfinite`` such steps in a row stop the run;
* the same batches: at step s, windows drawn from the token store with a generator seeded with
  ``(seed, s)`` as the PyTorch ``WindowBatches`` does, and the same validation windows (the first
  ``eval_batches`` batches of non-overlapping windows, token-weighted mean loss);
* the same initial weights: the PyTorch model built after ``torch.manual_seed(run.seed)``,
  converted, so a JAX run and a PyTorch run of one recipe start from the same point;
* checkpoints in lmforge's format (``lmforge.train.checkpoint``): the PyTorch side loads them as
  any other checkpoint; the optimizer state rides along in ``trainer_state.safetensors`` for a JAX resume.

The train step is a pure function ``(params, rest, opt_state, x, y) -> (params, rest,
opt_state, metrics)`` of the model's state, split from the Flax module with ``nnx.split``:
``params`` are the weights, ``rest`` everything else (the dropout random state).

Entry point: :func:`fit_jax`, which ``lmforge.tasks.run`` calls for ``train.backend: jax`` with the
recipe's tokenizer and token store (made by the same task pieces as a PyTorch run).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from lmforge.config import RunConfig, TrainSection
from lmforge.data.tokens import check_fits, random_windows, sequential_windows
from lmforge.errors import ConfigError, TrainingError
from lmforge.jax.convert import build, to_jax, to_torch
from lmforge.jax.generate import generate_text
from lmforge.jax.model import cross_entropy
from lmforge.train import checkpoint as ckpt
from lmforge.train.logging import MetricsLogger
from lmforge.train.optim import lr_at


# ----------------------------------------------------------------------------- the optimizer
def lr_schedule(t: TrainSection):
    """``lmforge.train.optim.lr_at`` as a traced function of the step (optax's update count)."""
    lr, min_lr, warmup, max_steps = t.lr, t.min_lr, t.warmup_steps, t.max_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if t.schedule == "constant" or max_steps <= warmup:
            after = jnp.asarray(lr, jnp.float32)
        else:
            progress = jnp.clip((step - warmup) / max(1, max_steps - warmup), 0.0, 1.0)
            if t.schedule == "linear":
                after = lr + (min_lr - lr) * progress
            else:
                after = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        if not warmup:
            return after
        return jnp.where(step < warmup, lr * (step + 1) / warmup, after)

    return schedule


def decay_mask(params: nnx.State):
    """True for the parameters AdamW decays: the kernels (matrices) of linear layers."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def _leaf_name(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    return names[-1] if names else ""


def make_optimizer(t: TrainSection, params: nnx.State) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with decoupled weight decay on the kernels only."""
    clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
    adamw = optax.adamw(lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay,
                        mask=decay_mask(params))
    return optax.chain(clip, adamw)


# ----------------------------------------------------------------------------- the steps
def make_train_step(graphdef, tx: optax.GradientTransformation):
    """A jit-compiled ``step(params, rest, opt_state, x, y) -> (params, rest, opt_state, metrics)``."""

    def loss_fn(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        loss = cross_entropy(model(x), y)  # model(x): (B, T, V)
        return loss, nnx.state(model, nnx.Not(nnx.Param))  # the dropout rng moved on

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, rest, opt_state, x, y):
        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        return (keep(new_params, params), new_rest, keep(new_opt_state, opt_state),
                {"loss": loss, "grad_norm": grad_norm, "finite": finite})

    return step


def make_eval_step(graphdef):
    """A jit-compiled ``eval_step(params, rest, x, y) -> (summed loss, target count)``."""

    @jax.jit
    def eval_step(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        n = (y != -100).sum()
        return cross_entropy(model(x), y) * n, n

    return eval_step


# ----------------------------------------------------------------------------- data
def train_batch(tokens, context: int, batch_size: int, seed: int, step: int):
    """The windows of step ``step``, drawn exactly as the PyTorch trainer's ``WindowBatches`` does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x, y = random_windows(tokens, context, batch_size, g)  # (B, T) each
    return jnp.asarray(x.numpy(), jnp.int32), jnp.asarray(y.numpy(), jnp.int32)


def evaluate(eval_step, params, rest, tokens, context: int, batch_size: int, max_batches: int) -> dict:
    total, count = 0.0, 0
    for x, y in sequential_windows(tokens, context, batch_size, max_batches=max_batches):
        s, n = eval_step(params, rest, jnp.asarray(x.numpy(), jnp.int32), jnp.asarray(y.numpy(), jnp.int32))
        total += float(s)
        count += int(n)
    if count == 0:
        return {}
    mean = total / count
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}


# ----------------------------------------------------------------------------- checks
def check_recipe(cfg: RunConfig) -> None:
    """One ConfigError naming every setting the JAX trainer does not implement."""
    t, p = cfg.train, []
    if cfg.task != "pretrain":
        p.append(f"task: {cfg.task!r} is not supported by the JAX trainer (expected pretrain)")
    if t.grad_accum != 1:
        p.append(f"train.grad_accum: {t.grad_accum} is not supported by the JAX trainer (expected 1)")
    if t.precision != "fp32":
        p.append(f"train.precision: {t.precision!r} is not supported by the JAX trainer (expected fp32)")
    if p:
        raise ConfigError(p)


# ----------------------------------------------------------------------------- the loop
def init_model(mcfg, seed: int):
    """The PyTorch trainer's initial weights (after seeding with ``seed``), as a JAX model."""
    return build(mcfg, seed=seed)  # = lmforge.model.build(mcfg) after torch.manual_seed(seed)


def _trainer_state(step: int, opt_state, policy, skipped: int) -> dict:
    leaves = jax.tree_util.tree_leaves(opt_state)
    return {"step": step, "backend": "jax", "skipped": skipped, "policy": policy.state_dict(),
            "data": {"next_step": step},
            "opt_state": [torch.from_numpy(np.array(x)) for x in leaves]}


def fit_jax(cfg: RunConfig, tokenizer, store, run_dir, say=print) -> dict:
    """Train ``cfg``'s decoder in JAX on the token ``store``; checkpoints go to ``run_dir/checkpoints``.

    Returns a summary like the PyTorch pipeline's: steps, final loss, evaluations, checkpoint
    paths, a sample, plus ``tokens_per_s`` (training steps only, first compiled step excluded)
    and ``compile_seconds``.
    """
    t_start = time.time()
    check_recipe(cfg)
    t = cfg.train
    run_dir = Path(run_dir)
    mcfg = cfg.model_config(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens; set it to at least that, or null")
    context, seed = mcfg.context_length, cfg.run.seed
    check_fits(store.train, context, "train")
    check_fits(store.val, context, "val")

    model = init_model(mcfg, seed)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(t, params)
    opt_state = tx.init(params)
    train_step = make_train_step(graphdef, tx)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(eval_graphdef)

    policy = ckpt.CheckpointPolicy(t.checkpoint_every, t.checkpoint_every_hours, t.keep_last, t.best_metric,
                                   t.best_mode)
    step, skipped = 0, 0
    resume_from = ckpt.resolve_resume(t.resume, run_dir)
    if resume_from is not None:
        c = ckpt.load_checkpoint(resume_from)
        if c.trainer_state.get("backend") != "jax":
            raise ConfigError(f"train.resume: {resume_from} was written by the PyTorch trainer; the JAX trainer "
                              f"resumes only its own checkpoints (expected train.resume: never)")
        _, params, rest = nnx.split(to_jax(c.build_model()), nnx.Param, ...)
        leaves = [jnp.asarray(v.numpy()) for v in c.trainer_state["opt_state"]]
        opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tx.init(params)), leaves)
        step, skipped = c.trainer_state["step"], c.trainer_state.get("skipped", 0)
        policy.load_state_dict(c.trainer_state["policy"])
        say(f"resumed from {resume_from} at step {step}")

    run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(run_dir, run_name=cfg.run.name, config=cfg.to_dict())
    run_config, ckpt_root = cfg.to_dict(), run_dir / "checkpoints"
    history, evals = [], []
    best_path = last_path = None
    nonfinite_in_row = 0
    tokens_per_step = t.batch_size * context
    step_seconds, compile_seconds, timed_steps = 0.0, None, 0
    window_t0, window_steps = time.perf_counter(), 0
    policy.mark_saved()
    say(f"jax: {jax.default_backend()} ({len(jax.devices())} device(s)), {tokens_per_step:,} tokens/step")

    def save(name: str, metrics: dict):
        merged = nnx.merge(graphdef, params, rest)
        return ckpt.save_checkpoint(ckpt_root, name, to_torch(merged), config=run_config,
                                    trainer_state=_trainer_state(step, opt_state, policy, skipped),
                                    tokenizer=tokenizer, step=step, metrics=metrics)

    try:
        while step < t.max_steps:
            x, y = train_batch(store.train, context, t.batch_size, seed, step)
            if compile_seconds is None:
                t0 = time.perf_counter()
                params, rest, opt_state, m = train_step(params, rest, opt_state, x, y)
                jax.block_until_ready(m["loss"])
                compile_seconds = time.perf_counter() - t0
                window_t0 = time.perf_counter()
            else:
                params, rest, opt_state, m = train_step(params, rest, opt_state, x, y)
                window_steps += 1
            step += 1
            last = step == t.max_steps
            due_eval = step % t.eval_every == 0 or last
            due_save = policy.due(step) or last
            if step % t.log_every == 0 or due_eval or due_save:
                loss, finite = float(m["loss"]), bool(m["finite"])  # waits for the queued steps
                now = time.perf_counter()
                step_seconds += now - window_t0
                timed_steps += window_steps
                tps = window_steps * tokens_per_step / max(now - window_t0, 1e-9) if window_steps else float("nan")
                lr = lr_at(step - 1, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                           schedule=t.schedule)  # the rate the last step used (host-side, no JAX call)
                record = {"loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps}
                history.append({"step": step, **record})
                logger.log(step, record)
                nonfinite_in_row = 0 if finite else nonfinite_in_row + 1
                skipped += 0 if finite else 1
                if nonfinite_in_row >= t.max_nonfinite:
                    raise TrainingError(f"loss or gradient was not finite at step {step}; lower train.lr or check "
                                        f"the data (train.max_nonfinite={t.max_nonfinite})")
                if t.progress:
                    say(f"step {step}/{t.max_steps}: loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
                if due_eval:
                    ev = evaluate(eval_step, params, rest, store.val, context, t.eval_batch_size, t.eval_batches)
                    if ev:
                        evals.append({"step": step, **ev})
                        logger.log(step, {k.removeprefix("val_"): v for k, v in ev.items()}, split="val")
                        say(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                        if t.best_metric and t.best_metric in ev and policy.is_best(ev):
                            best_path = save("best", ev)
                if due_save:
                    last_path = save(ckpt.step_name(step), {"loss": loss})
                    policy.mark_saved(step=step)
                    policy.prune(ckpt_root)
                window_t0, window_steps = time.perf_counter(), 0
    finally:
        logger.close()

    model = nnx.merge(eval_graphdef, params, rest)
    summary = {
        "backend": "jax", "steps": step, "skipped_steps": skipped, "stopped_early": False,
        "final_loss": history[-1]["loss"] if history else None, "final_eval": evals[-1] if evals else None,
        "best_checkpoint": str(best_path) if best_path else None,
        "last_checkpoint": str(last_path) if last_path else None,
        "history": history, "evals": evals, "run_dir": str(run_dir), "wall_seconds": time.time() - t_start,
        "compile_seconds": compile_seconds, "train_step_seconds": step_seconds,
        "tokens_per_s": timed_steps * tokens_per_step / step_seconds if step_seconds else None,
    }
    if evals:
        say("final: " + "  ".join(f"{k} {v:.4f}" for k, v in evals[-1].items() if k != "step"))
    if cfg.sample.max_new_tokens > 0:
        prompt = cfg.sample.prompt or "\n"
        n = min(cfg.sample.max_new_tokens, context - len(tokenizer.encode(prompt)))
        if n > 0:
            text = prompt + generate_text(model, tokenizer, prompt, max_new_tokens=n,
                                          temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
                                          seed=cfg.sample.seed)
            summary["sample"] = text
            say("\n--- sample ---\n" + text + "\n--------------")
    return summary
