"""Llama 3, Qwen2.5, Qwen3, Gemma 2/3 as configurations of lmforge's one set of blocks, checked
against transformers as the oracle.

transformers builds a random-weight model of each family from its own config class (several tiny
shapes: GQA, MQA, odd head counts, tied and untied heads, an explicit head size, sliding windows
of 4-6 tokens so local layers are checked past their window) and saves it; lmforge imports the
folder and must give the same logits (plain, left-padded and right-padded batches), the same 64
greedy tokens (KV-cache decoding through the windows), and an export that transformers loads
with the same logits. LoRA adapters export to PEFT, which loads them on the transformers model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.generate import generate
from lmforge.interop.hf import export_hf, load_hf, read_hf_weights
from lmforge.model import KVCache, ModelConfig, build
from lmforge.model.lora import LoraConfig, apply_lora, export_peft

tf = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 96
CTX = 128

# (HF config class, its fields): every family at two or three shapes
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}  # short, so all three frequency bands occur
CASES = {
    # Llama 3.x: llama3 RoPE scaling; GQA tied, MQA untied with 3 heads
    "llama3-gqa-tied": ("LlamaConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama3-mqa-untied": ("LlamaConfig", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                              rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0,
                                              tie_word_embeddings=False)),
    # Qwen2.5: q/k/v biases; GQA untied, MHA with 3 heads tied, and sliding-window layers
    "qwen2-gqa": ("Qwen2Config", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                      tie_word_embeddings=False)),
    "qwen2-mha-tied-window": ("Qwen2Config", dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=3,
                                                  tie_word_embeddings=True, use_sliding_window=True,
                                                  sliding_window=5, max_window_layers=1)),
    # Qwen3: q/k norm; head_dim 16 != 32/4 with MQA, 5 heads of 12 tied
    "qwen3-mqa": ("Qwen3Config", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "qwen3-odd-tied": ("Qwen3Config", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5,
                                           head_dim=12, tie_word_embeddings=True)),
    # a sliding-window layer sharing the (llama3-scaled) RoPE of the global one
    "qwen3-window-scaled": ("Qwen3Config", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=8, use_sliding_window=True, sliding_window=5,
                                                max_window_layers=1, rope_scaling=_LLAMA3_ROPE)),
    # Gemma 3: local layers of window 4 (every 2nd global), linearly scaled global RoPE, logit
    # soft-capping, query_pre_attn_scalar 12, untied; then MQA with 3 heads of 16, tied, window 6
    "gemma3-window4": ("Gemma3TextConfig", dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                                num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                sliding_window_pattern=2, query_pre_attn_scalar=12,
                                                final_logit_softcapping=30.0, tie_word_embeddings=False,
                                                rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "gemma3-mqa-tied": ("Gemma3TextConfig", dict(num_hidden_layers=3, hidden_size=24, num_attention_heads=3,
                                                 num_key_value_heads=1, head_dim=16, sliding_window=6,
                                                 sliding_window_pattern=3, query_pre_attn_scalar=16,
                                                 tie_word_embeddings=True)),
    # Gemma 2: attention soft-capping (Gemma 3's transformers attention has none)
    "gemma2-softcap": ("Gemma2Config", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8, sliding_window=5,
                                            query_pre_attn_scalar=8, attn_logit_softcapping=2.0,
                                            final_logit_softcapping=30.0, tie_word_embeddings=False)),
}


def _hf_config(name: str):
    cls, fields = CASES[name]
    base = dict(num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=CTX,
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return getattr(tf, cls)(**{**base, **copy.deepcopy(fields)})  # transformers edits rope dicts in place


def _perturb(model, seed: int = 0, scale: float = 0.5):
    """Move every parameter off its init (zero norms, zero biases) so layout mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(name)`` -> (transformers model, its folder, lmforge model), built once per module."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            cfg = _hf_config(name)
            ref = _perturb(tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"))
            folder = tmp_path_factory.mktemp(name)
            ref.save_pretrained(folder)
            made[name] = (ref, folder, load_hf(folder))
        return made[name]

    return get


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_transformers_logits(family, name):
    ref, _, ours = family(name)
    ids = _ids(2, 15, 1)  # longer than every window
    with torch.no_grad():
        assert _diff(ours(ids), ref(ids).logits) <= TOL
        # left padding: lmforge derives positions from the mask; the reference is given them
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        mask[1, :2] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        real = mask.bool()
        got = ours(ids, attention_mask=mask)
        assert _diff(got[real], ref(ids, attention_mask=mask, position_ids=pos).logits[real]) <= TOL
        # right padding: positions 0..T-1 on both sides
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        real = mask.bool()
        assert _diff(ours(ids, attention_mask=mask)[real], ref(ids, attention_mask=mask).logits[real]) <= TOL


def test_imported_fields_name_each_family(family):
    c = family("llama3-gqa-tied")[2].config
    assert c.rope_scaling == {"type": "llama3", **{k: v for k, v in _LLAMA3_ROPE.items() if k != "rope_type"}}
    assert c.tie_embeddings and c.head_size is None and not c.qk_norm
    c = family("qwen2-gqa")[2].config
    assert (c.qkv_bias, c.bias, c.qk_norm, c.layer_types) == (True, False, False, None)
    c = family("qwen2-mha-tied-window")[2].config
    assert (c.layer_types, c.sliding_window, c.rope_local_theta) == (["global", "local"], 5, None)
    c = family("qwen3-mqa")[2].config
    assert (c.qk_norm, c.head_size, c.head_dim, c.n_kv_head) == (True, 16, 16, 1)
    c = family("gemma3-window4")[2].config
    assert (c.activation, c.sandwich_norm, c.norm_unit_offset, c.scale_embeddings, c.qk_norm) == \
        ("geglu_tanh", True, True, True, True)
    assert (c.layer_types, c.sliding_window, c.rope_local_theta, c.rope_theta) == \
        (["local", "global", "local", "global"], 4, 10000.0, 1000000.0)
    assert (c.attn_scale, c.logit_softcap, c.rope_scaling) == (12 ** -0.5, 30.0, {"type": "linear", "factor": 4.0})
    c = family("gemma2-softcap")[2].config
    assert (c.qk_norm, c.attn_softcap, c.rope_local_theta) == (False, 2.0, None)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["llama3-mqa-untied", "qwen2-mha-tied-window", "qwen3-odd-tied", "gemma3-window4",
                                  "gemma2-softcap"])
