"""Matrix products with int4 or int8 weights and fp32 activations (weight-only quantization).

Decoding one token reads every weight once and does two flops with each, so it is bound by how
many bytes the weights take. The kernels here read 4- or 8-bit codes, dequantize each weight
exactly (``code * scale + offset``, one fp32 rounding) and multiply it by the fp32 activation,
so the result is the fp32 product ``x @ W_dq^T`` of the dequantized weight, summed in another
order. Nothing rounds the activations (unlike an int8 GEMM, whose 8-bit activations and 16-bit
intermediate sums can saturate on a CPU without VNNI).

Layouts (``K`` = in_features, ``N`` = out_features; groups run along ``K``):

* int4: ``codes`` (N, K/2) uint8, groups of 32 weights in 16 bytes, byte ``i`` holding code ``i``
  (low nibble) and code ``i + 16`` (high nibble): GGUF's Q4_0/Q4_1 block order, so those blocks
  load by copying bytes. ``scale``, ``offset`` (N, K/32) fp16: ``w = code * scale + offset``.
* int8: ``codes`` (N, K) int8, ``scale`` (N, K/G) fp16 with G = 32 (GGUF's Q8_0) or G = K (one
  scale per row, for a K not divisible by 32): ``w = code * scale``.

PyTorch's own weight-only CPU ops (``aten._weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
are slow here with fp32 activations (and no faster with fp16/bf16 ones): on this project's CPU
(576 x 960, one row, torch 2.13) they took 6x (int8) and 15x (int4) as long as the oneDNN-packed
fp32 product, and 8 rows took 8x as long as one. The kernel below is ~100 lines of C
(AVX2/FMA intrinsics, a portable loop elsewhere), compiled once with the system C compiler into
``~/.cache/lmforge/kernels`` and called through ctypes; it threads with OpenMP (the libgomp that
PyTorch has already loaded). For more than :data:`KERNEL_ROWS` input rows (a prompt) and where no
compiler is found, a block of weights is dequantized to fp32 and multiplied by ``F.linear``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["int4_matmul", "int8_matmul", "dequantize_int4", "dequantize_int8", "kernel", "KERNEL_ROWS"]

# Input rows up to which the kernel is used: it re-reads the codes once per pair of rows, so at 4
# rows (576 x 3072, one thread) it takes about as long as the packed fp32 product, beyond that longer.
KERNEL_ROWS = 4
_CHUNK = 1 << 22  # weights dequantized at a time on the F.linear path (16 MB of fp32)

SOURCE = r"""
#include <stdint.h>

/* Weight-only quantized matrix products for a few input rows (decoding), fp32 activations.
   y (M, N) = x (M, K) @ W^T; every weight is dequantized exactly (one rounding: code * scale +
   offset) and multiplied in fp32; only the order of the fp32 sums differs from x @ W^T.
   int4: groups of 32 along K, byte i of a group holds code i (low nibble) and code i + 16 (high
   nibble), GGUF's Q4_0/Q4_1 order; w = code * scale[n, g] + offset[n, g].
   int8: groups of G along K (G a multiple of 16); w = code * scale[n, k / G]. */

#define MB 2 /* input rows that share one unpacking of a group */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 u8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
static inline __m256 i8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

static void q4_row(const float *x, int64_t mc, int64_t K, const uint8_t *q, const _Float16 *sc,
                   const _Float16 *of, float *out, int64_t ostride) {
    const __m128i low = _mm_set1_epi8(15);
    __m256 acc[MB][4];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        const __m256 s = _mm256_set1_ps((float)sc[g]), o = _mm256_set1_ps((float)of[g]);
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + g * 16));
        const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        const __m256 w0 = _mm256_fmadd_ps(u8x8(lo), s, o), w1 = _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), s, o);
        const __m256 w2 = _mm256_fmadd_ps(u8x8(hi), s, o), w3 = _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), s, o);
        for (int64_t m = 0; m < mc; m++) {
            const float *xg = x + m * K + g * 32;
            acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xg), w0, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8), w1, acc[m][1]);
            acc[m][2] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), w2, acc[m][2]);
            acc[m][3] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), w3, acc[m][3]);
        }
    }
    for (int64_t m = 0; m < mc; m++)
        out[m * ostride] = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
}

