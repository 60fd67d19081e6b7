"""Mixture of experts: an MLP replaced by several MLPs ("experts") and a router choosing among them.

Each token goes to the ``top_k`` experts its router scores highest and gets their outputs summed,
weighted by the router's probabilities. Parameters grow with the number of experts, compute per
token only with ``top_k``: a model of many parameters at the cost of few (Mixtral, Qwen-MoE, OLMoE).

    logits = x W_router                      (N, E)   one score per expert
    p = softmax(logits); w, e = top_k(p)     (N, k)   weights and chosen experts
    w = w / sum(w)                           (N, k)   when norm_topk_prob (Mixtral)
    y = sum_j w_j * expert_{e_j}(x)          (N, C)   (+ sigmoid(x W_g) * shared(x): Qwen2-MoE)

Routing here is **dropless**: every token reaches all of its k experts however many tokens pick
the same one (no capacity factor, no dropped tokens), which is what transformers computes, so
the outputs match it exactly. Experts are the same ``MLP`` as a dense layer (SwiGLU for these
families), each run once on the tokens routed to it.

Routers left alone collapse onto a few experts. The **load-balancing loss** (Switch Transformer
eq. 4-6, as transformers' ``load_balancing_loss_func`` computes it) pushes toward uniform use:
E * sum_e f_e * P_e, with f_e the share of top-k assignments that went to expert e and P_e its
mean router probability, both averaged over tokens and MoE layers (uniform routing: E * E * k/E * 1/E = k).
The **z-loss** (ST-MoE) mean(logsumexp(logits)^2) keeps router logits small. A decoder's forward
leaves both, weighted by the config's coefficients, in ``model.router_stats`` (:class:`RouterStats`)
for the objective to add to the loss, together with each layer's expert usage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import MLP


class MoE(nn.Module):
    """Router + experts (+ an optional gated shared expert), a drop-in for ``MLP``: (B, T, C) -> (B, T, C).

    After each forward ``router_logits`` holds the scores (B*T, E) the losses are computed from.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk = cfg.n_experts, cfg.n_experts_per_token, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.expert_hidden) for _ in range(cfg.n_experts))
        # Qwen2-MoE: one more expert every token uses, its output scaled by a learned sigmoid gate
        self.shared = MLP(cfg, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        self.shared_gate = nn.Linear(cfg.n_embd, 1, bias=False) if cfg.shared_expert_hidden else None
        self.router_logits: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), top-k weights (N, k) and chosen experts (N, k) of tokens x (N, C)."""
        logits = self.router(x)  # (N, E)
        probs = logits.float().softmax(dim=-1)  # (N, E) in float32
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k), (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        logits, weights, chosen = self.route(flat)
        self.router_logits = logits
        # group the N*k (token, expert) assignments by expert: one batched call per expert
        expert_of = chosen.reshape(-1)  # (N*k,)
        order = expert_of.argsort(stable=True)  # (N*k,) assignments sorted by expert
        counts = torch.bincount(expert_of, minlength=self.n_experts).tolist()  # tokens per expert
        token = order // self.top_k  # (N*k,) the token of each sorted assignment
        inputs = flat.index_select(0, token).split(counts)  # E pieces (n_e, C)
        outs = torch.cat([expert(xe) for expert, xe in zip(self.experts, inputs)])  # (N*k, C)
        outs = outs * weights.reshape(-1, 1)[order]  # (N*k, C) each scaled by its router weight
        y = torch.zeros_like(flat).index_add(0, token, outs)  # (N, C) the k outputs of each token summed
        if self.shared is not None:
            y = y + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat)  # (N, C)
        return y.view(shape)


# ------------------------------------------------------------------------------ router losses
def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss E * sum_e f_e * P_e over all MoE layers' logits [(N, E), ...].

    f_e: top-k assignments to expert e per token, P_e: mean router probability of e; both summed
    over layers before dividing by the token count (transformers' ``load_balancing_loss_func``).
    ``mask`` (N,) weights tokens (0: padding, left out).
    """
    E = router_logits[0].shape[-1]
    assigned = router_logits[0].new_zeros(E, dtype=torch.float32)  # (E,)
    prob_sum = router_logits[0].new_zeros(E, dtype=torch.float32)  # (E,)
    rows = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # (N, E)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        w = probs.new_ones(probs.shape[0]) if mask is None else mask.float()  # (N,)
        assigned = assigned + torch.zeros_like(assigned).scatter_add(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * w[:, None]).sum(dim=0)
        rows = rows + w.sum()
    return E * torch.sum((assigned / rows) * (prob_sum / rows))


