"""Hugging Face interop: import GPT-2, Llama-layout (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2,
Gemma 3 text; the mixtures of experts Mixtral, Qwen2-MoE and OLMoE) and BERT folders; export GPT-2
and those Llama-layout decoders.

A Hugging Face model folder is ``config.json`` plus weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or the older ``pytorch_model.bin`` / its index). This module
reads and writes those files itself, so lmforge never needs ``transformers`` to run a model.

Converting is two small steps, in both directions:

1. **config**: :func:`config_from_hf` turns ``config.json`` into a :class:`ModelConfig`;
   :func:`config_to_hf` does the reverse. What a Llama-layout ``model_type`` always has (Qwen2's
   q/k/v biases, Qwen3's q/k norm, Gemma's four norms per block, ...) is one table,
   ``_ROPE_DECODERS``; the rest is read field by field. A feature lmforge does not implement (a
   RoPE type other than llama3/linear, relative positions, a bias lmforge has no place for, ...)
   is an :class:`InteropError` that names the field: never a silent approximation.
2. **weights**: one *plan* per family lists, for every lmforge tensor, which Hugging Face
   tensors it comes from and how: copied, transposed (GPT-2's ``Conv1D`` stores ``(in, out)``,
   ``nn.Linear`` ``(out, in)``), or concatenated (q/k/v into our fused ``attn.qkv``; gate/up
   into our fused SwiGLU ``mlp.fc``). :func:`state_dict_from_hf` runs the plan forwards,
   :func:`state_dict_to_hf` backwards (splitting what was concatenated), so an
   HF -> lmforge -> HF round trip gives back the same tensors.

Mixture-of-experts files store each expert as its own gate/up/down tensors (Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2``; Qwen2-MoE, OLMoE: ``mlp.experts.{e}.gate_proj/...``),
the layout ``save_pretrained`` writes; the router is ``gate``, Qwen2-MoE's always-on expert
``shared_expert`` with its sigmoid ``shared_expert_gate``.

Llama checkpoints need no q/k permutation: lmforge's RoPE uses the same "rotate half" layout.
BERT is post-LN with an embedding LayerNorm; its attention-output LayerNorm becomes our
``norm1`` and its output LayerNorm our ``norm2``. Gemma's ``post_attention_layernorm`` is our
``post_attn_norm`` (Llama's, the norm before the MLP, is our ``norm2``).

Weights are loaded into lmforge's default dtype (float32); cast with ``model.to(dtype)`` after.
Dropout rates in ``config.json`` are training choices and are not imported (``dropout=0``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError, InteropError
from lmforge.fsutil import atomic_write
from lmforge.model import build
from lmforge.model.config import ModelConfig, ROPE_SCALINGS
from lmforge.tokenizer import load_tokenizer

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # chat template and bos/eos/pad tokens (transformers)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")

# Hugging Face activation names -> lmforge's (gelu_new and gelu_pytorch_tanh are both the tanh form).
_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_BERT_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# Hugging Face model_type -> the weight layout lmforge reads it with ("llama": model.layers.{i}.self_attn.q_proj ...)
_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
                "gemma2": "llama", "gemma3_text": "llama", "mixtral": "llama", "qwen2_moe": "llama",
                "olmoe": "llama", "bert": "bert"}
# Mixture-of-experts model types (Llama layout with a router and experts in place of some MLPs)
_MOE_TYPES = ("mixtral", "qwen2_moe", "olmoe")
# Hugging Face base models (no LM head): their logits come from the tied embeddings.
_BASE_MODELS = {"GPT2Model", "LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "Gemma2Model",
                "Gemma3TextModel", "MixtralModel", "Qwen2MoeModel", "OlmoeModel"}
# Where each family's backbone tensors live in a model with a head ("transformer.wte.weight").
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}
_HEAD_PREFIXES = ("lm_head.", "cls.")
# Tensors in Hugging Face files that carry nothing lmforge needs.
_IGNORED = {
    # causal-mask buffers saved by older GPT-2 checkpoints
    "gpt2": re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$"),
    # rotary inverse frequencies saved by older Llama checkpoints (lmforge recomputes them)
    "llama": re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    # BERT: the position-id buffer; the pooler (CLS -> dense -> tanh, trained for next-sentence
    # prediction) and the next-sentence head, neither of which lmforge uses
    "bert": re.compile(r"embeddings\.position_ids$|pooler\..*|cls\.seq_relationship\..*"),
}


# ============================================================================ reading files
def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model folder."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a Hugging Face model folder with {CONFIG} and weights")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}); expected a Hugging Face config") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder by name, from the first weights file found in the
    order of ``WEIGHT_FILES`` (safetensors first; sharded index files are followed)."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        read = _read_safetensors if ".safetensors" in name else _read_torch_bin
        return _read_index(path, read) if name.endswith(".index.json") else read(path)
    raise CheckpointError(f"{folder}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({_first_line(e)})") from None


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises anything from KeyError to RuntimeError on bad bytes
        raise CheckpointError(f"{path}: corrupt or unreadable PyTorch weights file ({_first_line(e)})") from None
    if not isinstance(d, dict) or not all(isinstance(v, torch.Tensor) for v in d.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return d


def _read_index(path: Path, read: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: expected a JSON index with a 'weight_map' object "
                              f"({type(e).__name__})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (path.parent / shard).is_file():
            raise CheckpointError(f"{path.parent / shard}: shard named in {path.name} is missing")
        tensors.update(read(path.parent / shard))
    return tensors


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0][:160] if s else type(e).__name__)


# ================================================================= config: HF -> lmforge
def _family_of_hf(hf: dict[str, Any]) -> str:
    mt = hf.get("model_type")
    if mt not in _MODEL_TYPES:
        raise InteropError(f"config.json: model_type: got {mt!r}, expected one of {', '.join(_MODEL_TYPES)}")
    return _MODEL_TYPES[mt]


def _require(problems: list[str], hf: dict[str, Any], key: str, default: Any, allowed: tuple, why: str) -> Any:
    """Record a problem when ``hf[key]`` (or its Hugging Face default) is not one of ``allowed``."""
    value = hf.get(key, default)
    if value not in allowed:
        problems.append(f"{key}: got {value!r}, expected {' or '.join(repr(a) for a in allowed)} ({why})")
    return value


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The lmforge config of a Hugging Face ``config.json`` (GPT-2, Llama/Mistral or BERT).

    Missing keys take Hugging Face's defaults. Every feature lmforge does not implement is
    listed in one :class:`InteropError`, each naming its ``config.json`` field. For BERT the
    masked-LM head is on when ``architectures`` names one (``load_hf`` decides from the weights).
    """
    family = _family_of_hf(hf)
    problems: list[str] = []
    fields = {"gpt2": _gpt2_fields, "llama": _llama_fields, "bert": _bert_fields}[family](hf, problems)
    if problems:
        raise InteropError("config.json: " + "; ".join(problems))
    try:
        return ModelConfig(**fields, dropout=0.0, init_std=hf.get("initializer_range", 0.02),
                           name=f"hf-{hf['model_type']}")
    except ConfigError as e:
        raise InteropError(f"config.json: does not describe a valid lmforge model ({e})") from None