static void q8_row(const float *x, int64_t mc, int64_t K, int64_t G, const int8_t *q, const _Float16 *sc,
                   float *out, int64_t ostride) {
    __m256 acc[MB][2];
    for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / G; g++) {
        const __m256 s = _mm256_set1_ps((float)sc[g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(q + k));
            const __m256 w0 = _mm256_mul_ps(i8x8(b), s), w1 = _mm256_mul_ps(i8x8(_mm_srli_si128(b, 8)), s);
            for (int64_t m = 0; m < mc; m++) {
                acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), w0, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8), w1, acc[m][1]);
            }
        }
    }
    for (int64_t m = 0; m < mc; m++) out[m * ostride] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}
#define Q8_STEP 16
#else /* portable C: the same arithmetic, vectorized as far as the compiler manages */
static void q4_row(const float *x, int64_t mc, int64_t K, const uint8_t *q, const _Float16 *sc,
                   const _Float16 *of, float *out, int64_t ostride) {
    for (int64_t m = 0; m < mc; m++) {
        float t = 0.f;
        for (int64_t g = 0; g < K / 32; g++) {
            const float s = (float)sc[g], o = (float)of[g];
            for (int i = 0; i < 16; i++) {
                t += x[m * K + g * 32 + i] * ((float)(q[g * 16 + i] & 15) * s + o);
                t += x[m * K + g * 32 + 16 + i] * ((float)(q[g * 16 + i] >> 4) * s + o);
            }
        }
        out[m * ostride] = t;
    }
}

static void q8_row(const float *x, int64_t mc, int64_t K, int64_t G, const int8_t *q, const _Float16 *sc,
                   float *out, int64_t ostride) {
    for (int64_t m = 0; m < mc; m++) {
        float t = 0.f;
        for (int64_t k = 0; k < K; k++) t += x[m * K + k] * ((float)q[k] * (float)sc[k / G]);
        out[m * ostride] = t;
    }
}
#define Q8_STEP 8
#endif

void lmf_q4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *q, const _Float16 *scale,
                   const _Float16 *offset, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m0 = 0; m0 < M; m0 += MB)
            q4_row(x + m0 * K, M - m0 < MB ? M - m0 : MB, K, q + n * (K / 2), scale + n * (K / 32),
                   offset + n * (K / 32), y + m0 * N + n, N);
}

void lmf_q8_matmul(const float *x, int64_t M, int64_t K, int64_t N, int64_t G, const int8_t *q,
                   const _Float16 *scale, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m0 = 0; m0 < M; m0 += MB)
            q8_row(x + m0 * K, M - m0 < MB ? M - m0 : MB, K, G, q + n * K, scale + n * (K / G),
                   y + m0 * N + n, N);
}

/* which build this is: 1 = AVX2/FMA intrinsics, 0 = portable C */
int lmf_simd(void) { return Q8_STEP == 16; }
"""

_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_KERNEL_CACHE") or Path.home() / ".cache" / "lmforge" / "kernels")


def _cpu_signature() -> str:
    """The CPU's feature flags (a kernel built with -march=native runs only on such a CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@lru_cache(maxsize=4)
