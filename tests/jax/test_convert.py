"""lmforge.jax.convert: weights both ways (identical tensors), model folders, a Hugging Face model into
JAX, mismatching shapes and unsupported configs named."""

from __future__ import annotations

import os

import pytest
import torch


# These tests spend most of their time compiling tiny programs: XLA's cheapest optimisation level
# compiles them in about 2/3 of the CPU time (the models are too small to notice at run time).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
jax = pytest.importorskip("jax")  # the extra is part of `make test`'s install; skipped only without it
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from lmforge.errors import ConfigError, InteropError  # noqa: E402
from lmforge.jax import (  # noqa: E402
    build, from_state_dict, load_jax, save_jax, to_jax, to_torch, torch_state_dict,
)
from lmforge.model import ModelConfig, build as torch_build  # noqa: E402
from tests.jax.jax_helpers import TOL, GPT2, LLAMA, STYLES, torch_model, fwd, t2n, max_diff  # noqa: E402


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
