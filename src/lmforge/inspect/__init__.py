"""Looking inside models and runs: training curves (``plots``), and more as modules land.

The plotting functions are importable from here; matplotlib is only imported when one is used.
"""

from __future__ import annotations

__all__ = ["plot_training_curves", "plot_loss_comparison"]


def __getattr__(name: str):
    if name in __all__:
        from lmforge.inspect import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
