"""GGUF import: llama.cpp model files as lmforge models, tokenizer and chat template included.

A ``.gguf`` file is one self-describing file: key/value metadata (architecture, sizes, the
tokenizer's vocabulary and merges, the chat template) followed by tensors, each stored in a
GGML type (F32, F16, BF16, or a block quantization such as Q8_0, Q4_0, Q4_1). This module reads
it with the ``gguf`` package (llama.cpp's own Python reader) and turns it into lmforge objects in
three steps:

1. **config**: the ``llama.*`` (``qwen2.*``, ``qwen3.*``, ``gemma3.*``) metadata becomes a
   :class:`ModelConfig` (GQA, head size, RMSNorm eps, rope theta, linear RoPE scaling, a llama3
   scaling read back from the ``rope_freqs`` tensor, Gemma 3's sliding-window layers; the output
   matrix is tied when the file has no ``output.weight``); ``ARCH_FIELDS`` lists what each
   architecture always has. Anything lmforge does not implement (another architecture, another
   rope scaling, a partial rotary dimension) is an :class:`InteropError` naming the key.
2. **weights**: every tensor is dequantized to float32 (``gguf.quants.dequantize``) and placed
   by name. llama.cpp stores the query and key projections with their rows permuted (its RoPE
   rotates adjacent pairs ``(x0, x1)``, Hugging Face and lmforge rotate halves
   ``(x_i, x_{i+hs/2})``), so :func:`unpermute_qk` undoes :func:`permute_qk` per head (llama
   architecture only: qwen2/qwen3/gemma3 rotate halves in llama.cpp too). Gemma's norms are
   stored as ``1 + weight`` and come back as lmforge's ``weight``.
3. **tokenizer**: the vocabulary, merges and token types become a Hugging Face ``tokenizers``
   byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with the pre-tokenizer that
   ``tokenizer.ggml.pre`` names; control tokens are special tokens; bos/eos/pad ids and the Jinja
   chat template come from the metadata.

    model, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", with_tokenizer=True)

With ``quantize="int4"`` or ``"int8"`` step 2 builds no fp32 model: the model is laid out on
PyTorch's meta device and each linear layer is made straight from its tensor's blocks
(:mod:`lmforge.model.quantize`'s layouts are GGUF's: a Q4_0/Q4_1 block becomes an int4 group, a
Q8_0 block an int8 group, bytes copied and dequantizing to exactly ``gguf``'s values); a tensor
of another type (F32, F16, a k-quant, or Q4 for int8) is dequantized alone and rounded to the
layout, so at most one tensor is ever in fp32.
"""

from __future__ import annotations

import math
import mmap
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import CheckpointError, ConfigError, InputError, InteropError, TokenizerError
from lmforge.model import build
from lmforge.model.config import ModelConfig
from lmforge.model.layers import RotaryEmbedding, scale_frequencies
from lmforge.model.quantize import (GROUP, Int4Linear, Int8Embedding, Int8Linear, METHODS, int8_group,
                                    quantize_int4, quantize_int8, quantize_model)
from lmforge.tokenizer import HFTokenizer

