"""lmforge.model.config: ModelConfig checks (every problem named, all at once), derived fields, YAML
round trip, presets by name."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lmforge.errors import ConfigError
from lmforge.model import PRESETS, ModelConfig, build

V, CTX = 37, 16  # tiny vocabulary and context shared by the test models
# Tiny versions of each family: same fields as the presets, a few thousand parameters.
GPT2 = dict(arch="decoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=2, n_embd=16,
            activation="gelu_tanh", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)
LLAMA = dict(arch="decoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
             activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positional="rope", bias=False,
             tie_embeddings=False)
BERT = dict(arch="encoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=2, n_embd=16, activation="gelu",
            norm="layernorm", norm_eps=1e-12, norm_position="post", embedding_norm=True, positional="learned",
            type_vocab_size=2, mlm_head=True, pooling="cls")
BIGRAM = dict(arch="bigram", vocab_size=V, context_length=CTX, n_layer=1, n_head=1, n_embd=V, positional="none")


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("gpt5")
    msg = str(e.value)
    assert "gpt5" in msg and "model.preset" in msg
    for name in PRESETS:
        assert name in msg
    with pytest.raises(ConfigError, match="gpt5"):
        build("gpt5")


def problems_of(**kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kw)
    assert str(e.value) == "; ".join(e.value.problems)
    return e.value.problems


def test_n_embd_not_divisible_by_n_head():
    (p,) = problems_of(n_embd=30, n_head=4)
    assert p.startswith("model.n_embd") and "30" in p and "n_head=4" in p


def test_n_head_not_divisible_by_n_kv_head():
    (p,) = problems_of(n_embd=32, n_head=4, n_kv_head=3)
    assert p.startswith("model.n_kv_head") and "n_kv_head=3" in p


def test_odd_head_size_with_rope():
    (p,) = problems_of(n_embd=12, n_head=4, positional="rope")
    assert p.startswith("model.n_embd") and "rope" in p
    ModelConfig(n_embd=12, n_head=4, positional="learned")  # fine without rope


@pytest.mark.parametrize("field, value", [
    ("activation", "tanh"), ("norm", "batchnorm"), ("positional", "alibi"), ("norm_position", "middle"),
    ("arch", "rnn"), ("pooling", "max"),
])
def test_bad_choice_named(field, value):
    (p,) = problems_of(**{field: value})
    assert p.startswith(f"model.{field}") and repr(value) in p


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("n_layer", -1), ("n_head", 2.0), ("context_length", True), ("dropout", 1.0),
    ("norm_eps", 0.0), ("init_std", -0.1), ("type_vocab_size", -1),
])
def test_bad_number_named(field, value):
    assert any(p.startswith(f"model.{field}") for p in problems_of(**{field: value}))


def test_arch_consistency():
    assert problems_of(arch="encoder", causal=True)[0].startswith("model.causal")
    assert problems_of(arch="decoder", causal=False)[0].startswith("model.causal")
    assert problems_of(mlm_head=True)[0].startswith("model.mlm_head")
    assert problems_of(positional="rope", rope_theta=0.0)[0].startswith("model.rope_theta")


def test_all_problems_in_one_error():
    ps = problems_of(activation="tanh", norm="batchnorm", positional="alibi", vocab_size=0, dropout=1.5)
    assert len(ps) == 5
    for field in ("activation", "norm", "positional", "vocab_size", "dropout"):
        assert any(p.startswith(f"model.{field}:") for p in ps), field
    ps = problems_of(n_embd=30, n_head=4, n_kv_head=3)  # two independent divisibility problems
    assert len(ps) == 2
    assert {p.split(":")[0] for p in ps} == {"model.n_embd", "model.n_kv_head"}


def test_derived_fields():
    assert ModelConfig(n_head=8).n_kv_head == 8
    assert ModelConfig(n_embd=128).mlp_hidden == 512
    assert ModelConfig(n_embd=96, activation="swiglu").mlp_hidden == 256  # 8/3 * 96 = 256, a multiple of 64
    assert ModelConfig(arch="encoder").causal is False and ModelConfig().causal is True
    assert ModelConfig(n_embd=96, n_head=3).head_dim == 32


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(name):
    cfg = ModelConfig.from_preset(name)
    back = ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_yaml_round_trip_tiny():
    for d in (GPT2, LLAMA, BERT, BIGRAM):
        cfg = ModelConfig(**d)
        assert ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_unknown_field_named():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**GPT2, "n_layers": 3, "heads": 2})
    assert len(e.value.problems) == 2
    assert "model.n_layers" in str(e.value) and "model.heads" in str(e.value)
    with pytest.raises(ConfigError, match="n_layers"):
        build({**GPT2, "n_layers": 3})
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_preset("baby", n_layers=3)
