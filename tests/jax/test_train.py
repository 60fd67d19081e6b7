"""lmforge.jax.train: schedule and decay groups as the PyTorch trainer, the jit train step against
PyTorch AdamW, checkpoints the PyTorch side loads, the backend field, and what it does not
implement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


# These tests spend most of their time compiling tiny programs: XLA's cheapest optimisation level
# compiles them in about 2/3 of the CPU time (the models are too small to notice at run time).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
jax = pytest.importorskip("jax")  # the extra is part of `make test`'s install; skipped only without it
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from lmforge.errors import ConfigError  # noqa: E402
from lmforge.jax import load_jax, to_jax, torch_state_dict  # noqa: E402
from tests.jax.jax_helpers import TOL, GPT2, LLAMA, STYLES, torch_model, fwd, t2n, max_diff  # noqa: E402


# ------------------------------------------------------------------------------ training
def _jax_torch_pair(fields, seed=0):
    tm = torch_model(fields, seed=seed)
    return tm, to_jax(tm)


def test_lr_schedule_and_decay_groups_match_the_pytorch_trainer():
    from lmforge.config import TrainSection
    from lmforge.jax.convert import named_params
    from lmforge.jax.train import decay_mask, lr_schedule
    from lmforge.train.optim import lr_at, param_groups

    for sched in ("cosine", "linear", "constant"):
        t = TrainSection(max_steps=50, warmup_steps=7, lr=1e-3, min_lr=1e-4, schedule=sched)
        f = jax.jit(lr_schedule(t))
        for s in range(0, 60, 3):
            want = lr_at(s, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                         schedule=sched)
            assert abs(float(f(s)) - want) <= 1e-9 + 1e-6 * want
    for fields in (GPT2, LLAMA):
        tm, jmodel = _jax_torch_pair(fields)
        names = {id(p): n for n, p in tm.named_parameters()}
        want = {names[id(p)] for p in param_groups(tm, 0.1)[0]["params"]}
        params = nnx.state(jmodel, nnx.Param)
        flags = jax.tree_util.tree_leaves(decay_mask(params))
        got = {n for (n, _, _), flag in zip(named_params(jmodel), flags) if flag}
        assert got == want and got


@pytest.mark.parametrize("style", STYLES)
def test_jit_train_step_matches_pytorch_adamw_and_lowers_the_loss(style):
    from lmforge.config import TrainSection
    from lmforge.jax.train import make_optimizer, make_train_step
    from lmforge.train.optim import make_optimizer as torch_opt
    from lmforge.train.optim import make_scheduler

    t = TrainSection(max_steps=8, warmup_steps=3, lr=3e-3, min_lr=3e-4, grad_clip=0.5, weight_decay=0.1,
                     beta1=0.9, beta2=0.99)
    tm, jmodel = _jax_torch_pair(STYLES[style], seed=8)
    tm.train()
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 53, (4, 16), generator=g)
    y = torch.roll(x, -1, dims=1)
    opt = torch_opt(tm, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    sched = make_scheduler(opt, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                           schedule=t.schedule)
    graphdef, params, rest = nnx.split(jmodel, nnx.Param, ...)
    tx = make_optimizer(t, params)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    jx, jy = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    losses = []
    for _ in range(t.max_steps):
        loss = F.cross_entropy(tm(x).reshape(-1, 53), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad()
        sched.step()
        params, rest, opt_state, m = step(params, rest, opt_state, jx, jy)
        assert abs(float(m["loss"]) - float(loss)) <= 1e-4
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.3  # it learns the tiny batch
    after = torch_state_dict(nnx.merge(graphdef, params, rest))
    assert max(max_diff(after[k], t2n(v)) for k, v in tm.state_dict().items()) <= 1e-4


def _tiny_cfg(tmp_path, **train):
    from lmforge.tasks import config_from_dict

    return config_from_dict({
        "run": {"name": "jax-tiny", "out_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"arch": "decoder", "n_layer": 1, "n_head": 2, "n_embd": 32, "context_length": 32,
                  "vocab_size": None, "bias": False},
        "tokenizer": {"kind": "char"},
        "data": {"sources": [{"path": "builtin:stories", "num_docs": 200, "seed": 0}], "val_fraction": 0.1,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "eval_every": 10, "eval_batches": 2, "log_every": 5, "checkpoint_every": 10,
                  "progress": False, "backend": "jax", **train},
        "sample": {"max_new_tokens": 8, "prompt": "The"},
    })


def test_fit_jax_writes_checkpoints_the_pytorch_side_loads(tmp_path):
    from lmforge.jax.train import fit_jax
    from lmforge.tasks.common import TaskContext
    from lmforge.tasks.lm import prepare_lm_data
    from lmforge.train.checkpoint import load_checkpoint
    from lmforge.train.distributed import DistInfo

    cfg = _tiny_cfg(tmp_path)
    tok, store = prepare_lm_data(TaskContext(cfg=cfg, run_dir=Path(cfg.run.out_dir), dist=DistInfo(), progress=False))
    lines = []
    summary = fit_jax(cfg, tok, store, cfg.run.out_dir, say=lines.append)
    assert summary["steps"] == 20 and summary["backend"] == "jax"
    assert [e["step"] for e in summary["evals"]] == [10, 20]
    assert summary["evals"][-1]["val_loss"] < summary["history"][0]["loss"]
    assert summary["sample"].startswith("The") and summary["tokens_per_s"] > 0
    c = load_checkpoint(summary["last_checkpoint"])
    assert c.step == 20 and c.trainer_state["backend"] == "jax"
    tm = c.build_model().eval()  # the PyTorch side
    jmodel = load_jax(summary["last_checkpoint"])
    ids = torch.tensor([tok.encode("Once upon a time")])
    with torch.no_grad():
        assert max_diff(fwd(jmodel, jnp.asarray(ids.numpy())), t2n(tm(ids))) <= TOL
    # resume: a longer run picks up the optimizer state and continues from step 20
    more = _tiny_cfg(tmp_path, max_steps=25, checkpoint_every=None)
    more.sample.max_new_tokens = 0
    s2 = fit_jax(more, tok, store, more.run.out_dir, say=lines.append)
    assert s2["steps"] == 25 and s2["history"][0]["step"] == 25
    assert any("resumed from" in line for line in lines)


def test_backend_field_is_validated():
    from lmforge.tasks import config_from_dict

    assert config_from_dict({"train": {"backend": "jax"}}).train.backend == "jax"
    with pytest.raises(ConfigError, match="train.backend: got 'tf', expected torch or jax"):
        config_from_dict({"train": {"backend": "tf"}})


def test_fit_jax_rejects_what_it_does_not_implement(tmp_path):
    from lmforge.jax.train import check_recipe

    with pytest.raises(ConfigError, match="train.grad_accum: 2 is not supported by the JAX trainer"):
        check_recipe(_tiny_cfg(tmp_path, grad_accum=2))


def test_train_backend_jax_runs_through_the_one_pipeline(tiny_config):
    from lmforge.tasks.run import run

    s = run(tiny_config("jx", train={"backend": "jax", "max_steps": 3, "eval_every": 3}), progress=False,
            print_fn=lambda *a, **k: None)
    assert s["steps"] == 3 and s["final_eval"]["val_loss"] > 0
    with pytest.raises(ConfigError, match="train.backend: jax trains task: pretrain only"):
        run(tiny_config("jx2", task="mlm", model={"arch": "encoder", "mlm_head": True}, train={"backend": "jax"}))