def _gpt2_fields(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    act = _require(problems, hf, "activation_function", "gelu_new", tuple(_GPT2_ACTS), "lmforge's MLP activations")
    _require(problems, hf, "scale_attn_weights", True, (True,), "lmforge always scales attention by 1/sqrt(head size)")
    _require(problems, hf, "scale_attn_by_inverse_layer_idx", False, (False,), "not implemented")
    _require(problems, hf, "add_cross_attention", False, (False,), "lmforge decoders have no cross-attention")
    n_embd = hf.get("n_embd", 768)
    return dict(arch="decoder", vocab_size=hf.get("vocab_size", 50257),
                context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
                n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                mlp_hidden=hf.get("n_inner") or 4 * n_embd, activation=_GPT2_ACTS.get(act, "gelu_tanh"),
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), positional="learned",
                bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def _llama_fields(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Fields of a decoder laid out as Llama: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text.

    What a ``model_type`` always has comes from ``_ROPE_DECODERS``; the rest (head size, RoPE
    base and scaling, sliding-window layers, Gemma's scalars) is read from ``config.json``.
    """
    mt = hf["model_type"]
    fixed = dict(_ROPE_DECODERS[mt])
    if mt == "qwen2_moe":  # its q/k/v biases are a config field (default on)
        fixed["qkv_bias"] = bool(hf.get("qkv_bias", True))
    gemma = fixed.get("activation") == "geglu_tanh"
    if gemma:
        _require(problems, hf, "hidden_activation", "gelu_pytorch_tanh", ("gelu_pytorch_tanh",),
                 "Gemma's GeGLU uses the tanh GELU")
        _require(problems, hf, "use_bidirectional_attention", False, (False, None),
                 "lmforge's Gemma 3 is a causal decoder")
        if mt == "gemma3_text":  # transformers' Gemma 3 attention does not apply this cap (Gemma 2's does)
            _require(problems, hf, "attn_logit_softcapping", None, (None,),
                     "transformers' Gemma 3 ignores it; lmforge would apply it")
    else:
        _require(problems, hf, "hidden_act", "silu", ("silu",), "lmforge's SwiGLU uses silu")
    if "qkv_bias" not in fixed:  # Qwen2's q/k/v biases are fixed by its model type, not a field
        _require(problems, hf, "attention_bias", False, (False,), "lmforge has no bias on o_proj")
    _require(problems, hf, "mlp_bias", False, (False,), "lmforge's gated MLP here has no biases")
    n_embd, n_head = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    n_layer = hf.get("num_hidden_layers", 32)
    head_dim = hf.get("head_dim")
    if head_dim is not None and isinstance(n_embd, int) and isinstance(n_head, int) and n_head \
            and head_dim == n_embd // n_head and not n_embd % n_head:
        head_dim = None  # the derived size: keep the config plain (and its round trip exact)

    # RoPE: one set of parameters, or (Gemma 3) one per layer type
    local_theta = None
    if mt == "gemma3_text":
        nested = hf.get("rope_parameters") or {}
        if not isinstance(nested, dict):
            problems.append(f"rope_parameters: got {nested!r:.80}, expected an object")
            nested = {}
        glob = dict(nested.get("full_attention") or {})
        if hf.get("rope_scaling"):  # older files: the global scaling sits here
            glob.update(hf["rope_scaling"])
        theta, scaling = _rope_from_hf(glob, hf.get("rope_theta", 1000000.0), "rope_parameters.full_attention",
                                       problems)
        local_theta, local_scaling = _rope_from_hf(nested.get("sliding_attention") or {},
                                                   hf.get("rope_local_base_freq", 10000.0),
                                                   "rope_parameters.sliding_attention", problems)
        if local_scaling is not None:  # a scaled local RoPE: lmforge has it only as the one shared RoPE
            if (local_theta, local_scaling) != (theta, scaling):
                problems.append("rope_parameters.sliding_attention: got a scaled RoPE unlike the full_attention "
                                "one, expected rope_type 'default' or the full_attention parameters")
            local_theta = None
    else:
        if mt in ("mistral", "mixtral"):
            _require(problems, hf, "sliding_window", None, (None,), "lmforge has no sliding-window Mistral")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers' precedence
        where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        if not isinstance(rope, dict):
            problems.append(f"{where}: got {rope!r:.80}, expected an object")
            rope = {}
        theta, scaling = _rope_from_hf(rope, hf.get("rope_theta", 10000.0), where, problems)

    # sliding-window (local) layers
    types = _layer_types_from_hf(hf, mt, n_layer, problems)
    window = hf.get("sliding_window") if "local" in (types or ()) else None
    if gemma:
        fields = dict(attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                      logit_softcap=hf.get("final_logit_softcapping"), attn_softcap=hf.get("attn_logit_softcapping"),
                      rope_local_theta=local_theta if types and "local" in types and local_theta is not None
                      else None)
    else:
        fields = {}
    if mt in _MOE_TYPES:
        fields.update(_moe_fields(hf, mt, problems))
    return {**dict(arch="decoder", vocab_size=hf.get("vocab_size", 32000),
                   context_length=hf.get("max_position_embeddings", 2048), n_layer=n_layer,
                   n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                   mlp_hidden=hf.get("intermediate_size", 11008), activation="swiglu", norm="rmsnorm",
                   norm_eps=hf.get("rms_norm_eps", 1e-6), positional="rope", rope_theta=theta,
                   rope_scaling=scaling, bias=False, tie_embeddings=hf.get("tie_word_embeddings", gemma),
                   head_size=head_dim, layer_types=types if types and "local" in types else None,
                   sliding_window=window, **fields), **fixed}


# What each Llama-layout model type always has (beyond Llama's RMSNorm, SwiGLU, RoPE, no biases).
_ROPE_DECODERS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": dict(qkv_bias=True),  # Qwen2 / Qwen2.5: biases on q, k and v, none on o or the MLP
    "qwen3": dict(qk_norm=True),  # Qwen3: per-head RMSNorm on q and k before RoPE
    # Gemma 2: four norms per block, tanh-GeGLU, sqrt(C)-scaled embeddings, (1 + w) RMSNorm, soft-capping
    "gemma2": dict(activation="geglu_tanh", sandwich_norm=True, norm_unit_offset=True, scale_embeddings=True),
    # Gemma 3 text: q/k norm, four norms per block, tanh-GeGLU, sqrt(C)-scaled embeddings, (1 + w) RMSNorm
    "gemma3_text": dict(activation="geglu_tanh", qk_norm=True, sandwich_norm=True, norm_unit_offset=True,
                        scale_embeddings=True),
    # mixtures of experts (the expert fields come from _moe_fields)
    "mixtral": {},
    "qwen2_moe": dict(qkv_bias=True),  # (or false: its config's qkv_bias)
    "olmoe": dict(qk_norm=True, qk_norm_span="all"),  # one RMSNorm over all query heads, one over all key heads
}


def _moe_fields(hf: dict[str, Any], mt: str, problems: list[str]) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral, Qwen2-MoE or OLMoE ``config.json``.

    Dropless top-k routing as transformers runs it. ``router_jitter_noise`` (Mixtral: noise on
    the router input while training) is a training choice and, like dropout, not imported.
    """
    if mt == "mixtral":
        return dict(n_experts=hf.get("num_local_experts", 8), n_experts_per_token=hf.get("num_experts_per_tok", 2),
                    moe_hidden=hf.get("intermediate_size", 14336), norm_topk_prob=True,
                    router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    if mt == "olmoe":
        _require(problems, hf, "clip_qkv", None, (None,), "lmforge does not clamp q/k/v")
        return dict(n_experts=hf.get("num_experts", 64), n_experts_per_token=hf.get("num_experts_per_tok", 8),
                    moe_hidden=hf.get("intermediate_size", 2048), norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                    router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
    # qwen2_moe: dense layers (mlp_only_layers, decoder_sparse_step) keep intermediate_size
    _require(problems, hf, "use_sliding_window", False, (False,), "lmforge has no sliding-window Qwen2-MoE")
    dense = hf.get("mlp_only_layers") or None
    return dict(n_experts=hf.get("num_experts", 60), n_experts_per_token=hf.get("num_experts_per_tok", 4),
                moe_hidden=hf.get("moe_intermediate_size", 1408),
                shared_expert_hidden=hf.get("shared_expert_intermediate_size", 5632),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), moe_every=hf.get("decoder_sparse_step", 1),
                dense_layers=list(dense) if dense else None, router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))


_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}  # not scaling parameters


def _rope_from_hf(p: dict[str, Any], theta: float, where: str, problems: list[str]) -> tuple[float, dict | None]:
    """(base, lmforge rope_scaling) of one Hugging Face RoPE parameter set."""
    kind = p.get("rope_type", p.get("type", "default"))
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"{where}.partial_rotary_factor: got {p['partial_rotary_factor']!r}, expected 1.0 "
                        f"(lmforge rotates the whole head)")
    theta = float(p.get("rope_theta", theta))
    if kind == "default":
        extra = sorted(set(p) - _ROPE_KEYS)
        if extra:
            problems.append(f"{where}: got {', '.join(extra)} without a rope_type, expected rope_type "
                            f"linear or llama3 with them")
        return theta, None
    if kind not in ROPE_SCALINGS:
        problems.append(f"{where}.rope_type: got {kind!r}, expected 'default', "
                        f"{' or '.join(repr(k) for k in ROPE_SCALINGS)} (the RoPE variants lmforge implements)")
        return theta, None
    missing = [k for k in ROPE_SCALINGS[kind] if k not in p]
    if missing:
        problems.append(f"{where}: rope_type {kind!r} without {', '.join(missing)}")
        return theta, None
    extra = sorted(set(p) - _ROPE_KEYS - set(ROPE_SCALINGS[kind]))
    if extra:
        problems.append(f"{where}: {', '.join(extra)} not implemented for rope_type {kind!r}")
    return theta, {"type": kind, **{k: p[k] for k in ROPE_SCALINGS[kind]}}


def _layer_types_from_hf(hf: dict[str, Any], mt: str, n_layer: Any, problems: list[str]) -> list[str] | None:
    """'global'/'local' per layer from ``layer_types`` (transformers 5), else from the older keys
    (Gemma 3: every ``sliding_window_pattern``-th layer global; Qwen: layers from
    ``max_window_layers`` on slide when ``use_sliding_window``). None: every layer global."""
    if mt in ("qwen2", "qwen3", "qwen2_moe") and not hf.get("use_sliding_window", False):
        return None  # transformers ignores layer_types then (sliding_window is None)
    names = hf.get("layer_types")
    if names is None and isinstance(n_layer, int):
        if mt in ("gemma2", "gemma3_text"):  # Gemma 2 alternates local and global
            n = hf.get("sliding_window_pattern", 6 if mt == "gemma3_text" else 2)
            names = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(n_layer)]
        elif mt in ("qwen2", "qwen3"):
            first = hf.get("max_window_layers", 28)
            names = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
    if names is None:
        return None
    kinds = {"full_attention": "global", "sliding_attention": "local"}
    if not isinstance(names, list) or any(t not in kinds for t in names):
        problems.append(f"layer_types: got {names!r:.80}, expected a list of 'full_attention' or "
                        f"'sliding_attention'")
        return None
    if mt in ("llama", "mistral", *_MOE_TYPES) and "sliding_attention" in names:
        problems.append("layer_types: sliding_attention layers in a Llama/Mistral config are not implemented")
        return None
    if "sliding_attention" in names and not isinstance(hf.get("sliding_window"), int):
        problems.append(f"sliding_window: got {hf.get('sliding_window')!r}, expected the window of the "
                        f"sliding_attention layers (a positive integer)")
        return None
    return [kinds[t] for t in names]


