"""GGUF export: tiny random decoders of each family written by lmforge and read back by lmforge's
importer and by transformers' GGUF loader (the oracle), f16/q8_0 against an independent
quantization of the same weights, the llama3 ``rope_freqs`` against llama.cpp's formula, the
tokenizer kinds, the metadata, and one-line errors for what GGUF cannot hold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmforge.errors import InputError, InteropError  # noqa: E402
from lmforge.interop.gguf import load_gguf, open_gguf, read_metadata  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.model import ModelConfig, build  # noqa: E402
from lmforge.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, train_tokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
LLAMA3 = {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
_BASE = dict(preset="llama-baby", n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=128, context_length=64,
             n_layer=2, norm_eps=1e-5, rope_theta=5000.0)
_GEMMA = dict(activation="geglu_tanh", qk_norm=True, sandwich_norm=True, norm_unit_offset=True,
              scale_embeddings=True, head_size=16, n_layer=6, global_every=6, sliding_window=4,
              rope_theta=1e6, rope_local_theta=10000.0, tie_embeddings=True, norm_eps=1e-6)
FAMILIES = {  # name -> (ModelConfig fields over _BASE, GGUF architecture)
    "llama-untied": (dict(tie_embeddings=False), "llama"),
    "llama-tied-mqa": (dict(tie_embeddings=True, n_kv_head=1), "llama"),
    "llama3-scaled": (dict(tie_embeddings=True, rope_theta=500000.0, head_size=64, n_head=2, n_kv_head=1,
                           rope_scaling=LLAMA3), "llama"),
    "qwen2-bias": (dict(qkv_bias=True, tie_embeddings=True, rope_theta=1e6), "qwen2"),
    "qwen3-qknorm": (dict(qk_norm=True, head_size=24, tie_embeddings=False, rope_theta=1e6), "qwen3"),
    "gemma3-window": (_GEMMA, "gemma3"),
    # Gemma 3 4B+: global layers' RoPE linearly scaled (rope.scaling.* keys), local layers' plain
    "gemma3-linear": (dict(_GEMMA, rope_scaling={"type": "linear", "factor": 8.0}), "gemma3"),
}


@pytest.fixture(scope="module")
def bpe():
    texts = ["the quick brown fox jumps over the lazy dog 12345 " * 20, "héllo wörld, ünïcode — ok?\n\tTabs  spaces"]
    tok = train_tokenizer("bpe", texts, vocab_size=300, min_frequency=1)
    tok.configure(eos_id=tok.special_tokens["<|end|>"], chat_template=TEMPLATE)
    return tok


def tiny(vocab: int, **fields) -> torch.nn.Module:
    """A random model of ``fields``; norm weights and biases moved off their init so that a
    misplaced norm, a missing +1 or a dropped bias shows in the logits."""
    torch.manual_seed(0)
    model = build(ModelConfig.coerce({**_BASE, "vocab_size": vocab, **fields})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def ids_for(vocab: int, T: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))


# ============================================================================ round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_logits_f32(tmp_path, bpe, family):
    fields, arch = FAMILIES[family]
    model = tiny(bpe.vocab_size + 5, **fields)  # + 5: a padded vocabulary ([PADn] tokens in the file)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    got = load_gguf(path)
    c, want = got.config, model.config
    assert c.name == f"gguf-{arch}" and c.tie_embeddings == want.tie_embeddings
    assert (c.head_dim, c.n_kv_head, c.vocab_size, c.qkv_has_bias, c.qk_norm) == \
        (want.head_dim, want.n_kv_head, want.vocab_size, want.qkv_has_bias, want.qk_norm)
    assert [c.layer_type(i) for i in range(c.n_layer)] == [want.layer_type(i) for i in range(want.n_layer)]
    assert torch.allclose(got.transformer.rope.inv_freq, model.transformer.rope.inv_freq, rtol=1e-6, atol=0)
    assert (got.config.rope_scaling or {}).get("type") == (want.rope_scaling or {}).get("type")
    with torch.no_grad():
        torch.testing.assert_close(got(ids_for(c.vocab_size)), model(ids_for(c.vocab_size)), atol=1e-4, rtol=0)


def _q8_0_reference(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 written from its definition (llama.cpp ggml-quants): per 32 values, d = max|x| / 127
    stored as f16, q = round(x / d) as int8; value = d * q."""
    x = w.double().numpy().reshape(-1, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    q = np.trunc(np.where(d == 0, 0, x / np.where(d == 0, 1, d)) + np.copysign(0.5, x))  # half away from 0
    return torch.from_numpy((d.astype(np.float16).astype(np.float64) * q).reshape(w.shape)).float()


def _stored(w: torch.Tensor, dtype: str) -> torch.Tensor:
    if w.dim() < 2:  # norms and biases stay float32
        return w
    if dtype == "q8_0" and w.shape[-1] % 32 == 0:
        return _q8_0_reference(w)
    return w.half().float()  # f16, and q8_0's fallback for rows that are not whole blocks


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("family,fields", [("llama-odd-ffn", dict(mlp_hidden=80)), ("gemma3", _GEMMA)])
def test_quantized_files_hold_exactly_the_quantized_weights(tmp_path, bpe, dtype, family, fields):
    """The imported model equals the original with each matrix rounded by an independent f16 /
    Q8_0 implementation (rows of 80 values in q8_0 fall back to f16): the quantization error
    and nothing else; the logits move by about that much."""
    model = tiny(bpe.vocab_size, **fields)
    got = load_gguf(export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe, dtype=dtype))
    ref = build(model.config).eval()
    with torch.no_grad():
        ref.load_state_dict({k: _stored(v, dtype) if ".norm" not in k and "norm." not in k else v
                             for k, v in model.state_dict().items()})
        ids = ids_for(bpe.vocab_size)
        torch.testing.assert_close(got(ids), ref(ids), atol=1e-4, rtol=0)
        drift = (got(ids) - model(ids)).abs().max().item()
    assert 1e-6 < drift < (0.01 if dtype == "f16" else 0.1)
    reader = open_gguf(tmp_path / "m.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == ("Q8_0" if dtype == "q8_0" else "F16")
    assert kinds["output_norm.weight"] == "F32"
    if family == "llama-odd-ffn":
        assert kinds["blk.0.ffn_down.weight"] == "F16" and kinds["blk.0.ffn_up.weight"] == kinds["token_embd.weight"]


@pytest.mark.parametrize("family", ["llama-untied", "llama-tied-mqa", "qwen2-bias", "qwen3-128", "gemma3-256"])
def test_transformers_gguf_loader_gives_the_same_logits(tmp_path, bpe, family):
    """transformers reads the file on its own (its q/k un-permutation, its Gemma norm offset, its
    config mapping). Its GGUF config mapping ignores attention.key_length, so Qwen3 heads take its
    default width 128 and Gemma 3 heads 256 (query_pre_attn_scalar 256; llama.cpp scales by
    1/sqrt(head size)): those two models have heads that wide here."""
    transformers = pytest.importorskip("transformers")
    fields = {"gemma3-256": dict(_GEMMA, head_size=256, n_head=2, n_kv_head=1),
              "qwen3-128": dict(FAMILIES["qwen3-qknorm"][0], head_size=128, n_head=2, n_kv_head=1)}.get(family)
    fields = fields or FAMILIES[family][0]
    model = tiny(bpe.vocab_size, **fields)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                            dtype=torch.float32).eval()
    ids = ids_for(bpe.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), atol=1e-4, rtol=0)


