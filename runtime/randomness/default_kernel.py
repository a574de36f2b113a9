"""torch's float32 Box-Muller kernel without AVX2: scalar code calling libm's ``logf`` and ``sincosf``.

Without AVX2 (older x86-64 CPUs, aarch64, ``ATEN_CPU_CAPABILITY=default``) torch runs the same
blocks of 16 as its AVX2 kernel (``NormalFill16<float>``) through scalar code: for lane ``j``,
``radius = sqrtf(-2 * logf(1 - u[j]))``, ``theta = (float)(2 pi * (double)u[j + 8])``, then
``radius * cosf(theta)`` and ``radius * sinf(theta)``. This module computes ``logf`` and
``sincosf`` with glibc's (ARM optimized-routines) algorithms, in double precision with a float
result, checked exhaustively against glibc 2.36 and, through torch, bit-exact. aarch64's glibc
rounds the sincosf quadrant with an instruction instead, which could only matter for exact ties.
With another libm (macOS, Windows) torch's results can differ from these by an ulp of ``logf``,
``sinf`` or ``cosf``. This kernel and the AVX2 one differ in about 40% of values, by at most
~2.4e-6.

The double arithmetic below is written without fused multiply-adds, as in glibc's generic build;
glibc's FMA build differs from it in the last double bits only, and for every input this path can
see (u1 = k * 2**-24 and theta = fl32(2 pi k * 2**-24), 2**24 values each) both give the same float
results, as checked exhaustively against glibc 2.36's FMA build.
"""

from __future__ import annotations

import numpy as np

from .common import F32, F64, TWO_PI, U32

__all__ = ["box_muller_f32"]

_CHUNK_BLOCKS = 2048  # blocks of 16 per pass: bounds the temporaries of one pass

_H = float.fromhex
# logf: 16 subintervals of [0x3f330000, 2 * 0x3f330000) with 1/c and log(c), and log1p's polynomial
_LOGF_INVC = np.array([_H(v) for v in (
    "0x1.661ec79f8f3bep+0", "0x1.571ed4aaf883dp+0", "0x1.49539f0f010bp+0", "0x1.3c995b0b80385p+0",
    "0x1.30d190c8864a5p+0", "0x1.25e227b0b8eap+0", "0x1.1bb4a4a1a343fp+0", "0x1.12358f08ae5bap+0",
    "0x1.0953f419900a7p+0", "0x1p+0", "0x1.e608cfd9a47acp-1", "0x1.ca4b31f026aap-1",
    "0x1.b2036576afce6p-1", "0x1.9c2d163a1aa2dp-1", "0x1.886e6037841edp-1", "0x1.767dcf5534862p-1")])
_LOGF_LOGC = np.array([_H(v) for v in (
    "-0x1.57bf7808caadep-2", "-0x1.2bef0a7c06ddbp-2", "-0x1.01eae7f513a67p-2", "-0x1.b31d8a68224e9p-3",
    "-0x1.6574f0ac07758p-3", "-0x1.1aa2bc79c81p-3", "-0x1.a4e76ce8c0e5ep-4", "-0x1.1973c5a611cccp-4",
    "-0x1.252f438e10c1ep-5", "0x0p+0", "0x1.aa5aa5df25984p-5", "0x1.c5e53aa362eb4p-4",
    "0x1.526e57720db08p-3", "0x1.bc2860d22477p-3", "0x1.1058bc8a07ee1p-2", "0x1.4043057b6ee09p-2")])
_LOGF_LN2 = _H("0x1.62e42fefa39efp-1")
_LOGF_A0, _LOGF_A1, _LOGF_A2 = (_H(v) for v in ("-0x1.00ea348b88334p-2", "0x1.5575b0be00b6ap-2",
                                                 "-0x1.ffffef20a4123p-2"))
# sincosf: pi/2 reduction (2/pi pre-scaled by 2**24), cosine and sine polynomials
_SINCOSF_HPI_INV = _H("0x1.45F306DC9C883p+23")
_SINCOSF_HPI = _H("0x1.921FB54442D18p0")
_SINCOSF_C = [1.0] + [_H(v) for v in ("-0x1.ffffffd0c621cp-2", "0x1.55553e1068f19p-5",
                                      "-0x1.6c087e89a359dp-10", "0x1.99343027bf8c3p-16")]