def _bert_fields(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    act = _require(problems, hf, "hidden_act", "gelu", tuple(_BERT_ACTS), "lmforge's BERT activations")
    _require(problems, hf, "position_embedding_type", "absolute", ("absolute",),
             "lmforge has learned absolute positions")
    _require(problems, hf, "is_decoder", False, (False,), "a BERT decoder is not implemented")
    _require(problems, hf, "add_cross_attention", False, (False,), "lmforge encoders have no cross-attention")
    archs = hf.get("architectures") or []
    mlm = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs if isinstance(a, str))
    return dict(arch="encoder", vocab_size=hf.get("vocab_size", 30522),
                context_length=hf.get("max_position_embeddings", 512), n_layer=hf.get("num_hidden_layers", 12),
                n_head=hf.get("num_attention_heads", 12), n_embd=hf.get("hidden_size", 768),
                mlp_hidden=hf.get("intermediate_size", 3072), activation=_BERT_ACTS.get(act, "gelu"),
                norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post",
                embedding_norm=True, positional="learned", bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True), type_vocab_size=hf.get("type_vocab_size", 2),
                mlm_head=mlm, pooling="cls")


# ================================================================= weights: the plans
# One entry per lmforge tensor: (lmforge name, op, Hugging Face names without the backbone
# prefix, split sizes along dim 0 for "cat"). op: "copy", "t" (transpose), "cat" (concatenate).
Plan = list[tuple[str, str, list[str], list[int] | None]]