def z_loss(router_logits: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (real) tokens of logsumexp(logits)^2, averaged over layers."""
    total = 0.0
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2  # (N,)
        total = total + (z.mean() if mask is None else (z * mask.float()).sum() / mask.float().sum())
    return total / len(router_logits)


def expert_usage(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(L, E) share of each layer's top-k assignments that went to each expert (rows sum to 1)."""
    rows = []
    for logits in router_logits:
        chosen = logits.detach().topk(top_k, dim=-1).indices  # (N, k): softmax keeps the order
        w = torch.ones(chosen.shape[0], device=chosen.device) if mask is None else mask.float()  # (N,)
        counts = torch.zeros(logits.shape[-1], device=chosen.device).scatter_add(
            0, chosen.reshape(-1), w.repeat_interleave(top_k))  # (E,)
        rows.append(counts / counts.sum().clamp(min=1))
    return torch.stack(rows)


@dataclass
class RouterStats:
    """What a MoE decoder's forward leaves for the objective (``model.router_stats``)."""

    aux_loss: torch.Tensor  # load-balancing loss (unweighted)
    z_loss: torch.Tensor  # router z-loss (unweighted)
    loss: torch.Tensor  # router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss: add it to the LM loss
    usage: torch.Tensor  # (L, E) share of tokens per expert in each MoE layer
    layers: list[int]  # the layer index of each usage row

    def metrics(self) -> dict[str, float]:
        """Scalars for the training log: the two losses and ``expert_usage/L{layer}/E{expert}``."""
        out = {"moe_aux_loss": float(self.aux_loss.detach()), "moe_z_loss": float(self.z_loss.detach())}
        for layer, row in zip(self.layers, self.usage.tolist()):
            out.update({f"expert_usage/L{layer}/E{e}": v for e, v in enumerate(row)})
        return out


def router_stats(blocks, cfg: ModelConfig, attention_mask: torch.Tensor | None = None) -> RouterStats | None:
    """The router losses and usage of the last forward through ``blocks`` (None: no MoE layer).
    ``attention_mask`` (B, T) leaves padding tokens out, as transformers does."""
    layers = [i for i, b in enumerate(blocks) if isinstance(b.mlp, MoE) and b.mlp.router_logits is not None]
    if not layers:
        return None
    logits = [blocks[i].mlp.router_logits for i in layers]
    mask = attention_mask.reshape(-1) if attention_mask is not None else None
    if mask is not None and mask.shape[0] != logits[0].shape[0]:
        mask = None  # rows that are not (B*T) tokens (unpadded or cached calls): count every row
    aux = load_balancing_loss(logits, cfg.n_experts_per_token, mask)
    z = z_loss(logits, mask)
    loss = cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z
    return RouterStats(aux, z, loss, expert_usage(logits, cfg.n_experts_per_token, mask), layers)


def find_router_stats(model: nn.Module) -> RouterStats | None:
    """``router_stats`` of a model's last forward, through torch.compile / DDP wrappers (None: dense)."""
    while not hasattr(model, "router_stats") and (hasattr(model, "_orig_mod") or hasattr(model, "module")):
        model = getattr(model, "_orig_mod", None) or model.module
    return getattr(model, "router_stats", None)


def expert_parameters(cfg: ModelConfig) -> int:
    """Parameters of one expert (a gated MLP: gate, up and down projections, biases if any)."""
    h, c = cfg.expert_hidden, cfg.n_embd
    n_in = 2 * h if cfg.gated else h
    return c * n_in + h * c + ((n_in + c) if cfg.bias else 0)


def inactive_parameters(cfg: ModelConfig) -> int:
    """Expert parameters a token skips: (n_experts - top_k) experts in every MoE layer, so
    ``count_parameters(model) - inactive_parameters(cfg)`` are the parameters a token runs through."""
    if not cfg.n_experts:
        return 0
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layer))
    return n_moe * (cfg.n_experts - cfg.n_experts_per_token) * expert_parameters(cfg)
