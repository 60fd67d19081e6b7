"""The family presets have the published checkpoints' shapes (parameter counts equal to
transformers' models of the same config, built on the meta device); the RoPE scaling matches
transformers' own function; bad family fields and unexportable combinations are named."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, InteropError
from lmforge.interop.hf import config_from_hf, config_to_hf, export_hf
from lmforge.model import ModelConfig, build, count_parameters, flops_per_token
from lmforge.model.layers import RotaryEmbedding

tf = pytest.importorskip("transformers")

# preset -> published size as the model cards round it (Llama 3.2 1B 1.24B, 3B 3.21B, Llama 3.1 8B 8.03B,
# Qwen2.5 0.49B and 1.54B, Qwen3 0.6B and 1.7B, Gemma 3 268M and 1B, Gemma 3 4B's language model 3.88B),
# and half a unit of its last digit
PUBLISHED = {"llama-3.2-1b": (1.24e9, 5e6), "llama-3.2-3b": (3.21e9, 5e6), "llama-3.1-8b": (8.03e9, 5e6),
             "qwen2.5-0.5b": (0.49e9, 5e6), "qwen2.5-1.5b": (1.54e9, 5e6), "qwen3-0.6b": (0.6e9, 5e7),
             "qwen3-1.7b": (1.7e9, 5e7), "gemma-3-270m": (268e6, 5e5), "gemma-3-1b": (1.0e9, 5e7),
             "gemma-3-4b": (3.88e9, 5e6)}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_has_the_published_shape(preset):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        ours = build(cfg)
    hf = config_to_hf(cfg)  # the transformers config of the same shape
    hf_cfg = tf.AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        ref = tf.AutoModelForCausalLM.from_config(hf_cfg)
    n = count_parameters(ours)
    assert n == sum(p.numel() for p in ref.parameters())  # tied heads counted once on both sides
    size, half_unit = PUBLISHED[preset]
    assert abs(n - size) <= half_unit
    # a forward pass costs 2 FLOPs per matmul weight (the head included) at one token
    head = cfg.n_embd * cfg.vocab_size if cfg.tie_embeddings else 0  # a tied head is not counted twice
    matmul = count_parameters(ours, exclude_embeddings=True) + head
    assert flops_per_token(cfg, seq_len=1, training=False) == pytest.approx(2 * matmul, rel=1e-3)


def test_gemma_flops_count_three_mlp_matrices_and_windowed_attention():
    cfg = ModelConfig.from_preset("gemma-3-1b")
    C, H, L = cfg.n_embd, cfg.mlp_hidden, cfg.n_layer
    qkvo = C * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_head * cfg.head_dim * C
    n = L * (qkvo + 3 * C * H) + C * cfg.vocab_size
    keys = 4 * 4096 + 22 * 512  # 4 global layers see 4096 keys, 22 local layers their 512
    assert flops_per_token(cfg, seq_len=4096, training=False) == 2 * n + 2 * 2 * cfg.n_head * cfg.head_dim * keys


@pytest.mark.parametrize("scaling,head_dim,theta", [
    ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 64, 500000.0),  # Llama 3.2
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 128, 500000.0),  # Llama 3.1
    ({"rope_type": "linear", "factor": 8.0}, 256, 1000000.0),  # Gemma 3 4B global layers
])
def test_rope_scaling_matches_transformers(scaling, head_dim, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tf.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                        rope_parameters={**scaling, "rope_theta": theta})
    want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    ours = {"type": scaling["rope_type"], **{k: v for k, v in scaling.items() if k != "rope_type"}}
    got = RotaryEmbedding(head_dim, theta, ours).inv_freq
    plain = RotaryEmbedding(head_dim, theta).inv_freq
    assert torch.equal(got, want.float())
    assert not torch.equal(got, plain)


_SMALL = dict(vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=16, activation="swiglu", norm="rmsnorm",
              positional="rope", bias=False)


@pytest.mark.parametrize("fields,named", [
    (dict(layer_types=["local"]), "model.layer_types"),  # 1 entry for 2 layers
    (dict(layer_types=["local", "global"]), "model.sliding_window"),  # local layers without a window
    (dict(layer_types=["local", "sideways"], sliding_window=4), "model.layer_types"),
    (dict(global_every=2, layer_types=["local", "global"], sliding_window=4), "model.global_every"),
    (dict(sliding_window=0), "model.sliding_window"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "model.rope_scaling"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "model.rope_scaling.low_freq_factor"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "beta": 1}), "model.rope_scaling"),
    (dict(positional="learned", rope_scaling={"type": "linear", "factor": 2.0}), "model.rope_scaling"),
    (dict(head_size=0), "model.head_size"),
    (dict(head_size=7), "model.head_size"),  # odd: rope cannot rotate it
    (dict(n_embd=18, n_head=4), "model.n_embd"),  # not divisible and no head_size
    (dict(norm="layernorm", norm_unit_offset=True), "model.norm_unit_offset"),
    (dict(attn_softcap=-1.0), "model.attn_softcap"),
    (dict(qkv_bias="yes"), "model.qkv_bias"),
])
def test_bad_family_fields_are_named(fields, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        ModelConfig(**{**_SMALL, **fields})


def test_explicit_head_size_need_not_divide_the_width():
    model = build(ModelConfig(**{**_SMALL, "n_embd": 18, "n_head": 4, "head_size": 6, "qk_norm": True}))
    assert model.transformer.blocks[0].attn.qkv.out_features == (4 + 2 * 4) * 6
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 32)


@pytest.mark.parametrize("fields,named", [
    (dict(qk_norm=True, attn_softcap=50.0, norm_unit_offset=True, sandwich_norm=True, scale_embeddings=True,
          activation="geglu_tanh", tie_embeddings=True), "model.attn_softcap"),  # Gemma 3 has none
    (dict(qkv_bias=True, head_size=12), "model.head_size"),  # Qwen2 derives it
    (dict(layer_types=["local", "global"], sliding_window=4), "model.layer_types"),  # Llama has no windows
    (dict(qk_norm=True, rope_scaling={"type": "linear", "factor": 2.0}, sandwich_norm=True), "model.activation"),
    (dict(sandwich_norm=True, rope_scaling={"type": "linear", "factor": 2.0}), "model.rope_scaling"),  # Gemma 2
])
def test_export_names_what_the_target_family_lacks(tmp_path, fields, named):
    with pytest.raises(InteropError, match=named.replace(".", r"\.")):
        export_hf(build(ModelConfig(**{**_SMALL, **fields})), tmp_path / "out")


@pytest.mark.parametrize("hf,named", [
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"model_type": "gemma3_text", "hidden_activation": "silu"}, "hidden_activation"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gemma3_text", "rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters.sliding_attention"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": None, "num_hidden_layers": 2,
      "max_window_layers": 1}, "sliding_window"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"model_type": "llama", "layer_types": ["sliding_attention"], "num_hidden_layers": 1}, "layer_types"),
])
def test_unsupported_family_configs_are_named(hf, named):
    base = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64,
            "vocab_size": 64}
    with pytest.raises(InteropError, match=named):
        config_from_hf({**base, **hf})


def test_presets_import_from_their_own_export_config():
    """config.json -> ModelConfig -> config.json: every family preset survives the trip."""
    for preset in PUBLISHED:
        cfg = ModelConfig.from_preset(preset)
        back = config_from_hf(config_to_hf(cfg))
        for field in ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "head_dim", "activation", "qkv_bias",
                      "qk_norm", "sandwich_norm", "norm_unit_offset", "scale_embeddings", "attn_scale", "rope_theta",
                      "rope_scaling", "tie_embeddings", "sliding_window", "vocab_size", "context_length"):
            assert getattr(back, field) == getattr(cfg, field), (preset, field)
        assert [back.layer_type(i) for i in range(cfg.n_layer)] == [cfg.layer_type(i) for i in range(cfg.n_layer)]


# config.json of published checkpoints as written by transformers 4.x (older keys: rope_theta beside
# rope_scaling, Gemma's rope_local_base_freq and sliding_window_pattern), shortened to the keys that matter
_HUB_CONFIGS = {
    "llama-3.2-1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
                     "hidden_act": "silu", "tie_word_embeddings": True},
    "qwen3-0.6b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
                   "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28,
                   "attention_bias": False, "hidden_act": "silu", "tie_word_embeddings": True},
    "gemma-3-1b": {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
                   "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
                   "rope_local_base_freq": 10000, "rope_scaling": None, "sliding_window": 512,
                   "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
                   "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False},
}


@pytest.mark.parametrize("preset", list(_HUB_CONFIGS))
def test_published_config_json_imports_as_the_preset(preset):
    """The preset is what importing the real checkpoint's config gives, from the old keys and from
    the transformers-5 keys transformers itself rewrites them to."""
    old = _HUB_CONFIGS[preset]
    hf_cfg = tf.AutoConfig.for_model(**old)
    cfg = ModelConfig.from_preset(preset)
    for got in (config_from_hf(old), config_from_hf(hf_cfg.to_dict())):
        assert _computation(got) == _computation(cfg)


def _computation(c: ModelConfig) -> dict:
    """The fields that decide what a model computes, layer patterns spelled out per layer."""
    d = c.to_dict()
    d.update(layer_types=[c.layer_type(i) for i in range(c.n_layer)], head_size=c.head_dim,
             sliding_window=c.sliding_window if c.has_local_layers else None)
    for k in ("global_every", "name", "init_std"):
        del d[k]
    return d