def _family_of(cfg: ModelConfig) -> str:
    if cfg.arch == "encoder":
        return "bert"
    if cfg.arch == "decoder":
        return "llama" if cfg.positional == "rope" else "gpt2"
    raise InteropError(f"model.arch: got {cfg.arch!r}; Hugging Face conversion covers decoders and encoders")


def _plan(cfg: ModelConfig, family: str, moe_layout: str | None = None) -> Plan:
    """``moe_layout``: how expert tensors are named, "mixtral" (block_sparse_moe.experts.{e}.w1/w2/w3)
    or "qwen" (mlp.experts.{e}.gate_proj/up_proj/down_proj: Qwen2-MoE, OLMoE); None: from the config."""
    plan: Plan = []
    if moe_layout is None and cfg.n_experts:
        moe_layout = "mixtral" if _rope_export_type(cfg) == "mixtral" else "qwen"

    def add(ours: str, hf: str | list[str], op: str = "copy", sizes: list[int] | None = None) -> None:
        plan.append((ours, op, [hf] if isinstance(hf, str) else hf, sizes))

    def add_wb(ours: str, hf: str, op: str = "copy") -> None:  # a weight and its bias
        add(f"{ours}.weight", f"{hf}.weight", op)
        add(f"{ours}.bias", f"{hf}.bias")

    hd = cfg.head_dim
    qkv_sizes = [cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd]
    for i in range(cfg.n_layer):
        b = f"transformer.blocks.{i}."
        if family == "gpt2":
            h = f"h.{i}."
            add_wb(b + "norm1", h + "ln_1")
            add_wb(b + "attn.qkv", h + "attn.c_attn", "t")  # Conv1D: (in, out)
            add_wb(b + "attn.proj", h + "attn.c_proj", "t")
            add_wb(b + "norm2", h + "ln_2")
            add_wb(b + "mlp.fc", h + "mlp.c_fc", "t")
            add_wb(b + "mlp.proj", h + "mlp.c_proj", "t")
        elif family == "llama":
            h = f"layers.{i}."
            add(b + "norm1.weight", h + "input_layernorm.weight")
            add(b + "attn.qkv.weight", [h + f"self_attn.{p}_proj.weight" for p in "qkv"], "cat", qkv_sizes)
            if cfg.qkv_has_bias:  # Qwen2.5
                add(b + "attn.qkv.bias", [h + f"self_attn.{p}_proj.bias" for p in "qkv"], "cat", qkv_sizes)
            if cfg.qk_norm:  # Qwen3, Gemma 3
                add(b + "attn.q_norm.weight", h + "self_attn.q_norm.weight")
                add(b + "attn.k_norm.weight", h + "self_attn.k_norm.weight")
            add(b + "attn.proj.weight", h + "self_attn.o_proj.weight")
            if cfg.sandwich_norm:  # Gemma 3: a norm after attention, and one before and after the MLP
                add(b + "post_attn_norm.weight", h + "post_attention_layernorm.weight")
                add(b + "norm2.weight", h + "pre_feedforward_layernorm.weight")
                add(b + "post_mlp_norm.weight", h + "post_feedforward_layernorm.weight")
            else:  # Llama's "post-attention" norm is the one before the MLP
                add(b + "norm2.weight", h + "post_attention_layernorm.weight")
            if cfg.is_moe_layer(i):
                _plan_experts(add, cfg, b + "mlp.", h, moe_layout)
            else:
                add(b + "mlp.fc.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], "cat",
                    [cfg.mlp_hidden, cfg.mlp_hidden])
                add(b + "mlp.proj.weight", h + "mlp.down_proj.weight")
        else:  # bert
            h = f"encoder.layer.{i}."
            for kind in ("weight", "bias"):
                add(b + f"attn.qkv.{kind}", [h + f"attention.self.{p}.{kind}" for p in ("query", "key", "value")],
                    "cat", qkv_sizes)
            add_wb(b + "attn.proj", h + "attention.output.dense")
            add_wb(b + "norm1", h + "attention.output.LayerNorm")
            add_wb(b + "mlp.fc", h + "intermediate.dense")
            add_wb(b + "mlp.proj", h + "output.dense")
            add_wb(b + "norm2", h + "output.LayerNorm")

    if family == "gpt2":
        add("transformer.tok_emb.weight", "wte.weight")
        add("transformer.pos_emb.weight", "wpe.weight")
        add_wb("transformer.norm", "ln_f")
    elif family == "llama":
        add("transformer.tok_emb.weight", "embed_tokens.weight")
        add("transformer.norm.weight", "norm.weight")
    else:
        add("transformer.tok_emb.weight", "embeddings.word_embeddings.weight")
        add("transformer.pos_emb.weight", "embeddings.position_embeddings.weight")
        if cfg.type_vocab_size:
            add("transformer.type_emb.weight", "embeddings.token_type_embeddings.weight")
        add_wb("transformer.emb_norm", "embeddings.LayerNorm")
        if cfg.mlm_head:
            add_wb("mlm.dense", "cls.predictions.transform.dense")
            add_wb("mlm.norm", "cls.predictions.transform.LayerNorm")
            add("mlm.bias", "cls.predictions.bias")
            if not cfg.tie_embeddings:
                add("mlm.decoder.weight", "cls.predictions.decoder.weight")
    if family != "bert" and not cfg.tie_embeddings:
        add("lm_head.weight", "lm_head.weight")
    return plan


