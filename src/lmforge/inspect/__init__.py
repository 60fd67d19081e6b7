"""Looking inside models and runs.

    plots           training curves from a run's metrics.jsonl
    attention_maps  attention weights per layer and head (tensors, PNG heatmaps, HTML view)
    weights         weight histograms, spectral/Frobenius norms, effective rank, checkpoint diffs
    lens            the logit lens: each layer's residual stream read through the unembedding
    tokens          per-token loss (HTML, terminal colours) and the loss mask
    report          report.html of a run folder

The names below are importable from here; each module (and matplotlib) is only imported when
one of its names is used, so ``import lmforge`` stays fast.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "plot_training_curves": "plots", "plot_loss_comparison": "plots",
    "attention": "attention_maps", "record_attention": "attention_maps", "AttentionMaps": "attention_maps",
    "plot_attention_grid": "attention_maps", "plot_attention_layer": "attention_maps",
    "attention_html": "attention_maps", "head_patterns": "attention_maps",
    "weight_stats": "weights", "compare_weights": "weights", "plot_weight_histograms": "weights",
    "plot_weight_stats": "weights", "plot_weight_change": "weights",
    "logit_lens": "lens", "plot_lens": "lens", "plot_top_tokens": "lens",
    "token_losses": "tokens", "token_html": "tokens", "to_terminal": "tokens",
    "write_report": "report", "report_after_run": "report", "log_sample": "report",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"lmforge.inspect.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