# GGML types this module dequantizes and tests against closed forms; other types the ``gguf``
# package can dequantize (k-quants such as Q6_K, which llama.cpp often keeps for the output
# matrix of a Q4 file) are accepted as well, the rest is an InteropError naming the type.
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# What each GGUF architecture always has, as ModelConfig fields beyond Llama's (RMSNorm, SwiGLU,
# RoPE, no biases); lmforge.interop.gguf_export picks the architecture of a config from this table.
ARCH_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": dict(qkv_bias=True),  # biases on q, k and v
    "qwen3": dict(qk_norm=True),  # per-head RMSNorm on q and k, explicit head size
    "gemma3": dict(activation="geglu_tanh", qk_norm=True, sandwich_norm=True, norm_unit_offset=True,
                   scale_embeddings=True),  # norms stored as 1 + weight (llama.cpp multiplies by them)
}
ARCHITECTURES = tuple(ARCH_FIELDS)
# llama.cpp rotates adjacent pairs in these architectures, so their q/k rows are stored permuted
# (the others use the "NeoX" rotate-half RoPE of Hugging Face and lmforge, stored as is)
PERMUTED_QK = ("llama",)
# llama.cpp's fixed Gemma 3 layout: layers 0-4 of every 6 slide (base-10000 RoPE), the 6th is global
GEMMA3_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0
ROPE_FREQS = "rope_freqs.weight"  # llama3-scaled RoPE: per-frequency divisors (llama.cpp's freq_factors)
TOKENIZER_MODELS = ("gpt2",)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of byte-level BPE vocabularies, by ``tokenizer.ggml.pre``.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/2.5/3: one digit a token
# name -> (split digits one by one first, regex); None regex = GPT-2's built into ByteLevel
PRE_TOKENIZERS: dict[str, tuple[bool, str | None]] = {
    "default": (False, None), "gpt2": (False, None), "gpt-2": (False, None),
    "smollm": (True, None),  # digits one by one, then GPT-2's split (SmolLM/SmolLM2)
    "llama-bpe": (False, _LLAMA3_SPLIT), "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


# ============================================================================ reading
@lru_cache(maxsize=1)
def reader_class():
    """``gguf.GGUFReader`` reading through a plain ndarray view of the file mapping.

    The reader slices its ``np.memmap`` about a million times for a 49k-token vocabulary, and
    numpy's memmap subclass costs microseconds per slice (4-5x the whole read); a plain view of
    the same mapped bytes parses identically without that overhead.
    """
    from gguf import GGUFReader

    class Reader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._mapped

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._mapped = value.view(np.ndarray)

    return Reader


def open_gguf(path: Path):
    """A GGUF reader on ``path``; a file that is not GGUF or is cut short is a CheckpointError."""
    GGUFReader = reader_class()

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OverflowError, OSError, KeyError) as e:
        # numpy raises these when a header or tensor runs past the end of a truncated file; an
        # unknown GGML type number is a ValueError from the enum
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({msg})") from None


def read_metadata(reader) -> dict[str, Any]:
    """Every metadata key of a GGUF reader as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def dequantize(data: np.ndarray, ggml_type, name: str = "tensor") -> np.ndarray:
    """Float32 values of one GGUF tensor's raw data (``gguf``'s dequantization), still in the
    file's row layout: (..., row bytes) -> (..., row values)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as _dequantize

    t = GGMLQuantizationType(ggml_type)
    try:
        if t == GGMLQuantizationType.BF16 and data.dtype != np.uint8:
            data = data.view(np.uint8)
        return np.asarray(_dequantize(data, t), dtype=np.float32)
    except NotImplementedError:
        raise InteropError(f"{name}: GGML type {t.name} cannot be dequantized (supported: "
                           f"{', '.join(TESTED_TYPES)} and the k-quants)") from None


def check_types(reader, where: str = "GGUF") -> None:
    """Every tensor's GGML type can be dequantized; else one InteropError naming the types."""
    from gguf import GGML_QUANT_SIZES

    bad: dict[str, str] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        if name in bad.values() or name in TESTED_TYPES:
            continue
        block = np.zeros(GGML_QUANT_SIZES[t.tensor_type][1], dtype=np.uint8)[None]
        try:
            dequantize(block, t.tensor_type, t.name)
        except InteropError:
            bad[t.name] = name
    if bad:
        raise InteropError(f"{where}: GGML type(s) {', '.join(sorted(set(bad.values())))} cannot be dequantized "
                           f"(e.g. tensor {next(iter(bad))}); supported: {', '.join(TESTED_TYPES)} and the k-quants")


def tensor_to_torch(t) -> torch.Tensor:
    """A ``gguf`` ReaderTensor as a float32 torch tensor in PyTorch's layout (rows first):
    GGUF lists dimensions innermost first, so (n_embd, n_vocab) there is (n_vocab, n_embd) here."""
    values = dequantize(t.data, t.tensor_type, t.name)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if not values.flags.writeable:  # F32 data is a view of the read-only file mapping
        values = values.copy()
    return torch.from_numpy(np.ascontiguousarray(values).reshape(shape))


def _f32(v: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(v)))