def _plan_experts(add, cfg: ModelConfig, ours: str, h: str, layout: str) -> None:
    """Plan entries of one MoE layer: the router, each expert's fused gate/up and down projections,
    and (Qwen2-MoE) the shared expert and its gate."""
    hid = [cfg.expert_hidden, cfg.expert_hidden]
    if layout == "mixtral":  # w1: gate, w3: up, w2: down
        add(ours + "router.weight", h + "block_sparse_moe.gate.weight")
        for e in range(cfg.n_experts):
            x = f"{h}block_sparse_moe.experts.{e}."
            add(f"{ours}experts.{e}.fc.weight", [x + "w1.weight", x + "w3.weight"], "cat", hid)
            add(f"{ours}experts.{e}.proj.weight", x + "w2.weight")
        return
    add(ours + "router.weight", h + "mlp.gate.weight")
    for e in range(cfg.n_experts):
        x = f"{h}mlp.experts.{e}."
        add(f"{ours}experts.{e}.fc.weight", [x + "gate_proj.weight", x + "up_proj.weight"], "cat", hid)
        add(f"{ours}experts.{e}.proj.weight", x + "down_proj.weight")
    if cfg.shared_expert_hidden:
        x = h + "mlp.shared_expert."
        add(ours + "shared.fc.weight", [x + "gate_proj.weight", x + "up_proj.weight"], "cat",
            [cfg.shared_expert_hidden, cfg.shared_expert_hidden])
        add(ours + "shared.proj.weight", x + "down_proj.weight")
        add(ours + "shared_gate.weight", h + "mlp.shared_expert_gate.weight")


def _tied_keys(cfg: ModelConfig) -> list[str]:
    """lmforge tensors that are the token embedding itself when weights are tied."""
    if not cfg.tie_embeddings:
        return []
    return ["mlm.decoder.weight"] if cfg.arch == "encoder" and cfg.mlm_head else \
        ["lm_head.weight"] if cfg.arch == "decoder" else []


