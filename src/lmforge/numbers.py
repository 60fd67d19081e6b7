"""Numbers for people: metrics rounded to what they can mean, for one-line JSON reports.

``eval`` prints ``{"loss": 3.0812, "ppl": 21.79, ...}``, not ``3.081234049797058``: a loss
averaged over a finite sample is not known to 16 digits, and long tails hide the digits that
matter. :func:`round_floats` keeps ``digits`` significant digits (so a perplexity of 12345.6
and a loss of 0.000123 both keep their meaning), leaves integers, strings and non-finite values
alone, and goes through dicts, lists and tuples.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["round_floats", "metrics_json"]


def round_floats(obj: Any, digits: int = 5) -> Any:
    """``obj`` with every finite float rounded to ``digits`` significant digits (tensors and numpy
    scalars count as numbers); containers are copied, other values returned as they are."""
    if digits < 1:
        raise ValueError(f"digits: got {digits}, expected >= 1")
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # a 0-d tensor or a numpy scalar
        return round_floats(obj.item(), digits)
    if hasattr(obj, "tolist"):  # a tensor or array with elements
        return round_floats(obj.tolist(), digits)
    return obj


def metrics_json(obj: Any, digits: int = 5) -> str:
    """One line of JSON with floats rounded by :func:`round_floats` (NaN/inf written as strings,
    so the line stays valid JSON)."""
    return json.dumps(_finite_or_str(round_floats(obj, digits)))


def _finite_or_str(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # 'nan', 'inf', '-inf'
    if isinstance(obj, dict):
        return {k: _finite_or_str(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_str(v) for v in obj]
    return obj
