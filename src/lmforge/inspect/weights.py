"""Weights: per-matrix statistics, histograms by layer, and what changed between two checkpoints.

For every 2-D weight matrix W (embeddings, attention and MLP projections, heads):

    spectral norm    the largest singular value, max ||W x|| / ||x||
    Frobenius norm   sqrt(sum W_ij^2) = sqrt(sum of squared singular values)
    effective rank   exp(entropy of the normalised singular values p_i = s_i / sum s)
                     (Roy & Vetterli 2007): 1 for a rank-1 matrix, min(m, n) for equal singular values

``compare_weights(a, b)`` gives ||W_b - W_a||_F / ||W_a||_F per matrix: what fine-tuning moved.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import InputError
from lmforge.fsutil import atomic_write
from lmforge.inspect.figures import new_figure, save_png

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_group(name: str) -> str:
    """'transformer.blocks.3.attn.qkv.weight' -> 'layer 3'; embeddings -> 'embeddings';
    anything else (final norm, heads) -> 'head'."""
    m = _BLOCK.search(name)
    if m:
        return f"layer {m.group(1)}"
    if "emb" in name or name.endswith("table.weight"):
        return "embeddings"
    return "head"


def matrix_kind(name: str) -> str:
    """The role of a matrix inside its group: 'attn.qkv', 'mlp.fc', 'tok_emb', 'lm_head', ..."""
    m = _BLOCK.search(name)
    rest = name[m.end():] if m else name.split("transformer.", 1)[-1]
    return rest.removesuffix(".weight")


def spectral_norm(w: torch.Tensor) -> float:
    """Largest singular value of a 2-D matrix."""
    return float(torch.linalg.matrix_norm(w.float(), ord=2))


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) for singular values ``s`` (zeros contribute nothing)."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def matrix_stats(w: torch.Tensor) -> dict:
    """Spectral norm, Frobenius norm, effective rank (and shape, mean, std) of a 2-D matrix."""
    w = w.detach().float().cpu()
    s = torch.linalg.svdvals(w)
    return {"shape": list(w.shape), "spectral_norm": float(s[0]) if s.numel() else 0.0,
            "frobenius_norm": float(torch.linalg.matrix_norm(w, ord="fro")), "effective_rank": effective_rank(s),
            "mean": float(w.mean()), "std": float(w.std()) if w.numel() > 1 else 0.0}


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every 2-D parameter by name (tied weights once, under their first name)."""
    out = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    if not out:
        raise InputError(f"{type(model).__name__} has no weight matrices")
    return out


@torch.no_grad()
def weight_stats(model: nn.Module) -> list[dict]:
    """One record per weight matrix: name, group ('layer 3', 'embeddings', 'head'), kind, stats."""
    return [{"name": name, "group": layer_group(name), "kind": matrix_kind(name), **matrix_stats(w)}
            for name, w in weight_matrices(model).items()]


@torch.no_grad()
def compare_weights(model: nn.Module, other: nn.Module) -> list[dict]:
    """Per matrix of ``model``: relative change ||W_other - W||_F / ||W||_F (and the absolute
    change). The two models must have the same matrices and shapes."""
    a, b = weight_matrices(model), weight_matrices(other)
    missing = sorted(set(a) ^ set(b))
    if missing:
        raise InputError(f"the two models do not have the same weight matrices (e.g. {missing[0]}); "
                         f"expected two checkpoints of one architecture")
    out = []
    for name, wa in a.items():
        wb = b[name]
        if wa.shape != wb.shape:
            raise InputError(f"{name}: shape {tuple(wa.shape)} vs {tuple(wb.shape)}; expected the same architecture")
        wa, wb = wa.float().cpu(), wb.float().cpu()
        diff = float(torch.linalg.matrix_norm(wb - wa, ord="fro"))
        base = float(torch.linalg.matrix_norm(wa, ord="fro"))
        out.append({"name": name, "group": layer_group(name), "kind": matrix_kind(name),
                    "abs_change": diff, "rel_change": diff / base if base > 0 else float("inf")})
    return out


def _groups(records: list[dict]) -> list[str]:
    """Group names in model order: embeddings, layer 0, 1, ..., head."""
    def key(g: str):
        if g == "embeddings":
            return (0, 0)
        if g.startswith("layer "):
            return (1, int(g.split()[1]))
        return (2, 0)

    return sorted({r["group"] for r in records}, key=key)


# ------------------------------------------------------------------------------------ plots
@torch.no_grad()
def plot_weight_histograms(model: nn.Module, out_png: str | os.PathLike, bins: int = 80) -> Path:
    """One panel per group (embeddings, each layer, head): a histogram per matrix, overlaid."""
    mats = weight_matrices(model)
    groups = _groups([{"group": layer_group(n)} for n in mats])
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig = new_figure(4.0 * cols, 2.8 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for gi, g in enumerate(groups):
        ax = axes[gi // cols][gi % cols]
        for name, w in mats.items():
            if layer_group(name) == g:
                v = w.detach().float().flatten().cpu()
                if v.numel() > 2_000_000:  # a large embedding: a fixed-stride sample draws the same shape
                    v = v[:: v.numel() // 2_000_000 + 1]
                ax.hist(v.numpy(), bins=bins, histtype="step", density=True, label=matrix_kind(name))
        ax.set_title(g, fontsize=10)
        ax.legend(fontsize=6, loc="upper right")
        ax.tick_params(labelsize=7)
    for j in range(len(groups), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("weight distributions (density) by layer")
    fig.tight_layout()
    return save_png(fig, out_png)


def _per_layer_lines(records: list[dict], key: str):
    """{kind: (xs, ys)} over the transformer layers (embeddings/head matrices are left out)."""
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r["group"].startswith("layer "):
            xs, ys = lines.setdefault(r["kind"], ([], []))
            xs.append(int(r["group"].split()[1]))
            ys.append(r[key])
    return lines


def plot_weight_stats(records: list[dict], out_png: str | os.PathLike, title: str | None = None) -> Path:
    """Spectral norm, Frobenius norm and effective rank against layer, one line per matrix kind."""
    fig = new_figure(8.0, 8.0)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, key, label in zip(axes, ("spectral_norm", "frobenius_norm", "effective_rank"),
                              ("spectral norm", "Frobenius norm", "effective rank")):
        for kind, (xs, ys) in sorted(_per_layer_lines(records, key).items()):
            ax.plot(xs, ys, marker="o", ms=4, label=kind)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or "weight matrices per layer")
    fig.tight_layout()
    return save_png(fig, out_png)


def plot_weight_change(records: list[dict], out_png: str | os.PathLike, title: str | None = None) -> Path:
    """Relative change ||W_b - W_a||_F / ||W_a||_F against layer, one line per matrix kind;
    embeddings and head matrices are listed as text."""
    fig = new_figure(8.0, 4.5)
    ax = fig.subplots()
    for kind, (xs, ys) in sorted(_per_layer_lines(records, "rel_change").items()):
        ax.plot(xs, ys, marker="o", ms=4, label=kind)
    others = [f"{r['kind']}: {r['rel_change']:.3g}" for r in records if not r["group"].startswith("layer ")]
    if others:
        ax.text(0.01, 0.98, "\n".join(others), transform=ax.transAxes, va="top", fontsize=7, color="#444")
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("relative change ||ΔW|| / ||W||")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title(title or "what moved between the two checkpoints", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out_png)


def write_json(obj, out_json: str | os.PathLike) -> Path:
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, json.dumps(obj, indent=2) + "\n")
