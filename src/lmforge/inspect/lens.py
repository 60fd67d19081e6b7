"""Logit lens: read the residual stream after every layer through the model's own unembedding.

For a decoder, the hidden state h_l (B, T, C) after layer l goes through the final norm and the
LM head, giving a next-token distribution per layer; the last layer's is the model's output
(tested). Row 'embed' is the token (+ position) embedding before any layer. The target of
position t is the next token of the text (so the last position has none). For an encoder with a
masked-LM head the MLM head is the unembedding and the target is the token itself.

    lens = logit_lens(model, tokenizer, "To be, or not to be")
    lens.target_prob   # (layers + 1, positions) probability of the target token
    plot_lens(lens, "lens.png"); plot_top_tokens(lens, "lens_top5.png")
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import InputError
from lmforge.inspect.common import attention_modules, encode_text, token_labels
from lmforge.inspect.figures import new_figure, save_png

WINDOW = 64


def unembedding(model: nn.Module):
    """hidden (B, T, C) -> logits (B, T, vocab) as the model's own output does it."""
    attention_modules(model)  # a bigram has no residual stream to read: one clear error
    t = model.transformer
    final_norm = t.norm if t.norm is not None else (lambda h: h)
    if model.config.arch == "decoder":
        return lambda h: model.lm_head(final_norm(h))
    if getattr(model, "mlm", None) is not None:
        return lambda h: model.mlm(final_norm(h))
    raise InputError("this encoder has no masked-LM head (model.mlm_head: false); the logit lens needs an unembedding")


@torch.no_grad()
def residual_stream(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """[embeddings, after block 0, ..., after block L-1]: each (B, T, C), captured with hooks on
    the real forward pass."""
    blocks = model.transformer.blocks
    states: list[torch.Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0]))]
    hooks += [b.register_forward_hook(lambda _m, _a, out: states.append(out)) for b in blocks]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return states


@dataclass
class LogitLens:
    """Per layer (rows: 'embed', 'layer 0', ...) and position: the target token's probability
    and rank (0 = top-1), and the top-k tokens with their probabilities."""

    rows: list[str]
    tokens: list[str]  # labels of the input tokens at the positions shown
    targets: list[str]  # labels of the target tokens
    positions: list[int]  # positions in the text
    target_prob: torch.Tensor  # (R, P)
    target_rank: torch.Tensor  # (R, P) long
    top_tokens: list[list[list[str]]]  # (R, P, k)
    top_probs: torch.Tensor  # (R, P, k)
    logits_last: torch.Tensor  # (P, vocab): the last row's logits (equal to the model's)
    total: int  # tokens in the text

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("logits_last")
        for k in ("target_prob", "target_rank", "top_probs"):
            d[k] = getattr(self, k).tolist()
        return d


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer, text: str, k: int = 5, window: int = WINDOW) -> LogitLens:
    """The logit lens of ``text`` on ``model`` (positions limited to the last ``window``)."""
    unembed = unembedding(model)
    ids = encode_text(model, tokenizer, text)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        states = residual_stream(model, ids)
    finally:
        model.train(was_training)
    T = ids.shape[1]
    if model.config.arch == "decoder":
        if T < 2:
            raise InputError("text: the logit lens of a decoder needs at least 2 tokens (a position and its next token)")
        pos = list(range(T - 1))
        target_ids = ids[0, 1:]  # (T-1,)
    else:
        pos = list(range(T))
        target_ids = ids[0]
    pos = pos[-window:]
    target_ids = target_ids[-len(pos):]
    p_idx = torch.tensor(pos, device=ids.device)
    probs_rows, rank_rows, top_p, top_i, last = [], [], [], [], None
    for h in states:
        logits = unembed(h)[0, p_idx].float()  # (P, vocab)
        probs = logits.softmax(-1)
        tp = probs.gather(1, target_ids[:, None])[:, 0]  # (P,)
        probs_rows.append(tp.cpu())
        rank_rows.append((probs > tp[:, None]).sum(-1).cpu())  # how many tokens beat the target
        v, i = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (P, k)
        top_p.append(v.cpu())
        top_i.append(i.cpu())
        last = logits.cpu()
    labels = token_labels(tokenizer, ids[0].tolist())
    cache: dict[int, str] = {}

    def label(i: int) -> str:
        if i not in cache:
            cache[i] = token_labels(tokenizer, [i])[0]
        return cache[i]

    return LogitLens(
        rows=["embed"] + [f"layer {i}" for i in range(len(states) - 1)],
        tokens=[labels[p] for p in pos], targets=[label(int(i)) for i in target_ids], positions=pos,
        target_prob=torch.stack(probs_rows), target_rank=torch.stack(rank_rows),
        top_tokens=[[[label(int(i)) for i in row] for row in layer] for layer in top_i],
        top_probs=torch.stack(top_p), logits_last=last, total=T)