def kernel(march: str = "native"):
    """The compiled kernel library (ctypes), or None where it cannot be built (said once as a
    warning; the products then dequantize blocks of weights and use ``F.linear``). ``march`` is
    gcc's -march: "native" for this CPU; the tests also build "x86-64-v3" (AVX2/FMA, no AVX-512)
    and "x86-64" (the portable C path) to check both on any x86 machine."""
    if os.environ.get("LMFORGE_NO_QKERNEL"):
        return None
    cc = os.environ.get("CC", "cc")
    flags = [*_FLAGS, f"-march={march}"]
    key = hashlib.sha256("\0".join([SOURCE, cc, *flags, _cpu_signature(), sys.platform]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"lmforge_qmatmul_{key}.so"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                c_file, so_file = Path(tmp) / "qmatmul.c", Path(tmp) / "qmatmul.so"
                c_file.write_text(SOURCE)
                subprocess.run([cc, *flags, str(c_file), "-o", str(so_file)], check=True, capture_output=True,
                               timeout=120)
                os.replace(so_file, path)  # atomic: a concurrent build writes the same bytes
        except (OSError, subprocess.SubprocessError) as e:
            why = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
            warnings.warn(f"lmforge: the quantized-matmul kernel did not build with {cc!r} "
                          f"({why[0] if why else e}); int4/int8 products dequantize to fp32 instead (slower)",
                          RuntimeWarning, stacklevel=2)
            return None
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.lmf_q4_matmul.argtypes = [p, i64, i64, i64, p, p, p, p, ctypes.c_int]
    lib.lmf_q8_matmul.argtypes = [p, i64, i64, i64, i64, p, p, p, ctypes.c_int]
    lib.lmf_q4_matmul.restype = lib.lmf_q8_matmul.restype = None
    lib.lmf_simd.restype = ctypes.c_int
    return lib


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """fp32 weights (N, K) of int4 codes (N, K/2) with scale/offset (N, K/32)."""
    n, g = scale.shape
    c = codes.view(n, g, 16)  # (N, G, 16) bytes of each group
    q = torch.cat([c & 15, c >> 4], dim=2).float()  # (N, G, 32) codes 0..15 in weight order
    return (q * scale.float()[..., None] + offset.float()[..., None]).view(n, g * 32)  # (N, K)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weights (N, K) of int8 codes (N, K) with one scale per group of K / scale.shape[1]."""
    n, g = scale.shape
    return (codes.view(n, g, -1).float() * scale.float()[..., None]).view(n, -1)  # (N, K)


def _blockwise(x2: torch.Tensor, n: int, dequant) -> torch.Tensor:
    """``x2 @ W^T`` with W dequantized ``_CHUNK`` weights at a time (rows [a, b) by ``dequant(a, b)``)."""
    k = x2.shape[1]
    y = x2.new_empty(x2.shape[0], n)  # (M, N)
    step = max(1, _CHUNK // k)
    for a in range(0, n, step):
        b = min(n, a + step)
        y[:, a:b] = F.linear(x2, dequant(a, b))  # (M, b - a)
    return y


def _ready(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()  # (M, K)


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` (..., N) for x (..., K) fp32 and an int4 weight (layout in the module doc)."""
    x2 = _ready(x)
    n = codes.shape[0]
    lib = kernel()
    if lib is not None and x2.shape[0] <= KERNEL_ROWS and codes.device.type == "cpu":
        y = x2.new_empty(x2.shape[0], n)  # (M, N)
        lib.lmf_q4_matmul(x2.data_ptr(), x2.shape[0], x2.shape[1], n, codes.data_ptr(), scale.data_ptr(),
                          offset.data_ptr(), y.data_ptr(), torch.get_num_threads())
    else:
        y = _blockwise(x2, n, lambda a, b: dequantize_int4(codes[a:b], scale[a:b], offset[a:b]))
    return y.view(*x.shape[:-1], n)


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` (..., N) for x (..., K) fp32 and an int8 weight (layout in the module doc)."""
    x2 = _ready(x)
    n, k = codes.shape
    lib = kernel()
    if lib is not None and x2.shape[0] <= KERNEL_ROWS and codes.device.type == "cpu":
        y = x2.new_empty(x2.shape[0], n)  # (M, N)
        lib.lmf_q8_matmul(x2.data_ptr(), x2.shape[0], k, n, k // scale.shape[1], codes.data_ptr(),
                          scale.data_ptr(), y.data_ptr(), torch.get_num_threads())
    else:
        y = _blockwise(x2, n, lambda a, b: dequantize_int8(codes[a:b], scale[a:b]))
    return y.view(*x.shape[:-1], n)