def test_greedy_kv_cache_generation_matches_transformers(family, name):
    """64 greedy tokens through the KV cache: local layers keep seeing only their window. (A tied
    tiny Gemma repeats one token, its scaled embedding dominating: the untied ones are used.)"""
    ref, _, ours = family(name)
    prompts = [_ids(1, 7, 3)[0].tolist(), _ids(1, 3, 4)[0].tolist()]
    got = generate(ours, prompts, max_new_tokens=64, temperature=0.0)
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[:, L:]
    assert all(len(set(row)) >= 8 for row in got)  # not stuck on one token: a real check
    assert got == want.tolist()


@pytest.mark.parametrize("name", ["gemma3-window4", "qwen2-mha-tied-window"])
def test_cached_decode_equals_full_forward_past_the_window(family, name):
    """One token at a time through the cache gives the full forward's logits at every position."""
    ours = family(name)[2]
    ids = _ids(2, 20, 5)
    cache = KVCache.for_model(ours, 2, 32)
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :6], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(6, 20)]
    assert _diff(torch.cat(steps, 1), full) <= TOL


def test_a_local_layer_does_not_see_past_its_window():
    cfg = ModelConfig(vocab_size=VOCAB, context_length=CTX, n_layer=1, n_head=2, n_embd=16, activation="swiglu",
                      norm="rmsnorm", positional="rope", bias=False, layer_types=["local"], sliding_window=4)
    model = build(cfg).eval()
    ids = _ids(1, 12, 6)
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(other)
    moved = (a - b).abs().amax(-1)[0]  # (T,)
    assert moved[:4].min() > 0 and moved[4:].max() == 0  # positions 0..3 see token 0; 4.. do not


