"""How fast this machine multiplies matrices right now: the yardstick beside MFU.

MFU divides the FLOP/s a run achieves by a peak. A peak from a datasheet says nothing about a
shared 2-core VM whose rate swings with its neighbours (96 to 250 GFLOP/s were seen on the same
box), so a low MFU cannot tell a slow machine from a slow program. :func:`measured_matmul_flops`
times square fp32 matmuls for about 0.2 s and returns the FLOP/s achieved; printing it beside MFU
makes the comparison honest. The result is cached per (device, dtype, threads) for the process.

Threads on shared cores: torch's CPU threads spin while they wait for each other, so when other
programs already keep every core busy, two threads can train ~10x slower than one (285 against
2.3-2.9k tokens/s were measured on a busy 2-core VM). :func:`fit_threads_to_load` looks at the
load average at start-up and drops to one thread then, saying so with the override
(``OMP_NUM_THREADS=N`` pins a count and is never changed).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch

__all__ = ["measured_matmul_flops", "format_flops", "cpu_cores", "plan_threads", "fit_threads_to_load"]


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


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_threads(load: float, cores: int, threads: int, pinned: bool) -> tuple[int, str | None]:
    """(thread count to use, a line to say or None) for a 1-minute ``load`` average on ``cores``.

    Other work filling every core (load >= cores) makes a multi-threaded step stall: use one
    thread, unless the user pinned the count (``pinned``: OMP_NUM_THREADS is set), then only say so."""
    if load < cores or threads <= 1:
        return threads, None
    where = f"load average {load:.1f} on {cores} core{'s' if cores > 1 else ''}"
    if pinned:
        return threads, (f"busy machine: {where}, and OMP_NUM_THREADS={threads} pins {threads} threads; steps may "
                         f"be several times slower than with OMP_NUM_THREADS=1")
    return 1, (f"busy machine: {where}; training with 1 thread instead of {threads} (threads that share busy "
               f"cores stall each other); OMP_NUM_THREADS={threads} keeps {threads}")


def fit_threads_to_load(say: Callable[[str], None] = print, load: float | None = None) -> int:
    """Apply :func:`plan_threads` to this machine now (``torch.set_num_threads``); returns the count."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): nothing to go by
            return torch.get_num_threads()
    pinned = bool(os.environ.get("OMP_NUM_THREADS", "").strip())
    threads, note = plan_threads(load, cpu_cores(), torch.get_num_threads(), pinned)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if note:
        say(note)
    return threads
