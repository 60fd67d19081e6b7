"""How fast this machine multiplies matrices right now: the yardstick beside MFU.

MFU divides the FLOP/s a run achieves by a peak. A peak from a datasheet says nothing about a
shared 2-core VM whose rate swings with its neighbours (96 to 250 GFLOP/s were seen on the same
box), so a low MFU cannot tell a slow machine from a slow program. :func:`measured_matmul_flops`
times square fp32 matmuls for about 0.2 s and returns the FLOP/s achieved; printing it beside MFU
makes the comparison honest. The result is cached per (device, dtype, threads) for the process.
"""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["measured_matmul_flops", "format_flops"]


def measured_matmul_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          seconds: float = 0.2, size: int | None = None) -> float:
    """FLOP/s of ``size x size`` matmuls on ``device`` (best of several timed rounds within
    about ``seconds``); cached, so calling it again is free."""
    dev = torch.device(device)
    if size is None:
        size = 512 if dev.type == "cpu" else 4096
    return _measure(str(dev), dtype, float(seconds), int(size), torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _measure(device: str, dtype: torch.dtype, seconds: float, size: int, threads: int) -> float:
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)  # never touch the global RNG
    a = torch.randn(size, size, generator=gen).to(dev, dtype)
    b = torch.randn(size, size, generator=gen).to(dev, dtype)
    flops = 2.0 * size ** 3  # one multiply and one add per inner-product term
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        torch.mm(a, b)  # warm-up: thread pool, kernels, caches
        sync()
        best, deadline = 0.0, time.perf_counter() + seconds
        reps = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            sync()
            dt = time.perf_counter() - t0
            best = max(best, reps * flops / dt)
            if time.perf_counter() >= deadline:
                return best
            if dt < seconds / 20:  # rounds of ~1/20 of the budget: timer noise stays small
                reps *= 2


def format_flops(flops_per_s: float) -> str:
    """``1.23e11`` -> ``"123 GFLOP/s"`` (T/G/M prefixes)."""
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.3g} {unit}"
    return f"{flops_per_s:.3g} FLOP/s"