# ============================================================================ llama3 RoPE
def _llama_cpp_rope_factors(theta: float, dim: int, s: dict) -> list[float]:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3, restated from its definition."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], \
            s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
                (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return out


@pytest.mark.parametrize("scaling", [LLAMA3, dict(LLAMA3, factor=8.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                                  original_max_position_embeddings=4096)], ids=["meta", "other"])
def test_llama3_rope_freqs_tensor_matches_llama_cpp_and_reads_back(tmp_path, bpe, scaling):
    model = tiny(bpe.vocab_size, **dict(FAMILIES["llama3-scaled"][0], rope_scaling=scaling))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    reader = open_gguf(path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(np.asarray(freqs.data), _llama_cpp_rope_factors(500000.0, 64, scaling), rtol=1e-6)
    assert "llama.rope.scaling.type" not in read_metadata(reader)  # llama.cpp would apply a scaling type twice
    got = load_gguf(path)
    assert got.config.rope_scaling["type"] == "llama3" and got.config.rope_scaling["factor"] == scaling["factor"]
    ids = ids_for(bpe.vocab_size, 40)
    with torch.no_grad():
        torch.testing.assert_close(got(ids), model(ids), atol=1e-4, rtol=0)


# ============================================================================ tokenizers
def _hf_variant(bpe, pre: str) -> HFTokenizer:
    """The BPE vocabulary behind another byte-level pre-tokenizer, as Hugging Face writes it."""
    from lmforge.interop.gguf import PRE_TOKENIZERS

    d = json.loads(bpe.to_hf_json())
    digits, regex = PRE_TOKENIZERS[pre]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": regex is None}
    first = ({"type": "Digits", "individual_digits": True} if digits else
             {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False})
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [first, byte_level]}
    d["model"]["ignore_merges"] = pre == "llama-bpe"  # as Llama 3's tokenizer.json has it (and the importer)
    return HFTokenizer.from_str(json.dumps(d))


TEXTS = ["the quick brown fox", "héllo  wörld\n\n\ttabs", "12345 67 8", "", "  lead", "it's 1999's"]


@pytest.mark.parametrize("kind", ["bpe", "byte", "char", "hf-smollm", "hf-llama-bpe", "hf-qwen2"])
def test_tokenizer_round_trip_same_ids(tmp_path, bpe, kind):
    if kind == "bpe":
        tok, pre = bpe, "gpt2"
    elif kind == "byte":
        tok, pre = ByteTokenizer(), "gpt2"
    elif kind == "char":
        tok, pre = CharTokenizer.train(["the quick brown fox 1234567890 it's\n\t"]), "gpt2"
    else:
        pre = kind.removeprefix("hf-")
        tok = _hf_variant(bpe, pre)
    texts = TEXTS if kind != "char" else ["the fox", "it's 42\n\tox"]
    path = export_gguf(tiny(max(tok.vocab_size, 8)), tmp_path / "m.gguf", tokenizer=tok)
    meta = read_metadata(open_gguf(path))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == pre
    _, back = load_gguf(path, with_tokenizer=True)
    assert [back.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert [back.decode(tok.encode(t)) for t in texts] == texts
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_char_tokenizer_with_non_ascii_is_one_error(tmp_path):
    tok = CharTokenizer.train(["héllo"])
    with pytest.raises(InteropError, match="'é' is not ASCII"):
        export_gguf(tiny(tok.vocab_size), tmp_path / "m.gguf", tokenizer=tok)


# ============================================================================ metadata
def test_metadata_of_a_gemma3_file(tmp_path, bpe):
    model = tiny(bpe.vocab_size, **dict(_GEMMA, context_length=48, norm_eps=1e-6))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe, dtype="q8_0")
    meta = read_metadata(open_gguf(path))
    assert meta["general.architecture"] == "gemma3" and meta["general.file_type"] == 7  # MOSTLY_Q8_0
    expect = {"context_length": 48, "embedding_length": 64, "block_count": 6, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
              "attention.value_length": 16, "attention.sliding_window": 4, "rope.dimension_count": 16,
              "vocab_size": bpe.vocab_size}
    assert {k: meta[f"gemma3.{k}"] for k in expect} == expect
    assert meta["gemma3.rope.freq_base"] == 1e6
    assert meta["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert meta["tokenizer.chat_template"] == TEMPLATE
    assert meta["tokenizer.ggml.eos_token_id"] == bpe.eos_id and meta["tokenizer.ggml.add_bos_token"] is False
    types = meta["tokenizer.ggml.token_type"]
    assert types[bpe.eos_id] == 3 and types[bpe.encode("the")[0]] == 1  # CONTROL, NORMAL
    back, tok = load_gguf(path, with_tokenizer=True)
    assert back.config.context_length == 48 and tok.chat_template == TEMPLATE and tok.eos_id == bpe.eos_id


def test_metadata_of_a_llama_file(tmp_path, bpe):
    model = tiny(bpe.vocab_size, **FAMILIES["llama-untied"][0])
    meta = read_metadata(open_gguf(export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe, dtype="f16")))
    assert (meta["general.architecture"], meta["general.file_type"]) == ("llama", 1)  # MOSTLY_F16
    assert (meta["llama.context_length"], meta["llama.rope.freq_base"], meta["llama.rope.dimension_count"]) == \
        (64, 5000.0, 16)
    assert "llama.attention.key_length" not in meta  # the head size is n_embd / n_head


# ============================================================================ errors
def _lora(model):
    from lmforge.model.lora import LoraConfig, apply_lora

    return apply_lora(model, LoraConfig(rank=2, targets=("q", "v")))


@pytest.mark.parametrize("make,needle", [
    (lambda v: build(ModelConfig.from_preset("bert-mini", vocab_size=v, n_layer=1)), "model.arch: got 'encoder'"),
    (lambda v: tiny(v, num_classes=3, pooling="last"), "model.num_classes: got 3"),
    (lambda v: _lora(tiny(v)), "LoRA adapters: add --merge"),
    (lambda v: build(ModelConfig.from_preset("baby", vocab_size=v, n_layer=1)), "model.positional: got 'learned'"),
    (lambda v: tiny(v, **dict(_GEMMA, global_every=2)), "every 6th layer global"),
    (lambda v: tiny(v, attn_scale=0.5), "model.attn_scale: got 0.5"),
    (lambda v: tiny(v, qk_norm=True, rope_scaling=LLAMA3), "llama3 scaling is written for the llama"),
], ids=["encoder", "classifier", "lora", "gpt2-style", "gemma3-pattern", "attn-scale", "qwen3-llama3"])
def test_what_gguf_cannot_hold_is_one_error(tmp_path, bpe, make, needle):
    with pytest.raises(InteropError, match=needle.replace("(", r"\(")) as e:
        export_gguf(make(bpe.vocab_size), tmp_path / "m.gguf", tokenizer=bpe)
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


def test_bad_dtype(tmp_path, bpe):
    with pytest.raises(InputError, match="dtype: got 'q4_0', expected one of f32, f16, q8_0"):
        export_gguf(tiny(bpe.vocab_size), tmp_path / "m.gguf", tokenizer=bpe, dtype="q4_0")


# ============================================================================ the CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory, bpe):
    from lmforge.store import save_model

    folder = tmp_path_factory.mktemp("model") / "qwen3"
    model = tiny(bpe.vocab_size, **FAMILIES["qwen3-qknorm"][0])
    save_model(model, folder, tokenizer=bpe)
    return folder, model


def test_cli_export_gguf(tmp_path, saved, capsys):
    from lmforge.cli import main

    folder, model = saved
    out = tmp_path / "qwen3.gguf"
    assert main(["export", "--model", str(folder), "--format", "gguf", "--dtype", "f16", "--out", str(out)]) == 0
    assert "GGUF, f16" in capsys.readouterr().out
    got, tok = load_gguf(out, with_tokenizer=True)
    assert tok.chat_template == TEMPLATE
    ids = ids_for(model.config.vocab_size)
    with torch.no_grad():
        assert (got(ids) - model(ids)).abs().max() < 0.01


def test_cli_lora_model_exports_only_merged(tmp_path, bpe, capsys):
    from lmforge.cli import main
    from lmforge.store import save_model

    model = _lora(tiny(bpe.vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.3)  # adapters that change the logits
    folder = save_model(model, tmp_path / "lora", tokenizer=bpe)
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(folder), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "add --merge" in err and err.count("\n") == 1 and not out.exists()
    assert main(["export", "--model", str(folder), "--format", "gguf", "--merge", "--out", str(out)]) == 0
    ids = ids_for(bpe.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(out)(ids), model(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("argv,needle", [
    (["--format", "gguf", "--dtype", "q4"], "--dtype: got 'q4', expected one of f32, f16, q8_0"),
    (["--dtype", "f16"], "--dtype f16: applies to --format gguf"),
])
def test_cli_bad_dtype_is_one_line(tmp_path, saved, capsys, argv, needle):
    from lmforge.cli import main

    code = main(["export", "--model", str(saved[0]), *argv, "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


# ============================================================================ the real model
@pytest.mark.slow
def test_smollm2_reexported_matches_llama_cpps_own_file(tmp_path):
    """SmolLM2's Q4_1 file (written by llama.cpp's converter), dequantized by lmforge and exported
    as f32: the same tokenizer metadata as llama.cpp wrote, the same config keys, and lmforge
    reads back exactly the model it exported."""
    from tests.smollm2_file import require_smollm2

    src = require_smollm2()
    model, tok = load_gguf(src, with_tokenizer=True)
    path = export_gguf(model, tmp_path / "smollm2.gguf", tokenizer=tok)
    theirs, ours = read_metadata(open_gguf(src)), read_metadata(open_gguf(path))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count"):
        assert ours[key] == theirs[key], key
    back, back_tok = load_gguf(path, with_tokenizer=True)
    ids = back_tok.encode("The capital of France is")
    assert ids == tok.encode("The capital of France is")
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids])), model(torch.tensor([ids])), atol=1e-5, rtol=0)
