"""GGUF export: an lmforge decoder as one llama.cpp model file, tokenizer and chat template included.

The inverse of :mod:`lmforge.interop.gguf` (which reads such files back), in four steps:

1. **architecture**: the config's family fields pick llama.cpp's architecture (``ARCH_FIELDS``
   in :mod:`~lmforge.interop.gguf`): ``gemma3`` (GeGLU, four norms, (1 + w) RMSNorm, q/k norm),
   ``qwen3`` (q/k norm), ``qwen2`` (q/k/v biases) or ``llama``. Whatever llama.cpp would compute
   differently (another attention scale, sliding windows outside Gemma 3's fixed 5-local-1-global
   pattern, a classifier head, unmerged LoRA adapters, ...) is one :class:`InteropError` naming
   every field: never a file that llama.cpp runs with other logits.
2. **metadata**: sizes, RMSNorm epsilon, RoPE base, head size, context length; a linear RoPE
   scaling as ``rope.scaling.*`` keys and a llama3 one as the ``rope_freqs`` tensor (what each
   frequency is divided by: llama.cpp's own convention).
3. **tensors**: lmforge's fused ``attn.qkv`` and ``mlp.fc`` split into llama.cpp's q/k/v and
   gate/up; for the llama architecture the q/k rows permuted to llama.cpp's adjacent-pair RoPE
   (:func:`~lmforge.interop.gguf.permute_qk`); Gemma's norms stored as ``1 + weight``; a tied head
   written once (no ``output.weight``). ``dtype``: ``f32``, ``f16`` (matrices; norms, biases and
   ``rope_freqs`` stay f32 as llama.cpp keeps them) or ``q8_0`` (matrices whose rows are whole
   32-value blocks; the others f16), quantized by the ``gguf`` package.
4. **tokenizer**: every lmforge tokenizer as llama.cpp's byte-level BPE (``tokenizer.ggml.model
   = "gpt2"``): tokens in id order, merges, token types (special tokens are CONTROL), the
   pre-tokenizer named by ``tokenizer.ggml.pre``, bos/eos/pad/unk ids and the Jinja chat template.
   A char tokenizer becomes byte-level symbols too, so its characters must be ASCII (one byte);
   text with characters outside its vocabulary encodes differently (lmforge: unk; GGUF: dropped).

    export_gguf(model, "model.gguf", tokenizer=tok, dtype="q8_0")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import InputError, InteropError
from lmforge.fsutil import atomic_write
from lmforge.interop.gguf import (ARCH_FIELDS, CONTROL, GEMMA3_LOCAL_THETA, GEMMA3_PATTERN, NORMAL, PERMUTED_QK,
                                  PRE_TOKENIZERS, ROPE_FREQS, UNUSED, USER_DEFINED, llama3_freq_factors,
                                  permute_qk, tensor_names)
from lmforge.model.config import ModelConfig
from lmforge.model.lora import has_lora
from lmforge.tokenizer import ByteTokenizer

DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # values per Q8_0 block: a row must be a whole number of them


# ============================================================================ architecture
def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for an lmforge RoPE decoder, from its family fields."""
    if cfg.activation == "geglu_tanh" or cfg.sandwich_norm or cfg.norm_unit_offset or cfg.scale_embeddings:
        return "gemma3"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_has_bias:
        return "qwen2"
    return "llama"


