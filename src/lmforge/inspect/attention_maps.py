"""Attention maps: where each head of each layer looks, as tensors, PNG heatmaps and an HTML view.

SDPA does not return its weights, so ``record_attention(model)`` switches every attention layer to
the explicit path (``lmforge.model.layers.explicit_attention``: softmax(q k^T / sqrt(hs) + mask),
grouped key/value heads repeated) for the duration of a ``with`` block; each layer then keeps its
weights (B, nh, T, S) in ``last_weights``. The layer outputs equal the SDPA path's (tested).

    maps = attention(model, tokenizer, "To be, or not to be")   # tensors
    plot_attention_grid(maps, "attention.png")                    # layers x heads
    plot_attention_layer(maps, 0, "attention_layer0.png")         # one layer, larger
    attention_html(maps, "attention.html")                        # hover a token
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import InputError
from lmforge.fsutil import atomic_write
from lmforge.inspect.common import attention_modules, encode_text, label_fontsize, pick, token_labels, token_texts
from lmforge.inspect.figures import new_figure, save_png

WINDOW = 64  # tokens per axis that stay readable in a heatmap


@contextlib.contextmanager
def record_attention(model: nn.Module):
    """Within the block, every attention layer of ``model`` computes explicitly and keeps its
    weights; yields the layers (``[layer.last_weights for layer in layers]`` after a forward)."""
    layers = attention_modules(model)
    for layer in layers:
        layer.record_weights = True
        layer.last_weights = None
    try:
        yield layers
    finally:
        for layer in layers:
            layer.record_weights = False


@dataclass
class AttentionMaps:
    """Attention weights of one text: ``weights[i, j]`` is layer ``layers[i]``, head ``heads[j]``,
    a (T, T) matrix whose row t is where query token t looks (rows sum to 1)."""

    tokens: list[str]  # printable labels ('·' space, '↵' newline)
    texts: list[str]  # each token's own text
    ids: list[int]
    weights: torch.Tensor  # (len(layers), len(heads), T, T)
    layers: list[int]
    heads: list[int]
    offset: int = 0  # position of tokens[0] in the full text (after windowing)
    total: int | None = None  # tokens in the full text

    def window(self, start: int = 0, size: int = WINDOW) -> "AttentionMaps":
        """Tokens ``start .. start+size-1`` on both axes (rows then sum to at most 1)."""
        T = len(self.ids)
        if not 0 <= start < T:
            raise InputError(f"window start {start} is out of range: the text has {T} tokens (0..{T - 1})")
        end = min(T, start + size)
        return replace(self, tokens=self.tokens[start:end], texts=self.texts[start:end], ids=self.ids[start:end],
                       weights=self.weights[:, :, start:end, start:end], offset=self.offset + start,
                       total=self.total or T)


@torch.no_grad()
def attention(model: nn.Module, tokenizer, text: str, layers: list[int] | None = None,
              heads: list[int] | None = None) -> AttentionMaps:
    """Run ``text`` through ``model`` once and return the attention weights of ``layers`` x
    ``heads`` (default all; negative indices count from the end)."""
    mods = attention_modules(model)
    n_head = model.config.n_head
    layer_idx = pick(layers, len(mods), "layer")
    head_idx = pick(heads, n_head, "head")
    ids = encode_text(model, tokenizer, text)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        with record_attention(model) as recorded:
            model(ids)
    finally:
        model.train(was_training)
    w = torch.stack([recorded[i].last_weights[0] for i in layer_idx])  # (L, nh, T, T)
    w = w[:, head_idx].float().cpu()
    id_list = ids[0].tolist()
    return AttentionMaps(tokens=token_labels(tokenizer, id_list), texts=token_texts(tokenizer, id_list),
                         ids=id_list, weights=w, layers=layer_idx, heads=head_idx, total=len(id_list))


def head_patterns(maps: AttentionMaps) -> list[dict]:
    """How each (layer, head) spends its attention, averaged over query tokens:

    self / previous / first   weight on the query itself, on the token just before it, on token 0
    distance                  mean |query - key| under the weights
    induction                 weight on keys j whose previous token equals the query token
                              (the token that followed an earlier copy of the query), averaged
                              over queries that have such an earlier copy; None when none does
    """
    w = maps.weights  # (L, H, T, T)
    T = w.shape[-1]
    q = torch.arange(T)
    ids = torch.tensor(maps.ids)
    follows = torch.zeros(T, T, dtype=torch.bool)  # follows[t, j]: ids[j-1] == ids[t], j-1 < t
    follows[:, 1:] = (ids[None, :-1] == ids[:, None]) & (q[None, 1:] <= q[:, None])
    has = follows.any(-1)
    out = []
    for i, layer in enumerate(maps.layers):
        for j, head in enumerate(maps.heads):
            m = w[i, j]  # (T, T)
            prev = m[q[1:], q[1:] - 1].mean() if T > 1 else torch.tensor(0.0)
            ind = (m * follows).sum(-1)[has].mean() if has.any() else None
            out.append({"layer": layer, "head": head, "self": float(m.diagonal().mean()), "previous": float(prev),
                        "first": float(m[:, 0].mean()),
                        "distance": float((m * (q[:, None] - q[None, :]).abs()).sum(-1).mean()),
                        "induction": None if ind is None else float(ind)})
    return out


# ------------------------------------------------------------------------------------ heatmaps
def _heatmap(ax, m: torch.Tensor, maps: AttentionMaps, xlabels: bool, ylabels: bool, fontsize: float):
    T = m.shape[0]
    ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_xticklabels(maps.tokens if xlabels else [], rotation=90, fontsize=fontsize)
    ax.set_yticklabels(maps.tokens if ylabels else [], fontsize=fontsize)
    ax.tick_params(length=0, pad=1)


def _window_note(maps: AttentionMaps) -> str:
    if maps.total and len(maps.ids) < maps.total:
        return f" (tokens {maps.offset}..{maps.offset + len(maps.ids) - 1} of {maps.total})"
    return ""


def plot_attention_grid(maps: AttentionMaps, out_png: str | os.PathLike, title: str | None = None) -> Path:
    """One heatmap per (layer, head): rows are query tokens, columns the keys they attend to.
    Token labels run along the left column and bottom row. Returns the written path."""
    L, H, T, _ = maps.weights.shape
    cell = max(1.6, min(6.0, 0.09 * T + 0.8))  # inches per heatmap
    if max(L, H) * cell > 60:  # a big model: keep the figure under ~6000 px
        cell = max(0.8, 60 / max(L, H))
    fs = label_fontsize(T) * cell / max(cell, 0.09 * T + 0.8)
    fig = new_figure(H * cell + 1.2, L * cell + 1.2)
    axes = fig.subplots(L, H, squeeze=False)
    for i in range(L):
        for j in range(H):
            ax = axes[i][j]
            _heatmap(ax, maps.weights[i, j], maps, xlabels=i == L - 1, ylabels=j == 0, fontsize=fs)
            if i == 0:
                ax.set_title(f"head {maps.heads[j]}", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"layer {maps.layers[i]}", fontsize=10)
    fig.suptitle((title or "attention (rows: queries, columns: keys)") + _window_note(maps))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (L * cell + 1.2)))
    return save_png(fig, out_png)


def plot_attention_layer(maps: AttentionMaps, layer: int, out_png: str | os.PathLike,
                         title: str | None = None) -> Path:
    """Every head of one layer (``layer`` as numbered in the model), large, labels on each map."""
    if layer not in maps.layers:
        raise InputError(f"layer {layer} was not recorded; recorded layers: {maps.layers}")
    i = maps.layers.index(layer)
    H, T = len(maps.heads), len(maps.ids)
    cols = max(1, math.ceil(math.sqrt(H)))  # a square-ish grid of heads
    rows = -(-H // cols)
    cell = max(3.0, min(9.0, 0.13 * T + 1.0))
    fig = new_figure(cols * cell + 0.5, rows * cell + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    for j in range(rows * cols):
        ax = axes[j // cols][j % cols]
        if j >= H:
            ax.axis("off")
            continue
        _heatmap(ax, maps.weights[i, j], maps, True, True, label_fontsize(T) * 1.3)
        ax.set_title(f"head {maps.heads[j]}", fontsize=11)
    fig.suptitle((title or f"layer {layer}: attention (rows: queries, columns: keys)") + _window_note(maps))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (rows * cell + 0.8)))
    return save_png(fig, out_png)


# ---------------------------------------------------------------------------------------- HTML
_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.tokens span, .row span { font-family: monospace; white-space: pre; padding: 1px 0; border-radius: 2px; }
.tokens span { cursor: pointer; border-bottom: 1px solid #bbb; }
.tokens span.active { outline: 2px solid #d62728; }
.row { margin: 2px 0; line-height: 1.6; }
.row b { display: inline-block; width: 5.5em; font-weight: normal; color: #555; }
.panel { margin-top: 1em; }
.note { color: #666; font-size: 90%; }
</style></head><body>
<h2>__TITLE__</h2>
<p class="note">Hover (or click) a token: each row below shows, for one head, how much that token
attends to every token (a causal model looks only left). Shading is relative to the row's largest
weight, so a diffuse head shows its preference too; hover a token in a row for the exact weight.__NOTE__</p>
<label>layer <select id="layer"></select></label>
<div class="panel tokens" id="tokens"></div>
<div class="panel" id="heads"></div>
<script>
const DATA = __DATA__;
const esc = s => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const shown = s => s.replace(/\\n/g, "\\u21b5");
const sel = document.getElementById("layer");
DATA.layers.forEach((l, i) => { const o = document.createElement("option"); o.value = i; o.textContent = l; sel.appendChild(o); });
// the page's address may pick the query token and the layer: attention.html#q=12&l=1
const hash = (k, d) => { const m = location.hash.match(new RegExp(k + "=([0-9]+)")); return m ? +m[1] : d; };
let query = Math.min(hash("q", DATA.texts.length - 1), DATA.texts.length - 1);
sel.value = Math.max(0, DATA.layers.indexOf(hash("l", DATA.layers[0])));  // l is the layer's number
function paint() {
  const li = +sel.value, T = DATA.texts.length;
  document.querySelectorAll("#tokens span").forEach((s, t) => s.classList.toggle("active", t === query));
  let html = "";
  DATA.heads.forEach((h, hi) => {
    const row = DATA.w[li][hi][query];
    const top = Math.max(1, ...row);
    html += '<div class="row"><b>head ' + h + '</b>';
    for (let k = 0; k < T; k++) {
      const a = row[k] / top;
      const fg = a > 0.5 ? "#fff" : "#222";
      html += '<span title="' + (row[k] / 1000).toFixed(3) + '" style="background: rgba(31,119,180,' + a.toFixed(3) + '); color: ' + fg + '">' + esc(shown(DATA.texts[k])) + '</span>';
    }
    html += '</div>';
  });
  document.getElementById("heads").innerHTML = html;
}
const tokens = document.getElementById("tokens");
DATA.texts.forEach((s, t) => {
  const span = document.createElement("span");
  span.textContent = shown(s);
  span.onmouseenter = () => { query = t; paint(); };
  span.onclick = span.onmouseenter;
  tokens.appendChild(span);
});
sel.onchange = paint;
paint();
</script></body></html>
"""


def attention_html(maps: AttentionMaps, out_html: str | os.PathLike, title: str | None = None) -> Path:
    """A self-contained HTML page (no network assets): pick a layer, hover a token, and every
    head's row shows where that token looks. Weights are stored as integers per mille."""
    w = (maps.weights * 1000).round().to(torch.int32).tolist()  # (L, H, T, T)
    data = {"layers": maps.layers, "heads": maps.heads, "texts": maps.texts, "w": w}
    note = _window_note(maps)
    page = (_HTML.replace("__TITLE__", _escape(title or "attention"))
            .replace("__NOTE__", _escape(f" Showing{note}." if note else ""))
            .replace("__DATA__", json.dumps(data, separators=(",", ":")).replace("</", "<\\/")))
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, page)


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
