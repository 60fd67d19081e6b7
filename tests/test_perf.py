"""Tests for lmforge.perf: the measured matmul rate is quick, plausible and cached."""

from __future__ import annotations

import time

from lmforge.perf import format_flops, measured_matmul_flops


def test_measured_matmul_flops_is_quick_plausible_and_cached():
    t0 = time.perf_counter()
    rate = measured_matmul_flops(seconds=0.1, size=256)
    first = time.perf_counter() - t0
    assert 1e8 < rate < 1e15  # anything from a starved VM core to a large GPU
    assert first < 5.0  # about the budget, plus one warm-up matmul (a loaded machine is slower)
    t0 = time.perf_counter()
    assert measured_matmul_flops(seconds=0.1, size=256) == rate  # cached: the same number, at once
    assert time.perf_counter() - t0 < 0.01


def test_format_flops():
    assert format_flops(1.234e11) == "123 GFLOP/s"
    assert format_flops(2.5e12) == "2.5 TFLOP/s"
    assert format_flops(3.0e7) == "30 MFLOP/s"
    assert format_flops(12.0) == "12 FLOP/s"
