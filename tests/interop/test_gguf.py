"""GGUF import: dequantization against closed forms, the llama.cpp q/k permutation, a tiny random
Llama written with gguf's own writer and read back, clear errors, and the real SmolLM2 file
against transformers (skipped when the file is not installed)."""

from __future__ import annotations

import copy
import json
import random
import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tests.smollm2_file import require_smollm2  # noqa: E402

from lmforge import from_pretrained  # noqa: E402
from lmforge.errors import CheckpointError, InteropError  # noqa: E402
from lmforge.interop.gguf import dequantize, load_gguf, permute_qk, unpermute_qk  # noqa: E402
from lmforge.model import ModelConfig, build  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# ============================================================================ dequantization
def _f16(rng, n):  # finite, moderate fp16 scales as raw bytes
    return rng.uniform(-0.1, 0.1, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def _closed_form(qtype, raw: np.ndarray) -> np.ndarray:
    """Reference decoding of GGML blocks, written from the block layouts (llama.cpp ggml-quants)."""
    if qtype == Q.F32:
        return raw.view(np.float32)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == Q.BF16:  # the upper 16 bits of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(-1, {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype])
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    if qtype == Q.Q8_0:
        return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) if qtype == Q.Q4_1 else None
    qs = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]  # 16 bytes: 32 nibbles
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # low nibbles first
    return (q * d + m if qtype == Q.Q4_1 else (q - 8) * d).reshape(-1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_dequantize_random_blocks_matches_closed_form(qtype):
    rng = np.random.default_rng(int(qtype))
    n_blocks = 64
    if qtype == Q.F32:
        raw = rng.standard_normal(n_blocks * 32).astype(np.float32).view(np.uint8)
    elif qtype in (Q.F16, Q.BF16):
        vals = rng.standard_normal(n_blocks * 32).astype(np.float32)
        raw = (vals.astype(np.float16).view(np.uint8) if qtype == Q.F16
               else (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    else:
        size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
        raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
        raw[:, :2] = _f16(rng, n_blocks)  # scales must be finite numbers
        if qtype == Q.Q4_1:
            raw[:, 2:4] = _f16(rng, n_blocks)
        raw = raw.reshape(-1)
    ours = dequantize(raw.reshape(4, -1).copy(), qtype)  # 4 rows of bytes -> 4 rows of values
    assert ours.shape == (4, n_blocks * 8) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours.reshape(-1), _closed_form(qtype, raw))


def test_unsupported_quantization_is_named():
    raw = np.zeros((2, 40), dtype=np.uint8)  # Q8_1: 32 values in 40 bytes, no dequantizer
    with pytest.raises(InteropError, match="Q8_1"):
        dequantize(raw, Q.Q8_1, "blk.0.attn_q.weight")


# ============================================================================ permutation
def _rope_interleaved(x, pos, theta=10000.0):
    """llama.cpp's RoPE: rotate adjacent pairs (x[2i], x[2i+1]) by pos * theta^(-2i/hs)."""
    hs = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def _rope_half(x, pos, theta=10000.0):
    """Hugging Face / lmforge RoPE: rotate pairs (x[i], x[i + hs/2])."""
    hs = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = torch.cat([ang, ang])
    x1, x2 = x.chunk(2, -1)
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


@pytest.mark.parametrize("n_head", [1, 3])
def test_qk_permutation_round_trip_and_meaning(n_head):
    hs, C = 8, 5
    w = torch.randn(n_head * hs, C, dtype=torch.float64)
    assert torch.equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    assert not torch.equal(permute_qk(w, n_head), w)
    # what the permutation is for: interleaved RoPE on permuted rows == rotate-half RoPE, permuted
    x = torch.randn(C, dtype=torch.float64)
    for pos in (0, 1, 7):
        q = (w @ x).view(n_head, hs)
        q_cpp = (permute_qk(w, n_head) @ x).view(n_head, hs)
        expect = permute_qk(_rope_half(q, pos).reshape(-1, 1), n_head).view(n_head, hs)
        torch.testing.assert_close(_rope_interleaved(q_cpp, pos), expect)


# ============================================================================ a tiny llama file
@pytest.fixture(scope="module")
def bpe():
    texts = ["the quick brown fox jumps over the lazy dog 12345 " * 20, "héllo wörld, ünïcode — ok?\n\tTabs  spaces"]
    return train_tokenizer("bpe", texts, vocab_size=300, min_frequency=1)


def _tiny_model(vocab: int, tie: bool, n_kv: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-baby", vocab_size=vocab, n_embd=64, n_head=4, n_kv_head=n_kv,
                                  mlp_hidden=128, context_length=128, n_layer=2, tie_embeddings=tie,
                                  norm_eps=1e-5, rope_theta=5000.0)
    model = build(cfg).eval()
    with torch.no_grad():  # RMSNorm weights away from 1, so a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, q/k rows permuted as its converter does."""
    cfg, sd = model.config, model.state_dict()
    hd = cfg.head_dim
    out = {"token_embd.weight": sd["transformer.tok_emb.weight"], "output_norm.weight": sd["transformer.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, g = f"transformer.blocks.{i}.", f"blk.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].split([cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd])
        gate, up = sd[b + "mlp.fc.weight"].chunk(2)
        out.update({g + "attn_norm.weight": sd[b + "norm1.weight"], g + "attn_q.weight": permute_qk(q, cfg.n_head),
                    g + "attn_k.weight": permute_qk(k, cfg.n_kv_head), g + "attn_v.weight": v,
                    g + "attn_output.weight": sd[b + "attn.proj.weight"], g + "ffn_norm.weight": sd[b + "norm2.weight"],
                    g + "ffn_gate.weight": gate, g + "ffn_up.weight": up, g + "ffn_down.weight": sd[b + "mlp.proj.weight"]})
    return out


def write_gguf(path, model, tok, qtype=Q.F32, arch="llama", extra: dict | None = None, drop: str | None = None):
    """A .gguf file of ``model`` and ``tok`` written with gguf's GGUFWriter (2-D weights in ``qtype``)."""
    from gguf import GGUFWriter
    from gguf.quants import quantize

    cfg = model.config
    w = GGUFWriter(str(path), arch)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    hf = tok.to_dict()["hf_tokenizer"]
    vocab = hf["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.special_tokens else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.special_tokens["<|bos|>"])
    w.add_eos_token_id(tok.special_tokens["<|end|>"])
    w.add_chat_template(TEMPLATE)
    tensors = {k: v.float().numpy() for k, v in _gguf_tensors(model).items() if k != drop}
    for name, arr in {**tensors, **(extra or {})}.items():
        if arr.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie,n_kv", [(False, 2), (True, 1), (False, 4)], ids=["untied-gqa", "tied-mqa", "untied-mha"])
def test_tiny_llama_round_trip_logits(tmp_path, bpe, tie, n_kv):
    model = _tiny_model(bpe.vocab_size, tie, n_kv)
    path = write_gguf(tmp_path / "tiny.gguf", model, bpe)
    got = load_gguf(path)
    c = got.config
    assert (c.n_kv_head, c.tie_embeddings, c.rope_theta, c.norm_eps, c.mlp_hidden) == (n_kv, tie, 5000.0, 1e-5, 128)
    ids = torch.randint(0, bpe.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(got(ids), model(ids), atol=1e-5, rtol=0)
    if tie:
        assert got.lm_head.weight is got.transformer.tok_emb.weight


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_tiny_llama_matches_transformers(tmp_path, bpe, qtype):
    """Each quantization, read by lmforge and by transformers' GGUF loader: the same logits."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_model(bpe.vocab_size, tie=False)
    path = write_gguf(tmp_path / "tiny.gguf", model, bpe, qtype)
    got = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                            torch_dtype=torch.float32).eval()
    ids = torch.randint(0, bpe.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = got(ids), ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if qtype != Q.F16:  # quantization moved the weights, and the logits with them
        assert (ours - model(ids)).abs().max() > 1e-6


def test_tokenizer_and_template_from_gguf(tmp_path, bpe):
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model(bpe.vocab_size, True), bpe)
    _, tok = load_gguf(path, with_tokenizer=True)
    texts = ["the quick brown fox", "héllo  wörld\n\n\ttabs", "<|user|>hi<|end|>", "12345 67", "", "  lead"]
    assert [tok.encode(t) for t in texts] == [bpe.encode(t) for t in texts]
    assert tok.eos_id == bpe.special_tokens["<|end|>"] and tok.bos_id == bpe.special_tokens["<|bos|>"]
    assert tok.chat_template == TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_from_pretrained_and_cli_info_on_gguf(tmp_path, bpe, capsys):
    from lmforge.cli import main

    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model(bpe.vocab_size, False), bpe)
    model, tok = from_pretrained(path, with_tokenizer=True)
    assert model.config.name == "gguf-llama" and tok.vocab_size == bpe.vocab_size
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["n_kv_head"] == 2


# ============================================================================ bad files
def test_not_gguf_and_truncated_files_are_checkpoint_errors(tmp_path, bpe):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(bad)
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model(bpe.vocab_size, False), bpe)
    data = path.read_bytes()
    for cut in (8, len(data) // 3, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_gguf(tmp_path / "cut.gguf")
    with pytest.raises(CheckpointError, match="no such file"):
        from_pretrained(tmp_path / "absent.gguf")


def test_unsupported_architecture_and_quant_type_are_named(tmp_path, bpe):
    model = _tiny_model(bpe.vocab_size, False)
    with pytest.raises(InteropError, match="'phi2'"):
        load_gguf(write_gguf(tmp_path / "phi.gguf", model, bpe, arch="phi2"))
    from gguf import GGUFWriter  # a file with a Q8_1 tensor: a type gguf cannot dequantize

    path = tmp_path / "q81.gguf"
    w = GGUFWriter(str(path), "llama")
    for add, v in ((w.add_embedding_length, 64), (w.add_block_count, 1), (w.add_feed_forward_length, 128),
                   (w.add_head_count, 4)):
        add(v)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 2 * 40), dtype=np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InteropError, match="Q8_1"):
        load_gguf(path)


def test_missing_and_extra_tensors(tmp_path, bpe):
    model = _tiny_model(bpe.vocab_size, False)
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight is missing"):
        load_gguf(write_gguf(tmp_path / "a.gguf", model, bpe, drop="blk.1.ffn_up.weight"))
    extra = {"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)}
    with pytest.raises(InteropError, match="blk.0.attn_q.bias"):
        load_gguf(write_gguf(tmp_path / "b.gguf", model, bpe, extra=extra))


# ============================================================================ the real model
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village"]


@pytest.fixture(scope="module")
def smollm2():
    path = require_smollm2()
    model, tok = load_gguf(path, with_tokenizer=True)
    return path, model, tok


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    """transformers' own GGUF loading of the same file (its reader given lmforge's plain-array view
    of the file mapping, which parses the same bytes 4-5x faster than through np.memmap)."""
    transformers = pytest.importorskip("transformers")
    from lmforge.interop.gguf import reader_class

    path = smollm2[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader_class())
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  torch_dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_smollm2_config(smollm2):
    _, model, tok = smollm2
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and tok.vocab_size == 49152
    assert tok.id_to_token(tok.eos_id) == "<|im_end|>" and "<|im_start|>" in tok.chat_template


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    _, model, tok = smollm2
    hf_model, hf_tok = hf_smollm2
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        assert ids == hf_tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ours, theirs = model(torch.tensor([ids])), hf_model(torch.tensor([ids])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4


def _varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["Hello", " world", "  ", "\n", "\n\n", "\t", "   \n  ", "12", "2024", "3.14159", "é", "ü", "中文",
              "日本語", "🙂", "👩‍💻", "Ω", "ß", "'s", "'ll", "don't", "I'M", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "<repo_name>", "#", "def f(x):", "->", "==", "http://x.org/a?b=1", "naïve", "café",
              "—", "…", "\u00a0", "\u200b", "\r\n", "ABC", "a" * 7, "Ĝ", "Ġ", "user", "assistant"]
    out = []
    for _ in range(n):
        k = rng.randint(1, 8)
        out.append("".join(rng.choice(pieces) for _ in range(k)))
    return out


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_on_1000_strings(smollm2, hf_smollm2):
    """Vocabulary, merges and special tokens as transformers reads them from the file, with the
    pre-tokenizer the file names (``tokenizer.ggml.pre = smollm``: digits split one by one, then
    GPT-2's split, as llama.cpp and the original SmolLM2 tokenizer do). transformers' GGUF
    converter ignores that key and uses GPT-2's split alone; the strings where that differs all
    hold a digit after whitespace (or "\r\n")."""
    from tokenizers import pre_tokenizers

    _, _, tok = smollm2
    _, hf_tok = hf_smollm2
    texts = _varied_strings(1000)
    ours = tok.encode_batch(texts)
    plain = [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    backend = copy.deepcopy(hf_tok.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    theirs = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    bad = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    assert all(tok.decode(ids, skip_special_tokens=False) == t for ids, t in zip(ours, texts))
    differ = [t for t, a, b in zip(texts, ours, plain) if a != b]
    assert all(re.search(r"\s\d", t) for t in differ), differ[:3]


def test_smollm2_answers_paris(smollm2):
    from lmforge.chat import render
    from lmforge.generate import generate_text

    _, model, tok = smollm2
    prompt = render([{"role": "user", "content": "What is the capital of France?"}], tok, add_generation_prompt=True)
    answer = generate_text(model, tok, prompt, max_new_tokens=12, temperature=0)
    assert "Paris" in answer, answer


def test_smollm2_chat_spans_and_masking(smollm2):
    """The real template inserts a default system turn; assistant turns train on their content and
    <|im_end|>, nothing else."""
    from lmforge.chat import render_with_spans
    from lmforge.data.sft_format import IGNORE, tokenize_chat

    _, _, tok = smollm2
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    chat = render_with_spans(msgs, tok)
    first = chat.text[chat.spans[0].start:chat.spans[0].end]
    assert first.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM") and \
        first.endswith("<|im_start|>user\nHi<|im_end|>\n")
    ex = tokenize_chat(tok, msgs)
    trained = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE], skip_special_tokens=False)
    assert trained == "Hello! How can I help?<|im_end|>\nParis.<|im_end|>\n"


def test_gguf_model_exports_to_hf_with_its_chat_template(tmp_path, bpe):
    """GGUF -> lmforge -> Hugging Face folder: transformers reads the chat template and eos, and
    lmforge reads them back from tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    from lmforge.interop.hf import export_hf, load_hf

    model, tok = load_gguf(write_gguf(tmp_path / "tiny.gguf", _tiny_model(bpe.vocab_size, True), bpe),
                           with_tokenizer=True)
    out = export_hf(model, tmp_path / "hf", tokenizer=tok)
    msgs = [{"role": "user", "content": "hi there"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert hf_tok.eos_token == "<|end|>"
    _, back = load_hf(out, with_tokenizer=True)
    assert back.chat_template == TEMPLATE and back.eos_id == tok.eos_id and back.fingerprint() == tok.fingerprint()


def test_cli_generate_chat_and_chat_on_a_gguf(tmp_path, bpe, capsys, monkeypatch):
    import io

    from lmforge.cli import main

    path = str(write_gguf(tmp_path / "tiny.gguf", _tiny_model(bpe.vocab_size, False), bpe))
    assert main(["generate", "--model", path, "--chat", "--prompt", "hi", "--temperature", "0",
                 "--max-new-tokens", "4"]) == 0
    assert "<|user|>" not in capsys.readouterr().out  # the template is the prompt, not echoed
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/max_tokens 3\nagain\n/quit\n"))
    assert main(["chat", "--model", path, "--temperature", "0", "--max-tokens", "4", "--system", "Be kind."]) == 0
    out = capsys.readouterr().out
    assert "context 128 tokens" in out and "[max_tokens = 3]" in out
    assert main(["chat", "--model", path, "--top-p", "1.5"]) == 2
    assert "--top-p: got '1.5', expected a number in (0, 1]" in capsys.readouterr().err


# ============================================================================ quantized loading
def _linear_weights(model) -> dict[str, torch.Tensor]:
    """Every linear layer's fp32 weight: a plain layer's own, a quantized one's dequantized."""
    from lmforge.model.quantize import Int4Linear, Int8Linear

    return {name: m.dequantized() if isinstance(m, (Int4Linear, Int8Linear)) else m.weight
            for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Int4Linear, Int8Linear))}


@pytest.mark.parametrize("qtype,kind", [(Q.Q4_0, "int4"), (Q.Q4_1, "int4"), (Q.Q8_0, "int8")],
                         ids=["Q4_0-int4", "Q4_1-int4", "Q8_0-int8"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_blocks_load_into_quantized_layers_exactly(tmp_path, bpe, qtype, kind, tie):
    """The int4/int8 layers made from a file's blocks dequantize to exactly gguf's values (the fp32
    load dequantizes with ``gguf.quants.dequantize``), and the models' logits agree to fp32 rounding."""
    from lmforge.model.quantize import Int4Linear, Int8Embedding, Int8Linear

    model = _tiny_model(bpe.vocab_size, tie=tie)
    path = write_gguf(tmp_path / "tiny.gguf", model, bpe, qtype)
    ref, got = load_gguf(path), load_gguf(path, quantize=kind)
    block = Int4Linear if kind == "int4" else Int8Linear
    assert isinstance(got.transformer.blocks[0].mlp.fc, block) and isinstance(got.lm_head, Int8Linear)
    assert isinstance(got.transformer.tok_emb, Int8Embedding) == tie
    want = _linear_weights(ref)
    for name, w in _linear_weights(got).items():
        if name == "lm_head" and kind == "int4" and qtype != Q.Q8_0:
            continue  # the output matrix is rounded to int8 (Q4 blocks do not fit the int8 layout)
        assert torch.equal(w, want[name]), name
    ids = torch.randint(0, bpe.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = got(ids), ref(ids)
    tol = 1e-4 if kind == "int8" or qtype == Q.Q8_0 else 0.05 * theirs.abs().max()  # int4: the head re-rounded
    torch.testing.assert_close(ours, theirs, atol=float(tol), rtol=0)


def test_quantize_on_gguf_rejects_unknown_modes(tmp_path, bpe):
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model(bpe.vocab_size, tie=True), bpe, Q.Q8_0)
    with pytest.raises(InteropError, match="quantize: got 'int3'"):
        load_gguf(path, quantize="int3")


def test_smollm2_q4_1_loads_into_int4_exactly(smollm2):
    """The real Q4_1 file: every block layer's int4 weights and the Q8_0 embedding/head's int8 ones
    dequantize to exactly what gguf.quants.dequantize gives (the fp32 load), and greedy decoding
    gives the fp32 model's tokens."""
    from lmforge.generate import generate
    from lmforge.model.quantize import Int4Linear, Int8Embedding, Int8Linear

    path, ref, tok = smollm2
    got = load_gguf(path, quantize="int4")
    assert isinstance(got.transformer.blocks[3].attn.qkv, Int4Linear) and isinstance(got.lm_head, Int8Linear)
    assert isinstance(got.transformer.tok_emb, Int8Embedding)
    want = _linear_weights(ref)
    for name, w in _linear_weights(got).items():
        assert torch.equal(w, want[name]), name
    ids = tok.encode(PROMPTS[0])
    assert generate(got, ids, max_new_tokens=16, temperature=0) == generate(ref, ids, max_new_tokens=16, temperature=0)