def _normalise(hf_state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Hugging Face names without the backbone prefix, old BERT spellings made current."""
    prefix = _PREFIX[family]
    out: dict[str, torch.Tensor] = {}
    for k, v in hf_state.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
        if family == "bert":  # very old BERT files: LayerNorm.gamma/beta
            k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        out[k] = v
    if family == "bert" and "cls.predictions.bias" not in out and "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out.pop("cls.predictions.decoder.bias")
    return out


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge tensors (every key of ``build(config).state_dict()``) from Hugging Face tensors.

    Tensors the config needs but the file lacks are a :class:`CheckpointError`; tensors lmforge
    has no place for (a classifier, a bias, ...) an :class:`InteropError`. Buffers, BERT's pooler
    and next-sentence head, and an LM head tied to the embeddings are ignored.
    """
    family = _family_of(config)
    src = _normalise(hf_state, family)
    layout = None
    if config.n_experts:  # the file's own naming of expert tensors
        layout = "mixtral" if any(".block_sparse_moe." in k for k in src) else "qwen"
    plan = _plan(config, family, layout)
    needed = [n for _, _, names, _ in plan for n in names]
    missing = [n for n in needed if n not in src]
    if missing:
        raise CheckpointError(f"Hugging Face weights: {len(missing)} tensor(s) the config needs are missing: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    skip = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    leftover = sorted(k for k in set(src) - set(needed) if k not in skip and not _IGNORED[family].match(k))
    if leftover:
        raise InteropError(f"Hugging Face weights: {len(leftover)} tensor(s) lmforge has no place for: "
                           f"{', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
    out: dict[str, torch.Tensor] = {}
    for ours, op, names, _ in plan:
        ts = [src[n] for n in names]
        try:
            out[ours] = ts[0].t() if op == "t" else torch.cat(ts, dim=0) if op == "cat" else ts[0]
        except RuntimeError as e:
            raise CheckpointError(f"Hugging Face weights: {', '.join(names)}: shapes do not fit together "
                                  f"({_first_line(e)})") from None
    for key in _tied_keys(config):
        out[key] = out["transformer.tok_emb.weight"]
    return out


def _fit_config_to_weights(cfg: ModelConfig, hf: dict[str, Any], hf_state: dict[str, torch.Tensor],
                           folder: Path) -> ModelConfig:
    """What only the files can tell: whether a BERT file holds an MLM head, whether a base model
    (no LM head in the file) must tie its head, and a sentence-transformers pooling mode."""
    family = _family_of(cfg)
    names = _normalise(hf_state, family)
    changes: dict[str, Any] = {}
    if family == "bert":
        changes["mlm_head"] = "cls.predictions.transform.dense.weight" in names
        pooling = folder / "1_Pooling" / CONFIG
        if pooling.is_file():
            try:
                p = json.loads(pooling.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                p = {}
            if isinstance(p, dict) and p.get("pooling_mode_mean_tokens"):
                changes["pooling"] = "mean"
            elif isinstance(p, dict) and p.get("pooling_mode_cls_token"):
                changes["pooling"] = "cls"
    elif not cfg.tie_embeddings and "lm_head.weight" not in names \
            and any(a in _BASE_MODELS for a in hf.get("architectures") or []):
        # A base model has no LM head: its product is the hidden states, and logits come from
        # the embeddings (as GPT-2 ties them).
        changes["tie_embeddings"] = True
    return ModelConfig.from_dict({**cfg.to_dict(), **changes}) if changes else cfg


# ================================================================= import
def load_hf(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = False):
    """Build the lmforge model of a Hugging Face folder and load its weights (eval mode).

    Supported: GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``), Llama-family (``LlamaForCausalLM``,
    ``LlamaModel``, plain Mistral; GQA, tied or untied head, llama3/linear RoPE scaling),
    ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM``, ``MixtralForCausalLM``,
    ``Qwen2MoeForCausalLM``, ``OlmoeForCausalLM`` (and their base models), BERT (``BertModel``,
    ``BertForMaskedLM``, ``BertForPreTraining``). A BERT masked-LM head (``cls.predictions.*``)
    is loaded when the file has one (``mlm_head`` is False otherwise). ``BertModel``'s pooler
    (CLS -> dense -> tanh) and BERT's next-sentence head are not used by lmforge and are
    ignored; lmforge pools with ``pooling`` (mean when a sentence-transformers
    ``1_Pooling/config.json`` says so, else CLS). A base decoder without LM head weights gets a
    head tied to its embeddings.

    With ``with_tokenizer`` returns ``(model, tokenizer)``: the folder's ``tokenizer.json``
    loaded with :func:`lmforge.tokenizer.load_tokenizer`, or None when absent.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected a Hugging Face model folder with {CONFIG}")
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf)
    hf_state = read_hf_weights(folder)
    cfg = _fit_config_to_weights(cfg, hf, hf_state, folder)
    state = state_dict_from_hf(hf_state, cfg)
    model = build(cfg)
    expected = model.state_dict()
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{folder}: {key}: shape {tuple(t.shape)} in the weights, expected "
                                  f"{tuple(expected[key].shape)} from {CONFIG}")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    model.to(device).eval()
    if not with_tokenizer:
        return model
    tok = None
    if (folder / TOKENIZER).is_file():
        tok = load_tokenizer(folder / TOKENIZER)
        _read_tokenizer_config(tok, folder / TOKENIZER_CONFIG)
        if tok.vocab_size > cfg.vocab_size:
            raise CheckpointError(f"{folder / TOKENIZER}: tokenizer has {tok.vocab_size} tokens but the model's "
                                  f"vocab_size is {cfg.vocab_size}")
    return model, tok


def _read_tokenizer_config(tok, path: Path) -> None:
    """Take the chat template and the bos/eos/pad tokens of ``tokenizer_config.json`` (or of a
    ``chat_template.jinja`` beside it) into ``tok``; an absent or unreadable file changes nothing."""
    try:
        d = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        d = {}
    d = d if isinstance(d, dict) else {}
    template = d.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = path.parent / "chat_template.jinja"
    if not isinstance(template, str) and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    ids = {}
    for role in ("bos", "eos", "pad"):
        t = d.get(f"{role}_token")
        t = t.get("content") if isinstance(t, dict) else t
        if isinstance(t, str) and tok.token_to_id(t) is not None:
            ids[f"{role}_id"] = tok.token_to_id(t)
    tok.configure(**ids, chat_template=template if isinstance(template, str) else None)


# ================================================================= export
def _export_problems(cfg: ModelConfig) -> list[str]:
    """Why ``cfg`` has no exact Hugging Face equivalent (empty when it has one)."""
    p: list[str] = []
    if cfg.arch != "decoder":
        return [f"model.arch: got {cfg.arch!r}; export writes decoders only (GPT2LMHeadModel or LlamaForCausalLM)"]
    if cfg.norm_position != "pre":
        p.append(f"model.norm_position: got {cfg.norm_position!r}; GPT-2 and Llama are pre-LN (expected 'pre')")
    if cfg.embedding_norm:
        p.append("model.embedding_norm: got true; GPT-2 and Llama have no embedding norm (expected false)")
    if cfg.type_vocab_size:
        p.append(f"model.type_vocab_size: got {cfg.type_vocab_size}; GPT-2 and Llama have no token types (expected 0)")
    if cfg.positional == "learned":  # GPT2LMHeadModel
        if cfg.norm != "layernorm":
            p.append(f"model.norm: got {cfg.norm!r} with learned positions; GPT-2 uses 'layernorm'")
        if cfg.activation not in ("gelu_tanh", "gelu", "relu"):
            p.append(f"model.activation: got {cfg.activation!r} with learned positions; GPT-2 supports "
                     f"gelu_tanh, gelu or relu")
        if not cfg.bias:
            p.append("model.bias: got false with learned positions; GPT-2 has biases (expected true)")
        if cfg.n_experts:
            p.append(f"model.n_experts: got {cfg.n_experts} with learned positions; GPT-2 has no experts "
                     f"(expected 0, or rope positions for Mixtral/Qwen2-MoE/OLMoE)")
        if cfg.n_kv_head != cfg.n_head:
            p.append(f"model.n_kv_head: got {cfg.n_kv_head} with learned positions; GPT-2 has no grouped-query "
                     f"attention (expected n_head={cfg.n_head})")
    elif cfg.positional == "rope":  # LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM
        p += _rope_export_problems(cfg)
    else:
        p.append(f"model.positional: got {cfg.positional!r}; GPT-2 needs 'learned', Llama 'rope'")
    return p


# Export targets of RoPE decoders: the Hugging Face class, and what it fixes (ModelConfig field -> value;
# the family is picked by _rope_export_type from the fields only one of them has).
_EXPORT_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                   "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                   "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
_EXPORT_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3",
                 "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "olmoe": "OLMoE"}


def _rope_export_type(c: ModelConfig) -> str:
    if c.n_experts:  # OLMoE's q/k norm, else Qwen2-MoE's shared expert / dense layers / plain weights, else Mixtral
        if c.qk_norm:
            return "olmoe"
        if c.shared_expert_hidden or c.qkv_has_bias or not c.norm_topk_prob or c.moe_every != 1 or c.dense_layers:
            return "qwen2_moe"
        return "mixtral"
    if c.sandwich_norm or c.norm_unit_offset or c.scale_embeddings or c.activation == "geglu_tanh" \
            or c.logit_softcap is not None or c.attn_scale is not None or c.rope_local_theta is not None \
            or c.attn_softcap is not None:
        return "gemma3_text" if c.qk_norm or c.rope_local_theta is not None else "gemma2"
    if c.qk_norm:
        return "qwen3"
    if c.qkv_bias and not c.bias:
        return "qwen2"
    return "llama"


def _rope_export_problems(c: ModelConfig) -> list[str]:
    """Fields a RoPE decoder has that its Hugging Face class (``_rope_export_type``) cannot express."""
    mt = _rope_export_type(c)
    name = _EXPORT_NAMES[mt]
    want = {"norm": "rmsnorm", "bias": False, "qkv_has_bias": mt == "qwen2",
            "activation": "geglu_tanh" if mt.startswith("gemma") else "swiglu",
            **{k: v for k, v in _ROPE_DECODERS[mt].items() if k not in ("activation", "qkv_bias")}}
    if mt == "qwen2_moe":
        del want["qkv_has_bias"]  # a config field of Qwen2-MoE, either way
    p = []
    for field, value in want.items():
        got = getattr(c, field)
        if got != value:
            label = "qkv_bias" if field == "qkv_has_bias" else field
            p.append(f"model.{label}: got {got!r} with rope positions; {name} expects {value!r}")
    if mt == "gemma2" and c.rope_scaling is not None:
        p.append(f"model.rope_scaling: got {c.rope_scaling!r}; Gemma 2 has plain RoPE (expected null)")
    if not mt.startswith("gemma"):
        if c.has_local_layers and mt == "llama":
            p.append("model.layer_types: Llama has no sliding-window layers (expected all global)")
        if c.rope_local_theta is not None:
            p.append(f"model.rope_local_theta: {name} has one RoPE base for every layer (expected null)")
    else:
        if c.attn_softcap is not None and mt == "gemma3_text":
            p.append(f"model.attn_softcap: got {c.attn_softcap!r}; transformers' Gemma 3 does not cap attention "
                     f"scores (expected null)")
        if _query_pre_attn_scalar(c) is None:
            p.append(f"model.attn_scale: got {c.attn_scale!r}; {name} scales by query_pre_attn_scalar**-0.5 "
                     f"with an integer scalar")
    if mt in ("qwen2", "qwen2_moe", "olmoe") and c.head_size not in (None, c.n_embd // c.n_head):
        p.append(f"model.head_size: got {c.head_size}; {name} derives it as n_embd/n_head = {c.n_embd // c.n_head}")
    if c.qk_norm_span != "head" and mt != "olmoe":
        p.append(f"model.qk_norm_span: got {c.qk_norm_span!r}; {name} norms each head (expected 'head')")
    if mt in _MOE_TYPES:
        p += _moe_export_problems(c, mt, name)
    return p


def _moe_export_problems(c: ModelConfig, mt: str, name: str) -> list[str]:
    """Mixture-of-experts fields the Hugging Face class ``mt`` cannot express."""
    p = []
    if c.has_local_layers:
        p.append(f"model.layer_types: {name} export has no sliding-window layers (expected all global)")
    if mt == "qwen2_moe":
        if not c.shared_expert_hidden:
            p.append(f"model.shared_expert_hidden: got 0; {name} always has a shared expert (expected > 0)")
        return p
    if c.moe_every != 1 or c.dense_layers:
        p.append(f"model.moe_every/dense_layers: {name} has experts in every layer (expected 1 and null)")
    if mt == "mixtral" and not c.norm_topk_prob:
        p.append(f"model.norm_topk_prob: got false; {name} renormalises the top-k weights (expected true)")
    return p


def _query_pre_attn_scalar(c: ModelConfig) -> int | None:
    """Gemma 3's integer query_pre_attn_scalar giving exactly ``attn_scale`` (None: none does)."""
    if c.attn_scale is None:
        return c.head_dim
    n = round(c.attn_scale ** -2)
    return n if n > 0 and n ** -0.5 == c.attn_scale else None


def _rope_to_hf(theta: float, scaling: dict | None) -> dict[str, Any]:
    """transformers 5's rope_parameters of one RoPE (base and scaling)."""
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": scaling["type"], "rope_theta": theta, **{k: v for k, v in scaling.items() if k != "type"}}


def config_to_hf(config: ModelConfig, tokenizer=None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of an lmforge decoder: GPT-2 (learned positions); Llama,
    Qwen2, Qwen3 or Gemma 3 (RoPE; whichever has the config's fields).

    Raises :class:`InteropError` listing every field with no Hugging Face equivalent.
    """
    problems = _export_problems(config)
    if problems:
        raise InteropError("cannot export to Hugging Face format: " + "; ".join(problems))
    c = config
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_id", None) for role in ("bos", "eos", "pad")}
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
              **ids, "use_cache": True, "dtype": str(dtype).removeprefix("torch.")}
    if c.positional == "learned":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation]
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": c.context_length,
                "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.mlp_hidden,
                "activation_function": act, "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout,
                "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, **common}
    mt = _rope_export_type(c)
    shape = {"architectures": [_EXPORT_CLASSES[mt]], "model_type": mt, "hidden_size": c.n_embd,
             "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
             "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim, "max_position_embeddings": c.context_length,
             "rms_norm_eps": c.norm_eps, "attention_dropout": c.dropout}
    rope = _rope_to_hf(c.rope_theta, c.rope_scaling)
    types = ["sliding_attention" if c.layer_type(i) == "local" else "full_attention" for i in range(c.n_layer)]
    if mt == "llama":
        return {**shape, "hidden_act": "silu", "rope_theta": c.rope_theta, "rope_scaling": None,
                "rope_parameters": rope, "attention_bias": False, "mlp_bias": False, **common}
    if mt in _MOE_TYPES:
        if mt != "mixtral":
            del shape["head_dim"]  # Qwen2-MoE and OLMoE derive it
        return {**shape, **_moe_to_hf(c, mt), "hidden_act": "silu", "rope_parameters": rope,
                "output_router_logits": False, **common}
    if mt in ("qwen2", "qwen3"):
        if mt == "qwen2":
            del shape["head_dim"]  # Qwen2 derives it
        local = c.has_local_layers
        return {**shape, "hidden_act": "silu", "rope_parameters": rope, "use_sliding_window": local,
                "sliding_window": c.sliding_window if local else None, "max_window_layers": c.n_layer,
                "layer_types": types, **({"attention_bias": False} if mt == "qwen3" else {}), **common}
    if mt == "gemma3_text":  # one RoPE per layer type
        own = c.rope_local_theta is not None  # local layers' own plain RoPE, else the shared (scaled) one
        rope = {"full_attention": rope,
                "sliding_attention": _rope_to_hf(c.rope_local_theta, None) if own else dict(rope)}
    return {**shape, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _query_pre_attn_scalar(c),
            "rope_parameters": rope, "sliding_window": c.sliding_window or c.context_length, "layer_types": types,
            "final_logit_softcapping": c.logit_softcap, "attn_logit_softcapping": c.attn_softcap,
            "use_bidirectional_attention": False, "attention_bias": False, **common}


def _moe_to_hf(c: ModelConfig, mt: str) -> dict[str, Any]:
    """The mixture-of-experts keys of a Mixtral, Qwen2-MoE or OLMoE ``config.json``."""
    common = {"num_experts_per_tok": c.n_experts_per_token, "router_aux_loss_coef": c.router_aux_loss_coef}
    if mt == "mixtral":
        return {**common, "num_local_experts": c.n_experts, "intermediate_size": c.expert_hidden,
                "router_jitter_noise": 0.0, "sliding_window": None}
    if mt == "olmoe":
        return {**common, "num_experts": c.n_experts, "intermediate_size": c.expert_hidden,
                "norm_topk_prob": c.norm_topk_prob, "attention_bias": False, "clip_qkv": None}
    return {**common, "num_experts": c.n_experts, "intermediate_size": c.mlp_hidden,
            "moe_intermediate_size": c.expert_hidden, "shared_expert_intermediate_size": c.shared_expert_hidden,
            "norm_topk_prob": c.norm_topk_prob, "decoder_sparse_step": c.moe_every,
            "mlp_only_layers": list(c.dense_layers or []), "qkv_bias": c.qkv_has_bias, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": c.n_layer}


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (full names, fresh contiguous CPU memory) from lmforge's: the plan run
    backwards. A tied head is left out, as ``save_pretrained`` does; an lmforge tensor with no
    Hugging Face place (e.g. an extra head) is an :class:`InteropError`."""
    family = _family_of(config)
    plan = _plan(config, family)
    extra = sorted(set(state) - {ours for ours, _, _, _ in plan} - set(_tied_keys(config)))
    if extra:
        raise InteropError(f"model weights with no Hugging Face place: {', '.join(extra[:5])}")
    prefix = _PREFIX[family]
    out: dict[str, torch.Tensor] = {}
    for ours, op, names, sizes in plan:
        t = state[ours].detach().cpu()
        pieces = t.split(sizes, dim=0) if op == "cat" else [t.t() if op == "t" else t]
        for name, piece in zip(names, pieces):
            full = name if name.startswith(_HEAD_PREFIXES) else prefix + name
            out[full] = piece.contiguous().clone()  # no shared memory: safetensors refuses it
    return out


def tokenizer_config_to_hf(tokenizer, context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for an exported tokenizer: the generic fast tokenizer class (so
    ``AutoTokenizer`` does not re-configure it as GPT-2's or Llama's own), the special tokens by
    role, and no clean-up of spaces on decode (lmforge's decode is exact)."""
    roles = {f"{role}_token": tokenizer.id_to_token(i) for role in ("bos", "eos", "pad", "unk")
             if (i := getattr(tokenizer, f"{role}_id", None)) is not None}
    d = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
         "clean_up_tokenization_spaces": False, **roles}
    if getattr(tokenizer, "chat_template", None) is not None:  # transformers' apply_chat_template reads it
        d["chat_template"] = tokenizer.chat_template
    return d


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``) that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads with the same logits.

    GPT-2 style decoders (learned positions, pre-LN LayerNorm, gelu_tanh/gelu/relu, biases, MHA)
    become ``GPT2LMHeadModel``; RoPE decoders the class with their fields: ``LlamaForCausalLM``
    (RMSNorm, SwiGLU, no biases, GQA, llama3/linear RoPE scaling), ``Qwen2ForCausalLM`` (q/k/v
    biases), ``Qwen3ForCausalLM`` (q/k norm, explicit head size), ``Gemma3ForCausalLM`` (Gemma 3's
    norms, GeGLU, embedding scale, local/global layers), and for a mixture of experts
    ``MixtralForCausalLM`` (top-k renormalised, experts in every layer), ``Qwen2MoeForCausalLM``
    (shared expert, dense layers) or ``OlmoeForCausalLM`` (q/k norm over all heads); the head is
    tied or not as in lmforge. Anything else is an
    :class:`InteropError` naming the fields. The tokenizer, of any kind, is written as a Hugging
    Face ``tokenizer.json`` plus ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained``
    loads the folder and gives the same ids.
    """
    from safetensors.torch import save_file

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise InteropError(f"model: got {type(model).__name__} without an lmforge ModelConfig; "
                           f"expected an lmforge model")
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    hf_cfg = config_to_hf(cfg, tokenizer, dtype)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise InteropError(f"tokenizer: has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}")
    hf_state = state_dict_to_hf(model.state_dict(), cfg)

    out = Path(out_dir)
    for p in (out, *out.parents):  # a file where the folder (or one above it) should be
        if p.exists() and not p.is_dir():
            raise InteropError(f"{out}: {p} is a file, expected a folder (or nothing) there for "
                               f"the Hugging Face export")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda p: save_file(hf_state, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG, lambda p: p.write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8"))
    if tokenizer is not None:
        tok_json = tokenizer.to_hf_json()  # char, byte, BPE and imported alike (Hugging Face form)
        tok_cfg = tokenizer_config_to_hf(tokenizer, cfg.context_length)
        atomic_write(out / TOKENIZER, lambda p: p.write_text(tok_json, encoding="utf-8"))
        atomic_write(out / TOKENIZER_CONFIG,
                     lambda p: p.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8"))
    return out