# ------------------------------------------------------------------------------------ plots
def plot_lens(lens: LogitLens, out_png: str | os.PathLike, metric: str = "prob", title: str | None = None) -> Path:
    """Heatmap layer x position of the target's probability (``metric='prob'``) or rank
    (``'rank'``, log colour scale); each cell names the layer's top-1 token when it fits."""
    if metric not in ("prob", "rank"):
        raise InputError(f"metric: got {metric!r}, expected 'prob' or 'rank'")
    from matplotlib.colors import LogNorm

    R, P = lens.target_prob.shape
    fig = new_figure(max(6.0, 0.42 * P + 2.5), max(3.0, 0.38 * R + 2.0))
    ax = fig.subplots()
    if metric == "prob":
        im = ax.imshow(lens.target_prob.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
        label = "probability of the target token"
    else:
        ranks = lens.target_rank.float().numpy() + 1
        im = ax.imshow(ranks, cmap="Blues_r", norm=LogNorm(vmin=1, vmax=max(2.0, ranks.max())), aspect="auto",
                       origin="lower")
        label = "rank of the target token (1 = top)"
    fig.colorbar(im, ax=ax, label=label, fraction=0.03, pad=0.01)
    if P <= 48:
        vals = lens.target_prob if metric == "prob" else None
        for r in range(R):
            for p in range(P):
                dark = (vals[r, p] > 0.6) if vals is not None else lens.target_rank[r, p] < 3
                ax.text(p, r, lens.top_tokens[r][p][0][:6], ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_yticks(range(R))
    ax.set_yticklabels(lens.rows, fontsize=8)
    ax.set_xticks(range(P))
    ax.set_xticklabels([f"{a} → {b}" for a, b in zip(lens.tokens, lens.targets)], rotation=90, fontsize=8)
    ax.set_xlabel("position: input token → target token")
    shown = f" (positions {lens.positions[0]}..{lens.positions[-1]} of {lens.total})" if P < lens.total - 1 else ""
    ax.set_title((title or "logit lens: cells show each layer's top-1 token") + shown, fontsize=10)
    fig.tight_layout()
    return save_png(fig, out_png)


def plot_top_tokens(lens: LogitLens, out_png: str | os.PathLike, position: int = -1, title: str | None = None) -> Path:
    """A table: for one position (default the last shown), each layer's top-k tokens and probabilities."""
    P = len(lens.positions)
    if not -P <= position < P:
        raise InputError(f"position {position} is out of range: {P} positions are shown (0..{P - 1})")
    j = position % P
    k = lens.top_probs.shape[-1]
    cells = [[f"{lens.top_tokens[r][j][c]}  {float(lens.top_probs[r, j, c]):.2f}" for c in range(k)]
             for r in range(len(lens.rows))]
    fig = new_figure(1.6 * k + 1.5, 0.32 * len(lens.rows) + 1.2)
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=lens.rows, colLabels=[f"top {c + 1}" for c in range(k)], loc="center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    ax.set_title(title or f"logit lens at position {lens.positions[j]} ('{lens.tokens[j]}'; target "
                          f"'{lens.targets[j]}')", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out_png)