def llama_cpp_attn_scale(cfg: ModelConfig, arch: str) -> float:
    """The attention-score scale llama.cpp applies (it has no key for it): 1/sqrt(head size), but
    1/sqrt(n_embd/n_head) for Gemma 3 27B (62 layers)."""
    if arch == "gemma3" and cfg.n_layer == 62:
        return (cfg.n_embd // cfg.n_head) ** -0.5
    return cfg.head_dim ** -0.5


def export_problems(cfg: ModelConfig) -> list[str]:
    """Why llama.cpp would not run ``cfg`` with lmforge's logits (empty when it would)."""
    if cfg.arch != "decoder":
        return [f"model.arch: got {cfg.arch!r}; GGUF export writes decoder LMs (expected 'decoder')"]
    p: list[str] = []
    if cfg.num_classes:
        p.append(f"model.num_classes: got {cfg.num_classes}; llama.cpp has no classification head (expected 0)")
    if cfg.positional != "rope":
        return p + [f"model.positional: got {cfg.positional!r}; GGUF export writes RoPE decoders "
                    f"(llama, qwen2, qwen3, gemma3), expected 'rope'"]
    arch = gguf_architecture(cfg)
    want: dict[str, Any] = {"norm": "rmsnorm", "norm_position": "pre", "embedding_norm": False, "type_vocab_size": 0,
                            "bias": False, "activation": "swiglu", "qkv_has_bias": False, "qk_norm": False,
                            "sandwich_norm": False, "norm_unit_offset": False, "scale_embeddings": False,
                            "attn_softcap": None}
    want.update({("qkv_has_bias" if k == "qkv_bias" else k): v for k, v in ARCH_FIELDS[arch].items()})
    if arch != "gemma3":
        want.update(logit_softcap=None, rope_local_theta=None)
    for field, value in want.items():
        got = getattr(cfg, field)
        if got != value:
            label = "qkv_bias" if field == "qkv_has_bias" else field
            p.append(f"model.{label}: got {got!r}; llama.cpp's {arch} expects {value!r}")
    scale = llama_cpp_attn_scale(cfg, arch)
    if cfg.attn_scale is not None and abs(cfg.attn_scale - scale) > 1e-9 * scale:
        p.append(f"model.attn_scale: got {cfg.attn_scale!r}; llama.cpp's {arch} scales scores by {scale!r}")
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3" and arch != "llama":
        p.append(f"model.rope_scaling: llama3 scaling is written for the llama architecture only, not {arch}")
    if arch == "gemma3":
        p += _gemma3_layout_problems(cfg)
    elif cfg.has_local_layers:
        p.append(f"model.layer_types: llama.cpp's {arch} has no sliding-window layers (expected all global)")
    return p


def _gemma3_layout_problems(cfg: ModelConfig) -> list[str]:
    """llama.cpp fixes Gemma 3's layout: layers 0-4 of every 6 slide with a base-10000 plain RoPE."""
    p = []
    pattern = ["global" if (i + 1) % GEMMA3_PATTERN == 0 else "local" for i in range(cfg.n_layer)]
    if [cfg.layer_type(i) for i in range(cfg.n_layer)] != pattern or cfg.sliding_window is None:
        p.append(f"model.layer_types: llama.cpp's gemma3 has every {GEMMA3_PATTERN}th layer global and the others "
                 f"sliding (expected global_every: {GEMMA3_PATTERN} and a sliding_window)")
    local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    if local != GEMMA3_LOCAL_THETA or (cfg.rope_local_theta is None and cfg.rope_scaling):
        p.append(f"model.rope_local_theta: got {cfg.rope_local_theta!r}; llama.cpp's gemma3 sliding layers use "
                 f"a plain RoPE of base {GEMMA3_LOCAL_THETA:g}")
    return p


def check_exportable(model: nn.Module) -> ModelConfig:
    """The model's config, or one InteropError saying why it cannot be written as GGUF."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise InteropError(f"model: got {type(model).__name__} without an lmforge ModelConfig; expected an "
                           f"lmforge decoder")
    if has_lora(model):
        raise InteropError("this model has LoRA adapters: add --merge to fold them into the weights "
                           "(lmforge.model.lora.merge_lora); a GGUF file holds plain weights")
    problems = export_problems(cfg)
    if problems:
        raise InteropError("cannot export to GGUF: " + "; ".join(problems))
    return cfg


# ============================================================================ tensors
def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's float32 tensors (PyTorch layout, rows first) from lmforge's state dict."""
    extra = sorted(k for k in state if k not in _known_keys(cfg))
    if extra:
        raise InteropError(f"model weights with no GGUF place: {', '.join(extra[:5])}")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in tensor_names(cfg).items():
        t = state[ours].detach().float().cpu()
        if cfg.norm_unit_offset and "norm" in ours.rsplit(".", 2)[-2]:
            t = t + 1.0  # llama.cpp multiplies by the stored weight; Gemma scales by 1 + weight
        out[theirs] = t
    hd = cfg.head_dim
    sizes = [cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd]
    for i in range(cfg.n_layer):
        b, g = f"transformer.blocks.{i}.", f"blk.{i}."
        q, k, v = state[b + "attn.qkv.weight"].detach().float().cpu().split(sizes, dim=0)  # (nh*hs, C), (nkv*hs, C) x2
        if arch in PERMUTED_QK:
            q, k = permute_qk(q, cfg.n_head), permute_qk(k, cfg.n_kv_head)
        out.update({g + "attn_q.weight": q, g + "attn_k.weight": k, g + "attn_v.weight": v})
        if cfg.qkv_has_bias:
            for name, piece in zip("qkv", state[b + "attn.qkv.bias"].detach().float().cpu().split(sizes)):
                out[g + f"attn_{name}.bias"] = piece
        gate, up = state[b + "mlp.fc.weight"].detach().float().cpu().chunk(2, dim=0)  # (hidden, C) each
        out.update({g + "ffn_gate.weight": gate, g + "ffn_up.weight": up})
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3":
        out[ROPE_FREQS] = llama3_freq_factors(cfg.rope_theta, hd, cfg.rope_scaling)  # (hs/2,)
    return {name: t.contiguous() for name, t in out.items()}


def _known_keys(cfg: ModelConfig) -> set[str]:
    keys = set(tensor_names(cfg)) | {"lm_head.weight"}
    for i in range(cfg.n_layer):
        keys |= {f"transformer.blocks.{i}.attn.qkv.weight", f"transformer.blocks.{i}.attn.qkv.bias",
                 f"transformer.blocks.{i}.mlp.fc.weight"}
    return keys


def encode_tensor(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None) of one tensor in ``dtype``: vectors stay float32; q8_0
    falls back to f16 for rows that are not whole 32-value blocks (as llama.cpp's converter does)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = t.numpy().astype(np.float32)
    if dtype == "f32" or a.ndim < 2:
        return a, None
    if dtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        return quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


# ============================================================================ tokenizer
def tokenizer_metadata(tok, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's ``tokenizer.*`` metadata of an lmforge tokenizer (any kind) as a plain dict:
    model, pre, tokens (padded to ``n_vocab`` with unused ``[PADn]`` tokens), token types,
    merges, special ids, add_bos and the chat template."""
    if tok.vocab_size > n_vocab:
        raise InteropError(f"tokenizer: has {tok.vocab_size} tokens but model.vocab_size is {n_vocab}")
    d = json.loads(tok.to_hf_json())
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise InteropError(f"tokenizer: a Hugging Face {model.get('type')!r} model; GGUF export writes byte-level "
                           f"BPE vocabularies (lmforge's char, byte and BPE tokenizers, GPT-2/Llama 3/Qwen style)")
    if d.get("normalizer") is not None:
        raise InteropError(f"tokenizer: has a {d['normalizer'].get('type')!r} normalizer; llama.cpp's byte-level "
                           f"BPE has none")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["id"]: a for a in d.get("added_tokens") or []}
    for i, a in added.items():
        vocab[a["content"]] = i
    if tok.kind == "char":  # characters -> GPT-2's byte-level symbols (one byte each)
        vocab, pre = _char_vocab(vocab, set(added)), "gpt2"
    else:
        pre = _pre_tokenizer_name(d.get("pre_tokenizer"), bool(merges))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for t, i in vocab.items():
        tokens[i] = t
        a = added.get(i)
        types[i] = NORMAL if a is None else CONTROL if a.get("special") else USER_DEFINED
    meta = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
            "add_bos_token": _adds_bos(d, tok)}
    for role in ("bos", "eos", "pad", "unk"):
        if getattr(tok, f"{role}_id", None) is not None:
            meta[f"{role}_token_id"] = getattr(tok, f"{role}_id")
    if getattr(tok, "chat_template", None) is not None:
        meta["chat_template"] = tok.chat_template
    return meta


def _char_vocab(vocab: dict[str, int], special_ids: set[int]) -> dict[str, int]:
    # GPT-2's byte -> symbol table, as lmforge's byte tokenizer writes it (symbol id == byte value)
    byte_vocab = json.loads(ByteTokenizer(specials=[]).to_hf_json())["model"]["vocab"]
    table = {b: ch for ch, b in byte_vocab.items()}
    out = {}
    for t, i in vocab.items():
        if i in special_ids:
            out[t] = i
        elif len(t.encode("utf-8")) != 1:
            raise InteropError(f"tokenizer: char tokenizer character {t!r} is not ASCII; GGUF's byte-level "
                               f"vocabulary has a token for it only through merges of its UTF-8 bytes (use a "
                               f"byte or BPE tokenizer)")
        else:
            out[table[t.encode("utf-8")[0]]] = i
    return out


def _pre_tokenizer_name(pre: dict | None, has_merges: bool) -> str:
    """``tokenizer.ggml.pre`` of a byte-level Hugging Face pre-tokenizer (one lmforge's importer
    and llama.cpp know); without merges any split gives the same ids ('gpt2')."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if not kinds or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise InteropError(f"tokenizer: pre-tokenizer {kinds or None}; GGUF export writes byte-level BPE (a final "
                           f"ByteLevel step without a prefix space)")
    if not has_merges:
        return "gpt2"
    use_regex = steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and use_regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, (digits, known) in PRE_TOKENIZERS.items():
            if known is not None and not digits and known == regex:
                return name
    raise InteropError(f"tokenizer: pre-tokenizer {kinds} matches none GGUF names here (expected GPT-2's, "
                       f"SmolLM's, Llama 3's or Qwen2's byte-level split)")


def _adds_bos(d: dict, tok) -> bool:
    """Whether encoding adds bos (a Hugging Face post-processor that puts it first)."""
    if not getattr(tok, "post_process_by_default", False) or tok.bos_id is None:
        return False
    single = ((d.get("post_processor") or {}).get("single")) or []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    return first is not None and first == tok.id_to_token(tok.bos_id)


# ============================================================================ export
def export_gguf(model: nn.Module, path: str | Path, tokenizer=None, dtype: str = "f32", name: str | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as one ``.gguf`` file that llama.cpp runs and
    :func:`lmforge.interop.gguf.load_gguf` reads back with the same logits (up to ``dtype``).

    ``dtype``: ``f32``, ``f16`` or ``q8_0``. Raises :class:`InteropError` listing every field
    llama.cpp cannot express, :class:`InputError` for an unknown dtype.
    """
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    if dtype not in DTYPES:
        raise InputError(f"dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    path = Path(path)
    if path.is_dir():
        raise InteropError(f"{path}: is a folder; expected a .gguf file path")
    cfg = check_exportable(model)
    arch = gguf_architecture(cfg)
    tok_meta = tokenizer_metadata(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    tensors = {n: encode_tensor(t, dtype) for n, t in gguf_tensors(model.state_dict(), cfg, arch).items()}

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), arch)
        w.add_name(name or cfg.name or f"lmforge-{arch}")
        w.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                         "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype])
        if dtype == "q8_0":
            w.add_quantization_version(GGML_QUANT_VERSION)
        _write_config(w, cfg, arch)
        if tok_meta is not None:
            _write_tokenizer(w, tok_meta)
        for tname, (data, raw) in tensors.items():
            w.add_tensor(tname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    return path


def _write_config(w, cfg: ModelConfig, arch: str) -> None:
    from gguf import RopeScalingType

    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if arch in ("qwen3", "gemma3") or cfg.head_dim != cfg.n_embd // cfg.n_head or cfg.n_embd % cfg.n_head:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
        if cfg.logit_softcap is not None:
            w.add_final_logit_softcapping(cfg.logit_softcap)


def _write_tokenizer(w, meta: dict[str, Any]) -> None:
    w.add_tokenizer_model(meta["model"])
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    if meta["merges"]:
        w.add_token_merges(meta["merges"])
    for role in ("bos", "eos", "pad", "unk"):
        if f"{role}_token_id" in meta:
            getattr(w, f"add_{role}_token_id")(meta[f"{role}_token_id"])
    w.add_add_bos_token(meta["add_bos_token"])
    w.add_add_eos_token(False)
    if "chat_template" in meta:
        w.add_chat_template(meta["chat_template"])
