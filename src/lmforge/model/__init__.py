"""lmforge.model: one set of building blocks, many architectures.

``build(config)`` turns a :class:`ModelConfig` (or a preset name) into a module. Decoders return
logits ``(B, T, vocab)`` from ``model(input_ids, attention_mask=None)``.
"""

from __future__ import annotations

import torch.nn as nn

from lmforge.model.bigram import BigramLM
from lmforge.model.config import PRESETS, ModelConfig
from lmforge.model.heads import ClassificationHead, MLMHead, ValueHead, pool
from lmforge.model.layers import KVCache
from lmforge.model.moe import inactive_parameters
from lmforge.model.transformer import DecoderLM, Encoder, Transformer, causal_lm_loss

__all__ = [
    "ModelConfig", "PRESETS", "build", "DecoderLM", "Encoder", "Transformer", "BigramLM", "KVCache",
    "ClassificationHead", "MLMHead", "ValueHead", "pool", "causal_lm_loss", "count_parameters",
    "count_active_parameters", "flops_per_token", "summary",
]


def build(config: ModelConfig | str | dict) -> nn.Module:
    """A model for ``config``: a ModelConfig, a preset name, or a dict of fields (may name a preset)."""
    config = ModelConfig.coerce(config)
    config.validate()
    return {"decoder": DecoderLM, "encoder": Encoder, "bigram": BigramLM}[config.arch](config)


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights counted once); optionally without the embedding tables
    (token, position, token type). An untied LM head is a real matmul and stays counted."""
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    t = getattr(model, "transformer", None)
    if exclude_embeddings and t is not None:
        for emb in (t.tok_emb, t.pos_emb, t.type_emb):
            if emb is not None:
                n -= emb.weight.numel()
    return n


def count_active_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters one token runs through: ``count_parameters`` less the experts it is not routed
    to ((n_experts - top_k) per MoE layer); the same as ``count_parameters`` for a dense model."""
    return count_parameters(model, exclude_embeddings) - inactive_parameters(model.config)


def flops_per_token(config: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """FLOPs per token: 6N + 12·L·C·T for a training step (forward + backward), a third of it
    for a forward pass (Kaplan et al. 2020; PaLM appendix B). N counts the matmul weights, the
    LM head included; embeddings lookups are free. A mixture-of-experts layer counts what a token
    runs: the router, its top-k experts and the shared expert (active parameters)."""
    c = config
    T = seq_len or c.context_length
    if c.arch == "bigram":
        n = 0
        attn = 0
    else:
        qkv = c.n_embd * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.n_embd
        mlp = c.n_embd * c.mlp_hidden * (3 if c.gated else 2)
        n = c.n_layer * (qkv + mlp) + c.n_embd * c.vocab_size
        if c.n_experts:  # MoE layers: router + top-k experts + shared expert (and its gate) instead of the MLP
            per = 3 if c.gated else 2
            moe = c.n_embd * (c.n_experts + c.n_experts_per_token * c.expert_hidden * per
                              + (c.shared_expert_hidden * per + 1 if c.shared_expert_hidden else 0))
            n += sum(c.is_moe_layer(i) for i in range(c.n_layer)) * (moe - mlp)
        # q·k and att·v, per token, forward, over the keys a layer sees (a local layer: its window)
        keys = sum(min(T, c.sliding_window) if c.layer_type(i) == "local" else T for i in range(c.n_layer))
        attn = 2 * c.n_head * c.head_dim * keys
    fwd = 2 * n + 2 * attn
    return 3 * fwd if training else fwd


def summary(model: nn.Module) -> dict:
    cfg = model.config
    return {
        "arch": cfg.arch,
        "preset": cfg.name or None,
        "parameters": count_parameters(model),
        "non_embedding_parameters": count_parameters(model, exclude_embeddings=True),
        **({"active_parameters": count_active_parameters(model)} if getattr(cfg, "n_experts", 0) else {}),
        "flops_per_token_train": flops_per_token(cfg),
        "flops_per_token_forward": flops_per_token(cfg, training=False),
        "config": cfg.to_dict(),
    }
