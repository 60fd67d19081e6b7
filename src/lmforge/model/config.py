"""ModelConfig: every architecture choice is a field, checked in one place.

GPT-2, Llama, Qwen, Gemma and BERT are not separate classes: they are presets of the same fields,
built from the same layers (``layers.py``). Each family's peculiarity is a named field (``qk_norm``,
``sandwich_norm``, ``sliding_window``, ...), off by default, so older configs mean what they meant.
A mixture of experts is the same kind of option (``n_experts`` > 0: Mixtral, Qwen2-MoE, OLMoE; see
``moe.py``). ``ModelConfig.validate`` collects every problem and raises one
:class:`~lmforge.errors.ConfigError` that names each field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lmforge.errors import ConfigError

ARCHS = ("decoder", "encoder", "bigram")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh")
GATED_ACTIVATIONS = ("swiglu", "geglu_tanh")  # act(x W_gate) * (x W_up): Llama/Qwen silu, Gemma tanh-GELU
LAYER_TYPES = ("global", "local")  # full causal attention, or a sliding window over recent positions
ROPE_SCALINGS = {  # rope_scaling type -> the keys it needs
    "linear": ("factor",),  # every frequency divided by factor (Gemma 3 4B+ global layers)
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
NORMS = ("layernorm", "rmsnorm")
POSITIONALS = ("learned", "rope", "none")
NORM_POSITIONS = ("pre", "post")
POOLINGS = ("mean", "cls", "last")


@dataclass
class ModelConfig:
    arch: str = "decoder"  # decoder (causal LM), encoder (BERT-style), bigram
    vocab_size: int = 65
    context_length: int = 64  # longest sequence the model sees (learned positions: a hard limit)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (MHA); 1 -> MQA; in between -> GQA
    n_embd: int = 128
    mlp_hidden: int | None = None  # None -> 4 * n_embd (gelu/relu) or ~8/3 * n_embd (swiglu)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre-LN (GPT-2, Llama) or post-LN (BERT)
    embedding_norm: bool = False  # a norm right after the embeddings (BERT)
    positional: str = "learned"
    rope_theta: float = 10000.0
    bias: bool = True  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True
    causal: bool | None = None  # None -> True for decoders, False for encoders
    init_std: float = 0.02
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT uses 2
    mlm_head: bool = False  # BERT masked-LM head (dense + act + norm + tied decoder)
    pooling: str = "mean"  # pooled output: mean over real tokens, CLS (first token), last real token
    num_classes: int = 0  # > 0 adds a classification head over the pooled output (part of the model)
    labels: list[str] | None = None  # the classifier's label names, index = class id (saved with the model)
    name: str = ""  # free-form label (the preset it came from)
    # ---- modern decoder families (all off by default: GPT-2/Llama/BERT configs are unchanged)
    head_size: int | None = None  # width of one head; None -> n_embd // n_head (Qwen3, Gemma 3 set it)
    qkv_bias: bool | None = None  # biases on the q/k/v projection; None -> follows bias (Qwen2.5: true alone)
    qk_norm: bool = False  # a norm over each query and key head, before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # also norm each sublayer's output before the residual add (Gemma 3)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), weight starting at 0 (Gemma)
    scale_embeddings: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    attn_scale: float | None = None  # attention scores times this; None -> 1/sqrt(head size) (Gemma 3: 256**-0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    logit_softcap: float | None = None  # final logits -> cap * tanh(logits / cap) (Gemma 2; a Gemma 3 option)
    sliding_window: int | None = None  # a "local" layer's query sees this many latest positions, itself included
    layer_types: list[str] | None = None  # "global"/"local" per layer; None -> global_every, else all global
    global_every: int | None = None  # every n-th layer global, the others local (Gemma 3: 6); or layer_types
    rope_local_theta: float | None = None  # local layers' own plain RoPE base (Gemma 3: 10k vs 1e6); None: shared
    rope_scaling: dict[str, Any] | None = None  # RoPE frequencies rescaled, {"type": "llama3"|"linear", ...}: all
    #                                           layers', or only global ones' when local layers have rope_local_theta
    qk_norm_span: str = "head"  # qk_norm over each head (Qwen3, Gemma 3) or over all heads at once ("all": OLMoE)
    # ---- mixture of experts (n_experts 0: every MLP dense). See moe.py; routing is dropless (no capacity).
    n_experts: int = 0  # experts per MoE layer (Mixtral 8, Qwen1.5-MoE 60, OLMoE 64)
    n_experts_per_token: int = 2  # top-k: experts each token is sent to
    moe_hidden: int | None = None  # one expert's SwiGLU width; None -> mlp_hidden
    shared_expert_hidden: int = 0  # > 0: an always-on expert of this width behind a sigmoid gate (Qwen2-MoE)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum 1 (Mixtral; Qwen2-MoE/OLMoE: no)
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss (Switch/Mixtral) in the training loss
    router_z_loss_coef: float = 0.0  # weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE)
    moe_every: int = 1  # layer i has experts when (i + 1) % moe_every == 0 (Qwen2-MoE decoder_sparse_step)
    dense_layers: list[int] | None = None  # layers kept dense whatever moe_every says (Qwen2-MoE mlp_only_layers)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.causal is None:
            self.causal = self.arch != "encoder"
        if self.mlp_hidden is None and isinstance(self.n_embd, int):
            if self.activation in GATED_ACTIVATIONS:  # keep the parameter count of a 4x GELU MLP
                self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.mlp_hidden = 4 * self.n_embd
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def gated(self) -> bool:
        """A gated MLP (gate and up projections)."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def qkv_has_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def layer_type(self, i: int) -> str:
        """'global' or 'local' (sliding window) for layer i."""
        if self.layer_types is not None:
            return self.layer_types[i]
        if self.global_every is not None:
            return "global" if (i + 1) % self.global_every == 0 else "local"
        return "global"

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's MLP is a mixture of experts (else the dense MLP of mlp_hidden)."""
        return self.n_experts > 0 and (i + 1) % self.moe_every == 0 and i not in (self.dense_layers or ())

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden if self.moe_hidden is not None else self.mlp_hidden

    @property
    def has_local_layers(self) -> bool:
        return isinstance(self.n_layer, int) and any(self.layer_type(i) == "local" for i in range(self.n_layer))

    # ------------------------------------------------------------------ checks
    def problems(self) -> list[str]:
        """Every inconsistency, each as ``"model.<field>: what is wrong (expected ...)"``."""
        p: list[str] = []

        def bad(name: str, msg: str) -> None:
            p.append(f"model.{name}: {msg}")

        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"got {v!r}, expected a positive integer")
        for name, choices in (("arch", ARCHS), ("activation", ACTIVATIONS), ("norm", NORMS),
                              ("positional", POSITIONALS), ("norm_position", NORM_POSITIONS),
                              ("pooling", POOLINGS)):
            if getattr(self, name) not in choices:
                bad(name, f"got {getattr(self, name)!r}, expected one of {', '.join(choices)}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            bad("dropout", f"got {self.dropout!r}, expected a number in [0, 1)")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            bad("norm_eps", f"got {self.norm_eps!r}, expected a positive number")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            bad("init_std", f"got {self.init_std!r}, expected a positive number")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            bad("num_classes", f"got {self.num_classes!r}, expected an integer >= 0 (0: no classification head)")
        elif self.labels is not None and (not isinstance(self.labels, list) or len(self.labels) != self.num_classes
                                          or not all(isinstance(x, str) for x in self.labels)):
            bad("labels", f"got {self.labels!r}, expected a list of {self.num_classes} label names (one per class)")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            bad("type_vocab_size", f"got {self.type_vocab_size!r}, expected an integer >= 0")
        p += self._family_problems()
        p += self._moe_problems()
        if p:  # divisibility checks need valid integers
            return p
        if self.head_size is None and self.n_embd % self.n_head:
            bad("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head} (or set head_size)")
        elif self.positional == "rope" and self.head_dim % 2:
            name = "head_size" if self.head_size is not None else "n_embd"
            bad(name, f"head size {self.head_dim} is odd; rope needs an even head size")
        if self.n_head % self.n_kv_head:
            bad("n_kv_head", f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.positional == "rope" and not self.rope_theta > 0:
            bad("rope_theta", f"got {self.rope_theta!r}, expected a positive number")
        if self.arch == "encoder" and self.causal:
            bad("causal", "an encoder is bidirectional; expected causal: false")
        if self.arch == "decoder" and not self.causal:
            bad("causal", "a decoder LM is causal; expected causal: true (use arch: encoder)")
        if self.mlm_head and self.arch != "encoder":
            bad("mlm_head", "only an encoder has a masked-LM head")
        if self.num_classes and self.arch == "bigram":
            bad("num_classes", "a bigram model has no hidden states to classify; expected a decoder or encoder")
        if self.num_classes and self.causal and self.pooling == "cls":
            bad("pooling", "'cls' on a causal decoder pools the first token, which sees nothing else; "
                           "expected 'last' (or 'mean')")
        return p

    def _family_problems(self) -> list[str]:
        """Checks of the modern-family fields (head_size ... rope_scaling)."""
        p: list[str] = []

        def bad(name: str, msg: str) -> None:
            p.append(f"model.{name}: {msg}")

        def positive(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

        hs = self.head_size
        if hs is not None and (not isinstance(hs, int) or isinstance(hs, bool) or hs <= 0):
            bad("head_size", f"got {hs!r}, expected a positive integer or null (n_embd / n_head)")
        for name in ("qk_norm", "sandwich_norm", "norm_unit_offset", "scale_embeddings"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"got {getattr(self, name)!r}, expected true or false")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            bad("qkv_bias", f"got {self.qkv_bias!r}, expected true, false or null (follows bias)")
        for name in ("attn_scale", "attn_softcap", "logit_softcap", "rope_local_theta"):
            v = getattr(self, name)
            if v is not None and not positive(v):
                bad(name, f"got {v!r}, expected a positive number or null")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            bad("norm_unit_offset", f"(1 + weight) scaling is an RMSNorm variant; got norm={self.norm!r}")
        if self.sandwich_norm and self.norm_position != "pre":
            bad("sandwich_norm", "needs norm_position: pre (the sublayer-output norms sit inside the residual)")
        # sliding-window (local) layers
        types = self.layer_types
        if types is not None:
            n = self.n_layer
            if not isinstance(types, list) or not all(t in LAYER_TYPES for t in types) \
                    or (isinstance(n, int) and len(types) != n):
                bad("layer_types", f"got {types!r:.80}, expected a list of n_layer={n} entries, each "
                                   f"{' or '.join(LAYER_TYPES)}")
                types = None
        ge = self.global_every
        if ge is not None and (not isinstance(ge, int) or isinstance(ge, bool) or ge <= 0):
            bad("global_every", f"got {ge!r}, expected a positive integer or null")
        elif ge is not None and self.layer_types is not None:
            bad("global_every", "set either layer_types (each layer) or global_every (a pattern), not both")
        local = (types is not None and "local" in types) or \
            (self.layer_types is None and isinstance(ge, int) and not isinstance(ge, bool) and ge > 1)
        sw = self.sliding_window
        if sw is not None and (not isinstance(sw, int) or isinstance(sw, bool) or sw <= 0):
            bad("sliding_window", f"got {sw!r}, expected a positive integer or null")
        elif local and sw is None:
            bad("sliding_window", "layer_types has local layers; expected their window size (a positive integer)")
        if local and self.arch != "decoder":
            bad("layer_types", f"sliding-window layers need a causal decoder; got arch={self.arch!r}")
        # RoPE variants
        if self.positional != "rope":
            for name in ("rope_scaling", "rope_local_theta"):
                if getattr(self, name) is not None:
                    bad(name, f"needs positional: rope, got {self.positional!r}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type") if isinstance(rs, dict) else None
            if kind not in ROPE_SCALINGS:
                bad("rope_scaling", f"got {rs!r:.80}, expected null or an object with type "
                                    f"{' or '.join(ROPE_SCALINGS)}")
            else:
                keys = ROPE_SCALINGS[kind]
                wrong = sorted(set(rs) - {"type", *keys})
                if wrong:
                    bad("rope_scaling", f"unknown key(s) {', '.join(wrong)} for type {kind!r} "
                                        f"(expected {', '.join(keys)})")
                for k in keys:
                    if not positive(rs.get(k)):
                        bad(f"rope_scaling.{k}", f"got {rs.get(k)!r}, expected a positive number")
                if kind == "llama3" and all(positive(rs.get(k)) for k in keys) \
                        and not rs["high_freq_factor"] > rs["low_freq_factor"]:
                    bad("rope_scaling.high_freq_factor", f"got {rs['high_freq_factor']!r}, expected more than "
                                                         f"low_freq_factor={rs['low_freq_factor']!r}")
        return p

    def _moe_problems(self) -> list[str]:
        """Checks of the mixture-of-experts fields (n_experts ... dense_layers) and qk_norm_span."""
        p: list[str] = []

        def bad(name: str, msg: str) -> None:
            p.append(f"model.{name}: {msg}")

        def count(v, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        if self.qk_norm_span not in ("head", "all"):
            bad("qk_norm_span", f"got {self.qk_norm_span!r}, expected head or all")
        if not count(self.n_experts, 0):
            bad("n_experts", f"got {self.n_experts!r}, expected an integer >= 0 (0: dense MLPs)")
            return p
        if not count(self.n_experts_per_token, 1):
            bad("n_experts_per_token", f"got {self.n_experts_per_token!r}, expected a positive integer")
        elif self.n_experts and self.n_experts_per_token > self.n_experts:
            bad("n_experts_per_token", f"got {self.n_experts_per_token}, expected at most n_experts={self.n_experts}")
        if self.moe_hidden is not None and not count(self.moe_hidden, 1):
            bad("moe_hidden", f"got {self.moe_hidden!r}, expected a positive integer or null (mlp_hidden)")
        if not count(self.shared_expert_hidden, 0):
            bad("shared_expert_hidden", f"got {self.shared_expert_hidden!r}, expected an integer >= 0 (0: none)")
        if not isinstance(self.norm_topk_prob, bool):
            bad("norm_topk_prob", f"got {self.norm_topk_prob!r}, expected true or false")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                bad(name, f"got {v!r}, expected a number >= 0")
        if not count(self.moe_every, 1):
            bad("moe_every", f"got {self.moe_every!r}, expected a positive integer")
        dl = self.dense_layers
        if dl is not None and (not isinstance(dl, list) or not all(count(i, 0) for i in dl)):
            bad("dense_layers", f"got {dl!r:.80}, expected a list of layer indices or null")
        if self.n_experts and self.arch != "decoder":
            bad("n_experts", f"experts are implemented for decoders; got arch={self.arch!r}")
        return p

    def validate(self) -> "ModelConfig":
        p = self.problems()
        if p:
            raise ConfigError(p)
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "model") -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError([f"{prefix}.{k}: unknown field (expected one of {', '.join(sorted(names))})"
                               for k in unknown])
        if "preset" in d:  # pragma: no cover - handled by callers via from_preset
            raise ConfigError(f"{prefix}.preset: use ModelConfig.from_preset")
        return cls(**d)

    @classmethod
    def coerce(cls, config: "ModelConfig | str | dict") -> "ModelConfig":
        """A ModelConfig from itself, a preset name, or a dict of fields (which may name a preset)."""
        if isinstance(config, str):
            return cls.from_preset(config)
        if isinstance(config, dict):
            d = dict(config)
            preset = d.pop("preset", None)
            return cls.from_preset(preset, **d) if preset else cls.from_dict(d)
        return config

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {name!r} (expected one of {', '.join(sorted(PRESETS))})")
        d = {**copy.deepcopy(PRESETS[name]), "name": name, **overrides}  # no list/dict shared with the table
        return cls.from_dict(d)


# Named presets. GPT-2 and Llama are the same fields with different values.
_GPT2 = dict(arch="decoder", activation="gelu_tanh", norm="layernorm", norm_eps=1e-5,
             positional="learned", bias=True, tie_embeddings=True)
_LLAMA = dict(arch="decoder", activation="swiglu", norm="rmsnorm", norm_eps=1e-6,
              positional="rope", bias=False, tie_embeddings=False)
_BERT = dict(arch="encoder", activation="gelu", norm="layernorm", norm_eps=1e-12, norm_position="post",
             embedding_norm=True, positional="learned", bias=True, tie_embeddings=True,
             type_vocab_size=2, mlm_head=True, pooling="cls")

# Modern families: the Llama fields plus each family's named differences.
_LLAMA3_ROPE = dict(rope_theta=500000.0, norm_eps=1e-5)  # + rope_scaling of type llama3 (factor per size)


def _llama3_scaling(factor: float) -> dict[str, Any]:
    return {"type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# Qwen2.5: biases on q/k/v only
_QWEN2 = dict(_LLAMA, qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6)
# Qwen3: per-head RMSNorm on q and k, explicit head size, no biases
_QWEN3 = dict(_LLAMA, qk_norm=True, head_size=128, rope_theta=1000000.0, norm_eps=1e-6)
# Gemma 3 (text): q/k norm, four norms per block, tanh-GeGLU, sqrt(C)-scaled embeddings, (1 + w) RMSNorm,
# five sliding-window layers (RoPE base 10k) to one global layer (RoPE base 1e6), scores scaled by 256**-0.5
_GEMMA3 = dict(_LLAMA, activation="geglu_tanh", qk_norm=True, sandwich_norm=True, norm_unit_offset=True,
               scale_embeddings=True, head_size=256, attn_scale=256 ** -0.5, rope_theta=1000000.0,
               rope_local_theta=10000.0, norm_eps=1e-6, tie_embeddings=True)


PRESETS: dict[str, dict[str, Any]] = {
    "bigram": dict(arch="bigram", vocab_size=65, context_length=64, n_layer=1, n_head=1, n_embd=65,
                   positional="none"),
    "baby": dict(_GPT2, vocab_size=65, context_length=64, n_layer=4, n_head=4, n_embd=128),
    "small": dict(_GPT2, vocab_size=8000, context_length=256, n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(_GPT2, vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, vocab_size=50257, context_length=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, vocab_size=50257, context_length=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, vocab_size=50257, context_length=1024, n_layer=48, n_head=25, n_embd=1600),
    "llama-baby": dict(_LLAMA, vocab_size=65, context_length=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128),
    "llama-small": dict(_LLAMA, vocab_size=8000, context_length=512, n_layer=6, n_head=8, n_kv_head=2,
                        n_embd=256),
    "chat-gqa": dict(_LLAMA, vocab_size=8000, context_length=2048, n_layer=10, n_head=12, n_kv_head=4,
                     n_embd=768),
    # real shapes of published checkpoints (lmforge info <name>: parameters and FLOPs/token)
    "llama-3.2-1b": dict(_LLAMA, **_LLAMA3_ROPE, vocab_size=128256, context_length=131072, n_layer=16, n_head=32,
                         n_kv_head=8, n_embd=2048, mlp_hidden=8192, tie_embeddings=True,
                         rope_scaling=_llama3_scaling(32.0)),
    "llama-3.2-3b": dict(_LLAMA, **_LLAMA3_ROPE, vocab_size=128256, context_length=131072, n_layer=28, n_head=24,
                         n_kv_head=8, n_embd=3072, mlp_hidden=8192, tie_embeddings=True,
                         rope_scaling=_llama3_scaling(32.0)),
    "llama-3.1-8b": dict(_LLAMA, **_LLAMA3_ROPE, vocab_size=128256, context_length=131072, n_layer=32, n_head=32,
                         n_kv_head=8, n_embd=4096, mlp_hidden=14336, tie_embeddings=False,
                         rope_scaling=_llama3_scaling(8.0)),
    "qwen2.5-0.5b": dict(_QWEN2, vocab_size=151936, context_length=32768, n_layer=24, n_head=14, n_kv_head=2,
                         n_embd=896, mlp_hidden=4864, tie_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN2, vocab_size=151936, context_length=32768, n_layer=28, n_head=12, n_kv_head=2,
                         n_embd=1536, mlp_hidden=8960, tie_embeddings=True),
    "qwen3-0.6b": dict(_QWEN3, vocab_size=151936, context_length=40960, n_layer=28, n_head=16, n_kv_head=8,
                       n_embd=1024, mlp_hidden=3072, tie_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, vocab_size=151936, context_length=40960, n_layer=28, n_head=16, n_kv_head=8,
                       n_embd=2048, mlp_hidden=6144, tie_embeddings=True),
    "gemma-3-270m": dict(_GEMMA3, vocab_size=262144, context_length=32768, n_layer=18, n_head=4, n_kv_head=1,
                         n_embd=640, mlp_hidden=2048, sliding_window=512, global_every=6),
    "gemma-3-1b": dict(_GEMMA3, vocab_size=262144, context_length=32768, n_layer=26, n_head=4, n_kv_head=1,
                       n_embd=1152, mlp_hidden=6912, sliding_window=512, global_every=6),
    # the text part of Gemma 3 4B (its global layers' RoPE is linearly scaled by 8)
    "gemma-3-4b": dict(_GEMMA3, vocab_size=262208, context_length=131072, n_layer=34, n_head=8, n_kv_head=4,
                       n_embd=2560, mlp_hidden=10240, sliding_window=1024, global_every=6,
                       rope_scaling={"type": "linear", "factor": 8.0}),
    "bert-mini": dict(_BERT, vocab_size=8000, context_length=256, n_layer=4, n_head=4, n_embd=256),
    "bert-base": dict(_BERT, vocab_size=30522, context_length=512, n_layer=12, n_head=12, n_embd=768),
}
