"""The int8/int4 matmul kernels (lmforge.model.qmatmul): built for other x86 CPUs, they agree
with the plain dequantize-then-multiply reference."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model import qmatmul
from lmforge.model.quantize import Int4Linear, Int8Linear

EPS = torch.finfo(torch.float32).eps


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 builds")
@pytest.mark.parametrize("march,simd", [("x86-64-v3", 1), ("x86-64", 0)], ids=["avx2-fma", "portable"])
def test_kernel_builds_for_other_x86_cpus_agree(march, simd, monkeypatch):
    """The AVX2/FMA build (what a CPU without AVX-512 runs) and the portable C build give the
    dequantized products too: correctness does not hang on this machine's instruction set."""
    lib = qmatmul.kernel(march)
    if lib is None:
        pytest.skip(f"no C compiler for -march={march}")
    assert lib.lmf_simd() == simd
    monkeypatch.setattr(qmatmul, "kernel", lambda: lib)
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=False)
    x = torch.randn(qmatmul.KERNEL_ROWS, 128)
    for layer in (Int4Linear.from_linear(lin), Int8Linear.from_linear(lin)):
        exact = F.linear(x, layer.dequantized())
        assert ((layer(x) - exact).abs() <= 2 * 128 * EPS * (x.abs() @ layer.dequantized().abs().T) + 1e-6).all()
