"""lmforge.jax: the JAX/Flax NNX twin of the PyTorch decoder, checked against the PyTorch model.

Parity (logits within 1e-4, fp32, highest matmul precision) for GPT-2 and Llama styles with and
without padding, for each learning-path module; weights both ways; the jit train step against
the PyTorch trainer's optimizer; KV-cache decoding; checkpoints loaded by the PyTorch side; the
docs/jax scripts for a few steps; bad input.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import numpy as np
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

from lmforge.errors import ConfigError, InputError, InteropError  # noqa: E402
from lmforge.jax import (build, from_state_dict, generate, init_cache, load_jax, save_jax, to_jax,  # noqa: E402
                         to_torch, torch_state_dict)
from lmforge.jax import model as jm  # noqa: E402
from lmforge.model import ModelConfig  # noqa: E402
from lmforge.model import build as torch_build  # noqa: E402
from lmforge.model import layers as tl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4

GPT2 = dict(arch="decoder", vocab_size=53, context_length=24, n_layer=2, n_head=4, n_embd=32,
            activation="gelu_tanh", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)
LLAMA = dict(arch="decoder", vocab_size=53, context_length=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
             activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positional="rope", bias=False,
             tie_embeddings=False)
STYLES = {"gpt2": GPT2, "llama": LLAMA}


def torch_model(fields: dict, seed: int = 0, scale: float = 1.0):
    torch.manual_seed(seed)
    m = torch_build(ModelConfig(**fields)).eval()
    if scale != 1.0:  # larger weights: decisive logits (greedy ties cannot flip on rounding)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return m


@nnx.jit
def fwd(model, ids, mask=None):
    """Logits under jit: one compiled program instead of op-by-op dispatch (much faster on CPU)."""
    return model(ids, attention_mask=mask)


@nnx.jit
def fwd_cached(model, ids, cache, index):
    return model(ids, cache=cache, index=index)


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("style", STYLES)
def test_decoder_logits_match_pytorch(style):
    tm = torch_model(STYLES[style])
    jmodel = to_jax(tm)
    ids = torch.randint(0, 53, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = t2n(tm(ids))
    got = fwd(jmodel, jnp.asarray(ids.numpy()))
    assert got.shape == (3, 12, 53)
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_decoder_logits_match_pytorch_with_padding(style):
    tm = torch_model(STYLES[style])
    jmodel = to_jax(tm)
    ids = torch.randint(0, 53, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    with torch.no_grad():
        want = t2n(tm(ids, attention_mask=mask))
    got = fwd(jmodel, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert max_diff(got, want) <= TOL
    # a left-padded row gives the same logits as the row alone (positions count real tokens)
    alone = torch.cat([ids[:, 5:], ids[:, :5]], dim=1)  # row 0's real tokens first (what follows is unseen)
    assert max_diff(got[0, 5:], fwd(jmodel, jnp.asarray(alone.numpy()))[0, :7]) <= TOL


def test_bigram_matches_pytorch():
    tm = torch_model(dict(arch="bigram", vocab_size=40, n_layer=1, n_head=1, n_embd=8, positional="none"))
    jmodel = to_jax(tm)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert max_diff(fwd(jmodel, jnp.asarray(ids.numpy())), t2n(tm(ids))) <= TOL


def test_single_head_matches_scaled_dot_product_attention():
    head = jm.Head(16, 8, rngs=nnx.Rngs(0), init_std=0.3)
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)
    W = {n: torch.from_numpy(np.asarray(getattr(head, n).kernel.get_value())) for n in ("query", "key", "value")}
    xt = torch.from_numpy(x)
    want = F.scaled_dot_product_attention(xt @ W["query"], xt @ W["key"], xt @ W["value"], is_causal=True)
    assert max_diff(nnx.jit(lambda m, x: m(x))(head, jnp.asarray(x)), t2n(want)) <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_attention_mlp_block_match_pytorch(style):
    cfg = ModelConfig(**STYLES[style])
    torch.manual_seed(3)
    x = torch.randn(2, 10, cfg.n_embd)
    rope_t = tl.RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(10)[None]) if style == "llama" else None
    rope_j = jm.rope_angles(jnp.arange(10)[None], cfg.head_dim, cfg.rope_theta) if style == "llama" else None
    for tmod, jmod in ((tl.Attention(cfg), jm.Attention(cfg, rngs=nnx.Rngs(0))),
                       (tl.Block(cfg), jm.Block(cfg, rngs=nnx.Rngs(0)))):
        with torch.no_grad():
            for p in tmod.parameters():
                p.normal_(0, 0.3)
            want = t2n(tmod(x, rope_t, None, True))
        from_state_dict(jmod, tmod.state_dict())
        got, cache = nnx.jit(lambda m, x, rope: m(x, rope))(jmod, jnp.asarray(x.numpy()), rope_j)
        assert cache is None and max_diff(got, want) <= TOL
    tmlp, jmlp = tl.MLP(cfg), jm.MLP(cfg, rngs=nnx.Rngs(0))
    from_state_dict(jmlp, tmlp.state_dict())
    with torch.no_grad():
        assert max_diff(nnx.jit(lambda m, x: m(x))(jmlp, jnp.asarray(x.numpy())), t2n(tmlp(x))) <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_causal_a_later_token_never_changes_earlier_logits(style):
    jmodel = build(ModelConfig(**STYLES[style]), seed=4)
    ids = np.random.default_rng(4).integers(0, 53, (3, 12))
    base = fwd(jmodel, jnp.asarray(ids))
    changed = ids.copy()
    changed[:, 7:] = (changed[:, 7:] + 7) % 53
    out = fwd(jmodel, jnp.asarray(changed))
    assert max_diff(out[:, :7], base[:, :7]) == 0.0
    assert max_diff(out[:, 7:], base[:, 7:]) > 1e-3


# ------------------------------------------------------------------------------ weights both ways
@pytest.mark.parametrize("style", STYLES)
def test_round_trip_gives_identical_tensors(style):
    tm = torch_model(STYLES[style])
    back = to_torch(to_jax(tm))
    a, b = tm.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if STYLES[style]["tie_embeddings"]:  # still tied after the trip
        assert back.lm_head.weight is back.transformer.tok_emb.weight
    sd = torch_state_dict(to_jax(tm))
    assert all(torch.equal(sd[k], a[k]) for k in a)
    # copies, not views: changing one side's weights leaves the other alone
    jmodel = to_jax(tm)
    with torch.no_grad():
        tm.transformer.norm.weight.add_(1.0)
    assert torch.equal(torch_state_dict(jmodel)["transformer.norm.weight"], b["transformer.norm.weight"])


def test_model_folders_both_ways(tmp_path):
    from lmforge.store import load_model, save_model

    tm = torch_model(LLAMA)
    save_model(tm, tmp_path / "torch_saved")
    jmodel = load_jax(tmp_path / "torch_saved")
    save_jax(jmodel, tmp_path / "jax_saved")
    again = load_model(tmp_path / "jax_saved")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tm.state_dict().items())


def test_hf_model_loads_into_jax(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    jmodel = load_jax(tmp_path / "hf")
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        want = t2n(hf(ids).logits)
    assert max_diff(fwd(jmodel, jnp.asarray(ids.numpy())), want) <= TOL


# ------------------------------------------------------------------------------ bad input
def test_mismatching_shape_names_the_parameter():
    tm = torch_model(GPT2)
    with pytest.raises(InteropError, match=r"transformer\.tok_emb\.weight: weight of shape \(53, 32\) does not "
                                           r"fit the model's \(60, 32\)"):
        from_state_dict(build(ModelConfig(**{**GPT2, "vocab_size": 60}), abstract=True), tm.state_dict())
    llama = torch_model(LLAMA)
    with pytest.raises(InteropError, match=r"transformer\.blocks\.0\.attn\.qkv\.weight: weight of shape \(64, 32\) "
                                           r"does not fit the model's \(48, 32\)"):
        from_state_dict(build(ModelConfig(**{**LLAMA, "n_kv_head": 1}), abstract=True), llama.state_dict())
    with pytest.raises(InteropError, match="lack 1 parameter.*transformer.norm.weight"):
        from_state_dict(build(ModelConfig(**GPT2), abstract=True),
                        {k: v for k, v in tm.state_dict().items() if k != "transformer.norm.weight"})


def test_unsupported_config_is_named():
    with pytest.raises(ConfigError, match="model.arch: 'encoder' is not supported by lmforge.jax"):
        build("bert-mini")
    post_ln = torch_build(ModelConfig(**{**GPT2, "norm_position": "post"}))
    with pytest.raises(ConfigError, match="model.norm_position: 'post' is not supported by lmforge.jax yet"):
        to_jax(post_ln)


def test_missing_extra_names_the_install_command(monkeypatch):
    import lmforge.jax as lj

    monkeypatch.setitem(sys.modules, "optax", None)  # import optax now raises ImportError
    with pytest.raises(lj.JaxNotInstalled, match=r"needs optax; install the extra: pip install lmforge\[jax\]"):
        lj.require_jax()
    assert isinstance(lj.JaxNotInstalled("x"), ImportError)


def test_bad_ids_and_lengths_are_input_errors():
    jmodel = build(ModelConfig(**GPT2))
    with pytest.raises(InputError, match="token id 53 is out of range"):
        jmodel(jnp.array([[1, 53]]))
    with pytest.raises(InputError, match="longer than the model's context_length 24"):
        jmodel(jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(InputError, match="context_length 24"):
        generate(jmodel, [1, 2, 3], max_new_tokens=22)


# ------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_equals_uncached(style):
    jmodel = build(ModelConfig(**STYLES[style]), seed=5)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 53, (3, 12)))
    full = fwd(jmodel, ids)  # (B, T, V)
    cache = init_cache(jmodel.config, 3, 16)
    logits, cache = fwd_cached(jmodel, ids[:, :7], cache, 0)
    steps = [logits]
    for t in range(7, 12):
        logits, cache = fwd_cached(jmodel, ids[:, t:t + 1], cache, t)
        steps.append(logits)
    assert max_diff(jnp.concatenate(steps, axis=1), full) <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_greedy_100_tokens_identical_to_pytorch_generator(style):
    from lmforge.generate import generate as torch_generate

    fields = {**STYLES[style], "context_length": 128}
    tm = torch_model(fields, seed=6, scale=6.0)
    jmodel = to_jax(tm)
    prompts = [[5, 9, 2, 7, 1, 30, 11], [3, 4]]  # different lengths: left padding in the batch
    want = torch_generate(tm, prompts, max_new_tokens=100, temperature=0)
    got = generate(jmodel, prompts, max_new_tokens=100, temperature=0)
    assert got == want and len(got[0]) == 100


def test_sampling_temperature_and_top_k():
    jmodel = build(ModelConfig(**GPT2), seed=7)
    prompt = [1, 2, 3]
    greedy = generate(jmodel, prompt, max_new_tokens=12)
    assert generate(jmodel, prompt, max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy
    a = generate(jmodel, prompt, max_new_tokens=12, temperature=1.5, seed=11)
    assert a == generate(jmodel, prompt, max_new_tokens=12, temperature=1.5, seed=11)
    assert a != generate(jmodel, prompt, max_new_tokens=12, temperature=1.5, seed=12)
    # top-k: every sampled token is among the k most likely given its prefix
    toks = generate(jmodel, prompt, max_new_tokens=12, temperature=2.0, top_k=3, seed=5)
    logits = fwd(jmodel, jnp.asarray([prompt + toks[:9]] * 3))[0]  # (12, V): the shape other tests compiled
    for i, tok in enumerate(toks[:9]):
        top3 = np.argsort(np.asarray(logits[len(prompt) - 1 + i]))[-3:]
        assert tok in top3


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


# ------------------------------------------------------------------------------ the learning path
SCRIPTS = ["01_bigram.py", "02_head.py", "03_multihead.py", "04_block.py", "05_gpt.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_learning_path_script_runs(script, tmp_path, monkeypatch, capsys):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40)
    (tmp_path / "tiny.txt").write_text(text)
    monkeypatch.setenv("LMFORGE_JAX_DATA", str(tmp_path / "tiny.txt"))
    monkeypatch.setenv("LMFORGE_JAX_STEPS", "3")
    monkeypatch.setenv("LMFORGE_JAX_SAMPLE", "20")
    runpy.run_path(str(REPO / "docs" / "jax" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 3/3: train loss" in out and "val loss" in out
    assert len(out.strip().splitlines()[-1]) > 0  # the sample
    assert os.environ["LMFORGE_JAX_STEPS"] == "3"


def test_train_backend_jax_runs_through_the_one_pipeline(tiny_config):
    from lmforge.tasks.run import run

    s = run(tiny_config("jx", train={"backend": "jax", "max_steps": 3, "eval_every": 3}), progress=False,
            print_fn=lambda *a, **k: None)
    assert s["steps"] == 3 and s["final_eval"]["val_loss"] > 0
    with pytest.raises(ConfigError, match="train.backend: jax trains task: pretrain only"):
        run(tiny_config("jx2", task="mlm", model={"arch": "encoder", "mlm_head": True}, train={"backend": "jax"}))
