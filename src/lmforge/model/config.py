"""ModelConfig: every architecture choice is a field, checked in one place.

GPT-2, Llama and BERT are not separate classes: they are presets of the same fields, built from the
same layers (``layers.py``). ``ModelConfig.validate`` collects every problem and raises one
:class:`~lmforge.errors.ConfigError` that names each field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lmforge.errors import ConfigError

ARCHS = ("decoder", "encoder", "bigram")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
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

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.causal is None:
            self.causal = self.arch != "encoder"
        if self.mlp_hidden is None and isinstance(self.n_embd, int):
            if self.activation == "swiglu":  # keep the parameter count of a 4x GELU MLP
                self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.mlp_hidden = 4 * self.n_embd
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

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
        if p:  # divisibility checks need valid integers
            return p
        if self.n_embd % self.n_head:
            bad("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        elif self.positional == "rope" and self.head_dim % 2:
            bad("n_embd", f"head size n_embd/n_head={self.head_dim} is odd; rope needs an even head size")
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
        d = {**PRESETS[name], "name": name, **overrides}
        return cls.from_dict(d)


# Named presets. GPT-2 and Llama are the same fields with different values.
_GPT2 = dict(arch="decoder", activation="gelu_tanh", norm="layernorm", norm_eps=1e-5,
             positional="learned", bias=True, tie_embeddings=True)
_LLAMA = dict(arch="decoder", activation="swiglu", norm="rmsnorm", norm_eps=1e-6,
              positional="rope", bias=False, tie_embeddings=False)
_BERT = dict(arch="encoder", activation="gelu", norm="layernorm", norm_eps=1e-12, norm_position="post",
             embedding_norm=True, positional="learned", bias=True, tie_embeddings=True,
             type_vocab_size=2, mlm_head=True, pooling="cls")

PRESETS: dict[str, dict[str, Any]] = {
    "bigram": dict(arch="bigram", vocab_size=65, context_length=64, n_layer=1, n_head=1, n_embd=65,
                   positional="none"),
    "baby": dict(_GPT2, vocab_size=65, context_length=64, n_layer=4, n_head=4, n_embd=128),
    "small": dict(_GPT2, vocab_size=8000, context_length=256, n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(_GPT2, vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, vocab_size=50257, context_length=1024, n_layer=24, n_head=16, n_embd=1024),
    "llama-baby": dict(_LLAMA, vocab_size=65, context_length=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128),
    "llama-small": dict(_LLAMA, vocab_size=8000, context_length=512, n_layer=6, n_head=8, n_kv_head=2,
                        n_embd=256),
    "chat-gqa": dict(_LLAMA, vocab_size=8000, context_length=2048, n_layer=10, n_head=12, n_kv_head=4,
                     n_embd=768),
    "bert-mini": dict(_BERT, vocab_size=8000, context_length=256, n_layer=4, n_head=4, n_embd=256),
    "bert-base": dict(_BERT, vocab_size=30522, context_length=512, n_layer=12, n_head=12, n_embd=768),
}