# ------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_the_same_logits(family, tmp_path, name):
    ref, folder, ours = family(name)
    out = export_hf(ours, tmp_path / "out")
    back = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back).__name__ == type(ref).__name__
    ids = _ids(2, 15, 7)
    with torch.no_grad():
        assert _diff(back(ids).logits, ours(ids)) <= TOL
    # HF -> lmforge -> HF gives back the very tensors (a tied head is left out by both)
    a, b = read_hf_weights(folder), read_hf_weights(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("name", ["llama3-gqa-tied", "qwen2-gqa", "qwen3-mqa", "gemma3-window4", "gemma2-softcap"])
def test_peft_export_loads_in_peft_with_the_same_logits(family, tmp_path, name):
    peft = pytest.importorskip("peft")
    ref, folder, _ = family(name)
    ours = load_hf(folder)  # a fresh copy: adapters go on this one
    apply_lora(ours, LoraConfig(rank=4, alpha=8, targets=("all",)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    export_peft(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    base = tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = _ids(2, 11, 8)
    with torch.no_grad():
        got, want = ours(ids), adapted(ids).logits
        assert _diff(got, ref(ids).logits) > 1e-2  # the adapters do change the model
    assert _diff(got, want) <= TOL


@pytest.mark.parametrize("targets,expected", [
    (("q_proj", "v_proj"), {"attn.qkv": ["q", "v"]}),
    (("gate_proj", "down_proj"), {"mlp.fc": ["gate"], "mlp.proj": ["out"]}),
    (("up",), {"mlp.fc": ["up"]}),
    (("mlp_in", "o"), {"attn.proj": ["o"], "mlp.fc": ["gate", "up"]}),
    (("mlp",), {"mlp.fc": ["gate", "up"], "mlp.proj": ["out"]}),
])
@pytest.mark.parametrize("preset", ["llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "gemma-3-270m"])
def test_lora_targets_by_role_in_every_family(preset, targets, expected):
    shrink = dict(vocab_size=64, context_length=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_hidden=48)
    if ModelConfig.from_preset(preset).head_size is not None:
        shrink["head_size"] = 8
    cfg = ModelConfig.from_preset(preset, **shrink)
    model = apply_lora(build(cfg), LoraConfig(rank=2, targets=targets))
    found = {n.split(".", 3)[3]: list(m.lora) for n, m in model.named_modules() if hasattr(m, "lora")
             and n.startswith("transformer.blocks.0.")}
    assert found == expected


def test_gpt2_and_bert_layer_names_are_roles_too():
    gpt2 = apply_lora(build("baby"), LoraConfig(rank=2, targets=("c_attn", "c_fc")))
    assert gpt2.transformer.blocks[0].attn.qkv.slices.keys() == {"q", "k", "v"}
    assert list(gpt2.transformer.blocks[0].mlp.fc.lora) == ["in"]
    bert = apply_lora(build("bert-mini"), LoraConfig(rank=2, targets=("query", "value")))
    assert list(bert.transformer.blocks[0].attn.qkv.lora) == ["q", "v"]


@pytest.mark.parametrize("name", ["qwen3-mqa", "gemma3-mqa-tied"])
def test_base_model_folder_gives_the_same_hidden_states(tmp_path, name):
    """A folder of the base model (Qwen3Model, Gemma3TextModel: no LM head) imports too."""
    torch.manual_seed(0)
    ref = _perturb(tf.AutoModel.from_config(_hf_config(name), attn_implementation="eager"))
    ref.save_pretrained(tmp_path / "base")
    ours = load_hf(tmp_path / "base")
    ids = _ids(2, 15, 9)
    with torch.no_grad():
        assert _diff(ours.hidden_states(ids), ref(ids).last_hidden_state) <= TOL