_SINCOSF_S = [_H(v) for v in ("-0x1.555545995a603p-3", "0x1.1107605230bc4p-7", "-0x1.994eb3774cf24p-13")]
_ABSTOP12_PIO4 = int(np.float32(_H("0x1.921FB54442D18p-1")).view(np.uint32)) >> 20  # below: no reduction
_ABSTOP12_TINY = int(np.float32(2.0 ** -12).view(np.uint32)) >> 20  # below: sin x = x, cos x = 1


def _libm_logf(x: np.ndarray) -> np.ndarray:
    """glibc's logf for positive normal float32 ``x``."""
    ix = x.view(np.uint32)
    tmp = ix - np.uint32(0x3F330000)  # wraps like the uint32 arithmetic of the C code
    i = (tmp >> np.uint32(19)) & np.uint32(15)
    k = (tmp.view(np.int32) >> 23).astype(F64)
    z = (ix - (tmp & np.uint32(0xFF800000))).view(F32).astype(F64)  # x = 2**k z, z in [0x3f330000, ...)
    r = z * np.take(_LOGF_INVC, i) - 1.0
    y0 = np.take(_LOGF_LOGC, i) + k * _LOGF_LN2
    r2 = r * r
    y = _LOGF_A1 * r + _LOGF_A2
    y = _LOGF_A0 * r2 + y
    y = y * r2 + (y0 + r)
    return y.astype(F32)


def _libm_sincosf(theta: np.ndarray):
    """glibc's sincosf for float32 ``theta`` in [0, 120)."""
    top = theta.view(np.uint32) >> np.uint32(20)
    x = theta.astype(F64)
    reduce = top >= _ABSTOP12_PIO4
    n = ((x * _SINCOSF_HPI_INV).astype(np.int32) + 0x800000) >> 24  # nearest multiple of pi/2
    n *= reduce
    x -= n * _SINCOSF_HPI
    q = n & 3
    sign = 1.0 - 2.0 * ((q == 1) | (q == 2))  # sign of the sine in each quadrant
    cneg = 1.0 - 2.0 * (n & 2).astype(bool)  # quadrants 2 and 3 use the negated cosine polynomial
    xs = x * sign
    x2 = x * x
    x4 = x2 * x2
    x3 = x2 * xs
    c2 = cneg * _SINCOSF_C[3] + x2 * (cneg * _SINCOSF_C[4])
    s1 = _SINCOSF_S[1] + x2 * _SINCOSF_S[2]
    c1 = cneg * _SINCOSF_C[0] + x2 * (cneg * _SINCOSF_C[1])
    x5 = x3 * x2
    x6 = x4 * x2
    s = xs + x3 * _SINCOSF_S[0]
    c = c1 + x4 * (cneg * _SINCOSF_C[2])
    sin_ = (s + x5 * s1).astype(F32)
    cos_ = (c + x6 * c2).astype(F32)
    odd = (n & 1).astype(bool)  # odd quadrants swap the two results
    sin_out = np.where(odd, cos_, sin_)
    cos_out = np.where(odd, sin_, cos_)
    tiny = top < _ABSTOP12_TINY
    if tiny.any():
        sin_out[tiny] = theta[tiny]
        cos_out[tiny] = 1.0
    return sin_out, cos_out


def box_muller_f32(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Blocks of 16 engine words (nb, 16) to float32 normals, as torch's scalar (DEFAULT) kernel:
    ``radius = sqrtf(-2 * logf(1 - u1))``, ``theta = (float)(2 pi * (double)u2)``,
    ``fmaf(radius * cosf(theta), 1, 0)`` (sine for lanes 8-15)."""
    if out is None:
        out = np.empty(w.shape, F32)
    for i in range(0, w.shape[0], _CHUNK_BLOCKS):
        c = w[i:i + _CHUNK_BLOCKS]
        u = (c & U32(0xFFFFFF)).astype(F32)
        u *= F32(2.0 ** -24)
        radius = np.sqrt(_libm_logf(F32(1) - u[:, :8]) * F32(-2))
        theta = (u[:, 8:].astype(F64) * TWO_PI).astype(F32)
        s, co = _libm_sincosf(theta)
        o = out[i:i + _CHUNK_BLOCKS]
        np.multiply(radius, co, out=o[:, :8])
        np.multiply(radius, s, out=o[:, 8:])
        o += F32(0)
    return out