# ============================================================================ Q/K permutation
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a query/key projection (n_head*hs, C) from the rotate-half layout
    (Hugging Face, lmforge) to llama.cpp's interleaved one: per head, rows [a0..a_{h-1}, b0..b_{h-1}]
    become [a0, b0, a1, b1, ...] (h = hs/2). This is what llama.cpp's converter applies."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`: llama.cpp's interleaved rows back to rotate-half."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ============================================================================ RoPE frequency factors
def llama3_freq_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` of a llama3-scaled RoPE (hs/2,): what each plain frequency is
    divided by, computed from lmforge's own scaled frequencies so the two agree exactly."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hs/2,)
    return inv_freq / scale_frequencies(inv_freq, scaling)


def llama3_scaling_from_factors(factors: torch.Tensor, theta: float, head_dim: int) -> dict[str, Any] | None:
    """The lmforge ``rope_scaling`` (type llama3) giving ``factors`` (llama.cpp's ``rope_freqs``),
    None when every factor is 1. Only the two wavelength thresholds (original length over the low
    and high frequency factors) matter, so low_freq_factor is taken as 1 unless Meta's published
    values (1, 4, 8192) fit. Factors no llama3 scaling gives are an InteropError."""
    f = factors.double()
    if f.dim() != 1 or f.numel() != head_dim // 2:
        raise InteropError(f"{ROPE_FREQS}: shape {tuple(factors.shape)}, expected ({head_dim // 2},) = head size / 2")
    factor = float(f.max())
    if abs(factor - 1.0) < 1e-6:
        return None
    candidates = [{"type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    between = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if int(between.sum()) >= 2:  # blended band: smooth = L/(2 pi (hi - lo)) * freq - lo/(hi - lo), a line
        smooth = (1 / f[between] - 1 / factor) / (1 - 1 / factor)
        u = inv_freq[between] / (2 * math.pi)
        a, b = np.polyfit(u.numpy(), smooth.numpy(), 1)
        if a > 0 and b < 0:
            high = 1.0 - 1.0 / b  # low_freq_factor 1: hi - lo = -1/b, L = a (hi - lo)
            candidates.append({"type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                               "high_freq_factor": float(high), "original_max_position_embeddings": float(-a / b)})
    for scaling in candidates:
        try:
            if torch.allclose(llama3_freq_factors(theta, head_dim, scaling).double(), f, rtol=1e-5, atol=0):
                return scaling
        except (ZeroDivisionError, ValueError):
            continue
    raise InteropError(f"{ROPE_FREQS}: frequency factors {[round(float(x), 4) for x in f[:4]]}... are not a "
                       f"llama3 RoPE scaling (lmforge implements plain, linear and llama3 RoPE)")


# ============================================================================ config
def config_from_gguf(meta: dict[str, Any], n_vocab: int | None = None,
                     rope_freqs: torch.Tensor | None = None) -> ModelConfig:
    """The lmforge config of GGUF metadata (llama, qwen2, qwen3 or gemma3 architecture; a llama3
    RoPE scaling comes as the ``rope_freqs`` tensor). Every unsupported feature is listed in one
    :class:`InteropError` naming its key."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InteropError(f"general.architecture: got {arch!r}, expected one of {', '.join(ARCHITECTURES)} "
                           f"(lmforge imports Llama, Qwen2, Qwen3 and Gemma 3 GGUF files)")
    problems: list[str] = []

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            problems.append(f"{arch}.{key}: missing")
        return meta.get(f"{arch}.{key}")

    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    n_layer, ffn = need("block_count"), need("feed_forward_length")
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear" and meta.get(f"{arch}.rope.scaling.factor"):
        scaling = {"type": "linear", "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}
    elif kind not in ("none", None):
        problems.append(f"{arch}.rope.scaling.type: got {kind!r}, expected 'none' or 'linear' (llama3 scaling "
                        f"comes as the {ROPE_FREQS} tensor)")
    head_size = None
    if isinstance(n_embd, int) and isinstance(n_head, int) and n_head:
        hd = meta.get(f"{arch}.attention.key_length", n_embd // n_head)
        for key in ("rope.dimension_count", "attention.value_length"):
            v = meta.get(f"{arch}.{key}")
            if v is not None and v != hd:
                problems.append(f"{arch}.{key}: got {v}, expected the head size {hd} (attention.key_length)")
        if hd != n_embd // n_head or n_embd % n_head:
            head_size = hd
        if rope_freqs is not None and isinstance(hd, int):
            try:
                scaling = llama3_scaling_from_factors(rope_freqs, theta, hd)
            except InteropError as e:
                problems.append(str(e))
    for key in ("expert_count",):
        if meta.get(f"{arch}.{key}"):
            problems.append(f"{arch}.{key}: got {meta[f'{arch}.{key}']}, mixture-of-experts is not implemented")
    family: dict[str, Any] = dict(ARCH_FIELDS[arch])
    if arch == "gemma3":  # llama.cpp's layout: every 6th layer global, the rest sliding with base-10k RoPE
        window = meta.get(f"{arch}.attention.sliding_window") or None
        hd = head_size or (n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) else 1)
        scale = (n_embd // n_head) ** -0.5 if n_layer == 62 else hd ** -0.5  # llama.cpp: 27B is the exception
        family.update(attn_scale=scale, logit_softcap=meta.get(f"{arch}.final_logit_softcapping") or None)
        if window:
            family.update(sliding_window=window, global_every=GEMMA3_PATTERN, rope_local_theta=GEMMA3_LOCAL_THETA)
    if problems:
        raise InteropError("GGUF metadata: " + "; ".join(problems))
    vocab = meta.get(f"{arch}.vocab_size") or n_vocab or len(meta.get("tokenizer.ggml.tokens") or [])
    try:
        fields = dict(arch="decoder", vocab_size=int(vocab), context_length=int(meta.get(f"{arch}.context_length", 2048)),
                      n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, n_embd=n_embd, mlp_hidden=ffn,
                      activation="swiglu", norm="rmsnorm",
                      norm_eps=_f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                      positional="rope", rope_theta=theta, rope_scaling=scaling, head_size=head_size,
                      bias=False, tie_embeddings=True, dropout=0.0, name=f"gguf-{arch}")
        return ModelConfig(**{**fields, **family})
    except (ConfigError, TypeError, ValueError) as e:
        raise InteropError(f"GGUF metadata does not describe a valid lmforge model ({e})") from None


# ============================================================================ weights
def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    """lmforge tensor -> GGUF tensor for everything but the fused projections (q/k/v, gate/up)."""
    m = {"transformer.tok_emb.weight": "token_embd.weight", "transformer.norm.weight": "output_norm.weight"}
    for i in range(cfg.n_layer):
        b, g = f"transformer.blocks.{i}.", f"blk.{i}."
        m[b + "norm1.weight"] = g + "attn_norm.weight"
        m[b + "attn.proj.weight"] = g + "attn_output.weight"
        m[b + "norm2.weight"] = g + "ffn_norm.weight"  # Gemma 3: the norm before the MLP, same name
        m[b + "mlp.proj.weight"] = g + "ffn_down.weight"
        if cfg.qk_norm:
            m[b + "attn.q_norm.weight"] = g + "attn_q_norm.weight"
            m[b + "attn.k_norm.weight"] = g + "attn_k_norm.weight"
        if cfg.sandwich_norm:
            m[b + "post_attn_norm.weight"] = g + "post_attention_norm.weight"
            m[b + "post_mlp_norm.weight"] = g + "post_ffw_norm.weight"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "output.weight"
    return m


def state_dict_from_gguf(tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                         arch: str = "llama") -> dict[str, torch.Tensor]:
    """lmforge tensors from dequantized GGUF tensors: q/k un-permuted (llama), norms back to
    lmforge's ``weight`` of ``1 + weight`` (Gemma), q/k/v (and their biases) fused into
    ``attn.qkv``, gate/up into ``mlp.fc``. Missing or unexpected tensors are errors."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"GGUF tensors: {name} is missing (the {arch} metadata needs it)")
        used.add(name)
        return tensors[name]

    out = {ours: take(theirs) for ours, theirs in tensor_names(cfg).items()}
    if cfg.norm_unit_offset:  # llama.cpp's Gemma files hold 1 + weight
        out = {k: v - 1.0 if "norm" in k.rsplit(".", 2)[-2] else v for k, v in out.items()}
    permuted = arch in PERMUTED_QK
    for i in range(cfg.n_layer):
        b, g = f"transformer.blocks.{i}.", f"blk.{i}."
        q, k, v = take(g + "attn_q.weight"), take(g + "attn_k.weight"), take(g + "attn_v.weight")
        if permuted:
            q, k = unpermute_qk(q, cfg.n_head), unpermute_qk(k, cfg.n_kv_head)  # (nh*hs, C), (nkv*hs, C)
        out[b + "attn.qkv.weight"] = torch.cat([q, k, v], dim=0)
        if cfg.qkv_has_bias:
            out[b + "attn.qkv.bias"] = torch.cat([take(g + f"attn_{p}.bias") for p in "qkv"], dim=0)
        out[b + "mlp.fc.weight"] = torch.cat([take(g + "ffn_gate.weight"), take(g + "ffn_up.weight")], dim=0)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.tok_emb.weight"]
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3":
        take(ROPE_FREQS)  # config_from_gguf read the scaling from it
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise InteropError(f"GGUF tensors: {len(leftover)} tensor(s) lmforge has no place for: "
                           f"{', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
    return out


# ============================================================================ quantized weights
def _blocks(t, block_bytes: int) -> np.ndarray:
    """A quantized tensor's raw bytes as (rows, blocks per row, block bytes)."""
    data = np.asarray(t.data).view(np.uint8)
    return data.reshape(data.shape[0], -1, block_bytes)


def _owned(b: np.ndarray, dtype=np.uint8) -> torch.Tensor:
    """Bytes (rows, blocks, n) of the file mapping copied once into a tensor (rows, blocks * n)."""
    return torch.from_numpy(np.ascontiguousarray(b).reshape(b.shape[0], -1).view(dtype))


def _half(b: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 fields (..., 2) bytes -> a float16 tensor (...)."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].copy())


def int4_parts(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A Q4_0 or Q4_1 tensor as int4 codes (N, K/2), scale and offset (N, K/32) fp16, exactly:
    Q4_1's ``q * d + m`` is ``scale = d, offset = m``; Q4_0's ``(q - 8) * d`` is ``offset = -8 d``
    (exact in fp16). None for any other type."""
    name = t.tensor_type.name
    if name == "Q4_1":  # block: d (fp16), m (fp16), 16 bytes of codes
        b = _blocks(t, 20)
        return _owned(b[..., 4:]), _half(b[..., 0:2]), _half(b[..., 2:4])
    if name == "Q4_0":  # block: d (fp16), 16 bytes of codes
        b = _blocks(t, 18)
        d = _half(b[..., 0:2])
        offset = d * -8  # a power-of-two multiple: exact unless it overflows fp16
        if not torch.isfinite(offset).all():
            raise InteropError(f"{t.name}: a Q4_0 scale times 8 overflows fp16; load without quantize")
        return _owned(b[..., 2:]), d, offset
    return None


def int8_parts(t) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A Q8_0 tensor as int8 codes (N, K) and scales (N, K/32) fp16, exactly; None for another type."""
    if t.tensor_type.name != "Q8_0":  # block: d (fp16), 32 int8 codes
        return None
    b = _blocks(t, 34)
    return _owned(b[..., 2:], np.int8), _half(b[..., 0:2])


def quantized_parts(t, kind: str) -> tuple[str, tuple[torch.Tensor, ...]]:
    """One GGUF weight in an lmforge quantized layout: ``("int4", (codes, scale, offset))`` or
    ``("int8", (codes, scale))``; its own blocks where they are the layout, else dequantized
    (this tensor alone) and rounded. int4 on rows not a multiple of 32 gives int8."""
    k = int(t.shape[0])  # in_features (GGUF lists the innermost dimension first)
    if kind == "int4" and k % GROUP == 0:
        parts = int4_parts(t)
        return "int4", parts if parts is not None else quantize_int4(tensor_to_torch(t))
    parts = int8_parts(t)
    if parts is not None:
        return "int8", parts
    try:
        group = int8_group(k)
    except InputError as e:
        raise InteropError(f"{t.name}: {e}") from None
    return "int8", quantize_int8(tensor_to_torch(t), group)


def release_pages(t) -> None:
    """Tell the kernel that a tensor's bytes in the file mapping are no longer needed: its pages
    leave this process's resident memory (they stay in the page cache), so loading a model holds
    at most the tensor at hand of the mapped file, not every tensor read so far."""
    obj = t.data
    while obj is not None and not isinstance(obj, mmap.mmap):
        obj = getattr(obj, "base", None)
    if obj is None or not hasattr(obj, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    begin = np.frombuffer(obj, dtype=np.uint8).ctypes.data
    start = t.data.ctypes.data - begin
    aligned = start - start % mmap.PAGESIZE
    length = min(len(obj) - aligned, start + t.data.nbytes - aligned)
    if length > 0:
        obj.madvise(mmap.MADV_DONTNEED, aligned, length)


def _fused(pieces: list[tuple[str, tuple[torch.Tensor, ...]]]) -> tuple[str, tuple[torch.Tensor, ...]]:
    """Row-wise concatenation of quantized pieces of one layout (q/k/v, gate/up)."""
    kinds = {kind for kind, _ in pieces}
    if len(kinds) > 1:
        raise InteropError(f"fused projection mixes quantized layouts {sorted(kinds)}")
    return pieces[0][0], tuple(torch.cat(ts, dim=0) for ts in zip(*(p for _, p in pieces)))


def _layer(kind: str, parts: tuple[torch.Tensor, ...]):
    return Int4Linear(*parts) if kind == "int4" else Int8Linear(*parts)


def _quantized_model(reader, cfg: ModelConfig, kind: str, path: Path):
    """The lmforge model of a GGUF reader with int4/int8 linear layers, built without an fp32
    copy: the module tree on the meta device, then every weight made from its own tensor."""
    tensors = {t.name: t for t in reader.tensors}
    used: set[str] = set()

    def take(name: str):
        if name not in tensors:
            raise CheckpointError(f"GGUF tensors: {name} is missing (the llama metadata needs it)")
        used.add(name)
        return tensors[name]

    def parts(name: str, layer_kind: str, n_head: int | None = None):
        got = quantized_parts(take(name), layer_kind)
        release_pages(tensors[name])  # the layer holds its own copy now
        if n_head is not None:  # llama.cpp's interleaved q/k rows back to rotate-half: a row order
            got = (got[0], tuple(unpermute_qk(p, n_head) for p in got[1]))
        return got

    def fused(names: list[tuple[str, int | None]]):
        pieces = [parts(n, kind, h) for n, h in names]
        if len({k for k, _ in pieces}) > 1:  # e.g. a Q8_0 v beside Q4 q/k: one layout for the layer
            pieces = [parts(n, "int8", h) for n, h in names]
        return _layer(*_fused(pieces))

    with torch.device("meta"):
        model = build(cfg)
    t = model.transformer
    for i, block in enumerate(t.blocks):
        g = f"blk.{i}."
        block.attn.qkv = fused([(g + "attn_q.weight", cfg.n_head), (g + "attn_k.weight", cfg.n_kv_head),
                                (g + "attn_v.weight", None)])
        block.attn.proj = _layer(*parts(g + "attn_output.weight", kind))
        block.mlp.fc = fused([(g + "ffn_gate.weight", None), (g + "ffn_up.weight", None)])
        block.mlp.proj = _layer(*parts(g + "ffn_down.weight", kind))
    # the output matrix keeps 8 bits (lmforge.model.quantize); a tied one is also the embedding
    model.lm_head = _layer(*parts("token_embd.weight" if cfg.tie_embeddings else "output.weight", "int8"))
    if cfg.tie_embeddings:
        t.tok_emb = Int8Embedding(model.lm_head)
    t.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if t.rope is not None else None
    small = {ours: theirs for ours, theirs in tensor_names(cfg).items()
             if not ours.endswith(("attn.proj.weight", "mlp.proj.weight", "lm_head.weight"))
             and not (cfg.tie_embeddings and ours == "transformer.tok_emb.weight")}
    with torch.no_grad():
        for ours, theirs in small.items():  # norms (and an untied embedding): materialized from the file
            module_name, _, attr = ours.rpartition(".")
            module = model.get_submodule(module_name)
            value = tensor_to_torch(take(theirs))
            if tuple(value.shape) != tuple(getattr(module, attr).shape):
                raise CheckpointError(f"{path}: {ours}: shape {tuple(value.shape)} in the file, expected "
                                      f"{tuple(getattr(module, attr).shape)} from its metadata")
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise InteropError(f"GGUF tensors: {len(leftover)} tensor(s) lmforge has no place for: "
                           f"{', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
    meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if meta:
        raise CheckpointError(f"{path}: no weights in the file for {', '.join(meta[:5])}")
    return model


# ============================================================================ tokenizer
def tokenizer_from_gguf(meta: dict[str, Any], where: str = "GGUF"):
    """An lmforge :class:`~lmforge.tokenizer.HFTokenizer` from the ``tokenizer.*`` metadata,
    with bos/eos/pad ids and the chat template taken from the file."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise InteropError(f"{where}: tokenizer.ggml.model: got {kind!r}, expected one of "
                           f"{', '.join(TOKENIZER_MODELS)} (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InteropError(f"{where}: tokenizer.ggml.pre: got {pre!r}, expected one of {', '.join(PRE_TOKENIZERS)}")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise TokenizerError(f"{where}: tokenizer.ggml.tokens/token_type: expected equally long, non-empty lists")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False,
                                 ignore_merges=pre in ("llama-bpe", "llama3")))
    digits, regex = PRE_TOKENIZERS[pre]
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=t == CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    backend.add_tokens([a for a in added if not a.special])
    backend.add_special_tokens([a for a in added if a.special])

    tok = HFTokenizer(backend)
    roles = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(i, int) and 0 <= i < len(tokens):
            roles[f"{role}_id"] = i
    tok.configure(**roles, chat_template=meta.get("tokenizer.chat_template"))
    return tok


# ============================================================================ import
def load_gguf(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = False,
              quantize: str = "none"):
    """Build the lmforge model of a ``.gguf`` file and load its weights (float32, eval mode;
    with ``quantize`` "int8" or "int4", linear layers in those layouts, made from the file's
    blocks without an fp32 copy of the model; "fp16" quantizes the fp32 model's layers).

    With ``with_tokenizer`` returns ``(model, tokenizer)``, the tokenizer carrying the file's
    chat template (``tokenizer.chat_template``) and bos/eos ids.
    """
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    check_types(reader, str(path))
    rope_freqs = next((tensor_to_torch(t) for t in reader.tensors if t.name == ROPE_FREQS), None)
    cfg = config_from_gguf(meta, rope_freqs=rope_freqs)
    names = {t.name for t in reader.tensors}
    if "output.weight" in names:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "tie_embeddings": False})
    if quantize not in METHODS:
        raise InteropError(f"quantize: got {quantize!r}, expected one of {', '.join(METHODS)}")
    arch = meta["general.architecture"]
    if quantize in ("int8", "int4") and arch in PERMUTED_QK and rope_freqs is None:
        # llama blocks straight into the int4/int8 layouts, no fp32 copy (the other families'
        # extra tensors go through the fp32 path below and are rounded after)
        model = _quantized_model(reader, cfg, quantize, path)
    else:
        tensors = {t.name: tensor_to_torch(t) for t in reader.tensors}
        state = state_dict_from_gguf(tensors, cfg, arch)
        del tensors
        model = build(cfg)
        expected = model.state_dict()
        for key, t in state.items():
            if tuple(t.shape) != tuple(expected[key].shape):
                raise CheckpointError(f"{path}: {key}: shape {tuple(t.shape)} in the file, expected "
                                      f"{tuple(expected[key].shape)} from its metadata")
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        del state
        quantize_model(model, quantize)
    model.to(device).eval()
    if not with_tokenizer:
        return model
    tok = tokenizer_from_gguf(meta, str(path))
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size}")
    return model, tok

