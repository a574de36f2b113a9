"""torch's float32 Box-Muller kernel for AVX2 CPUs, reproduced operation by operation.

torch compiles its distribution kernels for the DEFAULT and AVX2 capabilities only, so this
kernel (``NormalFill16<float>`` with ``log256_ps`` and ``sincos256_ps`` from ``avx_mathfun.h``)
is what ``torch.randn`` runs for float32 tensors of 16 elements or more on every x86-64 CPU with
AVX2, AVX-512 ones included; float16 and bfloat16 draws run it too and round its results.

GCC contracts the polynomial steps of that kernel into fused multiply-adds; this module follows
the exact instruction sequence of the shipped binary (torch 2.13, GCC-built x86-64 Linux wheel).
A torch build whose compiler fused them differently would differ in the last bit of some values.
A float32 FMA ``fl32(a*b + c)`` is computed as ``float32(float64(a)*float64(b) + float64(c))``:
the product of two float32 numbers is exact in float64, so only the final sum is rounded twice.
That double rounding could in principle differ from a single rounding, so the whole kernel was
checked exhaustively against torch's own compiled kernel: every one of the 2**24 possible radius
inputs and every one of the 2**24 angle inputs gives the same bits. The kernel calls no libm
function, so it matches torch on any operating system.

Notation below: fl32() rounds to float32, fma(a, b, c) = fl32(a * b + c) with one rounding.
Arrays are processed in chunks, with preallocated buffers, because numpy's cost here is memory
traffic and allocation.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .common import F32, F64

__all__ = ["box_muller_f32"]

# log256_ps: cephes logf polynomial, evaluated as fma(y, x, p_k) from p0 * x + p1
_LOG_P = [F64(F32(v)) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG_Q1 = F32(-2.12194440e-4)
_LOG_Q2 = F64(F32(0.693359375))
_SQRTHF_BITS = 0x3F3504F3  # float32 sqrt(0.5), the cephes threshold
# sincos256_ps: cephes sinf/cosf with Cody-Waite reduction by multiples of pi/4
_FOPI = F32(1.27323954473516)  # 4 / pi
# DP1 (8 significant bits) and DP2 (11 bits) are short enough that y*DP1 and y*DP2 (y <= 8) are
# exact and so are the first two reduction steps: x + y*DP1 + y*DP2 needs no rounding at all.
_DP12 = F64(F32(-0.78515625)) + F64(F32(-2.4187564849853515625e-4))  # exact in float64
_DP3 = F64(F32(-3.77489497744594108e-8))
_SIN_P = [F64(F32(v)) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COS_P = [F64(F32(v)) for v in (2.443315711809948e-005, -1.388731625493765e-003, 4.166664568298827e-002)]
# theta = fl32(fl32(2 pi) * u2) with u2 = k * 2**-24 equals fl32(k * fl32(2 pi) * 2**-24): scaling
# by a power of two commutes with rounding, so theta is one multiplication of the integer k.
_THETA_SCALE = F32(F32(2.0 * math.pi) * F32(2.0 ** -24))

_CHUNK_BLOCKS = 2048  # blocks of 16 per pass (16384 pairs): buffers stay in L2
_workspaces = threading.local()


class _Workspace:
    """Scratch buffers for one chunk, reused across calls (per thread)."""

    def __init__(self, n: int):
        self.n = n
        self.lanes = np.empty((2, n), np.int32)
        self.f32 = [np.empty(n, F32) for _ in range(5)]
        self.f64 = [np.empty(n, F64) for _ in range(3)]
        self.i32 = [np.empty(n, np.int32) for _ in range(3)]


def _workspace() -> _Workspace:
    ws = getattr(_workspaces, "ws", None)
    if ws is None:
        ws = _workspaces.ws = _Workspace(_CHUNK_BLOCKS * 8)
    return ws


def _round32(t64: np.ndarray, r32: np.ndarray) -> None:
    """Round the float64 values of ``t64`` to float32, into ``r32`` and back into ``t64``."""
    np.copyto(r32, t64, casting="unsafe")
    np.copyto(t64, r32)


def _box_muller_f32_chunk(w: np.ndarray, out: np.ndarray, ws: _Workspace) -> None:
    """Engine words (nb, 16) -> float32 normals (nb, 16), for nb <= _CHUNK_BLOCKS."""
    nb = w.shape[0]
    n = nb * 8
    # low 24 bits of each word, lanes 0-7 (radius) and 8-15 (angle) made contiguous
    lanes = ws.lanes[:, :n]
    np.bitwise_and(w.view(np.int32).reshape(nb, 2, 8).transpose(1, 0, 2), np.int32(0xFFFFFF),
                   out=lanes.reshape(2, nb, 8))
    k1, k2 = lanes[0], lanes[1]
    a32, b32, c32, d32, radius = (b[:n] for b in ws.f32)
    a64, b64, c64 = (b[:n] for b in ws.f64)
    i1, i2, i3 = (b[:n] for b in ws.i32)

    # ---- radius = sqrt(-2 * log256_ps(u1)), u1 = 1 - u = (2**24 - k) * 2**-24 exactly ----
    x, z, y32, ez = a32, b32, c32, d32
    x64, y64, t64 = a64, b64, c64
    np.subtract(np.int32(1 << 24), k1, out=k1)
    np.copyto(x, k1, casting="unsafe")  # exact integer; its bits are those of u1 plus 24 << 23
    bits = x.view(np.int32)
    # cephes: m = mantissa in [0.5, 1), e = exponent + 1; if m < sqrt(0.5): x = 2m - 1, e -= 1,
    # else x = m - 1 (all exact). Adding 0x3f800000 - 0x3f3504f3 carries into the exponent
    # exactly when m >= sqrt(0.5), which selects the same m and e with integer operations.
    # (subtracting 127 << 23 as well makes the arithmetic shift below give e directly)
    bits += np.int32(0x3F800000 - _SQRTHF_BITS - (24 << 23) - (127 << 23))
    np.right_shift(bits, 23, out=i1)  # e
    bits &= np.int32(0x007FFFFF)
    bits += np.int32(_SQRTHF_BITS)
    x -= F32(1)
    np.multiply(x, x, out=z)  # z = x * x
    np.copyto(x64, x)
    np.multiply(x64, _LOG_P[0], out=y64)  # y = fma(p0, x, p1)
    y64 += _LOG_P[1]
    _round32(y64, y32)
    for p in _LOG_P[2:-1]:  # y = fma(y, x, p)
        y64 *= x64
        y64 += p
        _round32(y64, y32)
    y64 *= x64
    y64 += _LOG_P[-1]
    np.copyto(y32, y64, casting="unsafe")
    y32 *= x  # y = y * x
    np.copyto(ez, i1, casting="unsafe")  # e as float32
    np.copyto(y64, y32)  # y = fma(y, z, fl32(e * q1))
    np.copyto(t64, z)
    y64 *= t64
    np.multiply(ez, _LOG_Q1, out=y32)
    np.copyto(t64, y32)
    y64 += t64
    np.copyto(y32, y64, casting="unsafe")
    z *= F32(0.5)  # y = fnmadd(z, 0.5, y) = fl32(y - z/2): z/2 is exact
    y32 -= z
    x += y32  # x = x + y
    np.copyto(y64, ez)  # log = fma(e, q2, x)
    y64 *= _LOG_Q2
    np.copyto(t64, x)
    y64 += t64
    np.copyto(radius, y64, casting="unsafe")
    radius *= F32(-2)
    np.sqrt(radius, out=radius)

    # ---- (sin, cos) = sincos256_ps(theta), theta = fl32(fl32(2 pi) * u2) in [0, 2 pi) ----
    theta, zz, cpoly, xs = a32, b32, c32, d32
    xs64, t64, z64 = a64, b64, c64
    j, swap, sign_sin = i1, i2, i3
    np.copyto(theta, k2, casting="unsafe")
    theta *= _THETA_SCALE
    np.multiply(theta, _FOPI, out=zz)
    np.copyto(j, zz, casting="unsafe")  # truncation, as cvttps2dq; theta >= 0 so no sign work
    j += np.int32(1)  # j + 1
    np.right_shift(j, 1, out=swap)  # bit 1 of j + 1 set: the sine and cosine polynomials swap
    swap &= np.int32(1)
    np.negative(swap, out=swap)
    np.bitwise_and(j, np.int32(4), out=sign_sin)  # sine sign: bit 2 of j + 1
    sign_sin <<= 29
    j &= np.int32(~1)  # y = (j + 1) & ~1
    np.copyto(xs64, theta)
    np.copyto(t64, j)
    t64 *= _DP12
    xs64 += t64  # theta + y*DP1 + y*DP2, exact
    np.copyto(t64, j)
    t64 *= _DP3
    xs64 += t64  # fma(y, DP3, x)
    _round32(xs64, xs)
    j -= np.int32(2)  # cosine sign: ~(y - 2) & 4
    np.invert(j, out=j)
    j &= np.int32(4)
    j <<= 29
    np.multiply(xs, xs, out=zz)  # z = x * x
    np.copyto(z64, zz)
    # cosine polynomial: c = fma(fma(c0, z, c1), z, c2); c = c * z; c = fma(z, c, -fl32(z/2)); c + 1
    np.multiply(z64, _COS_P[0], out=t64)
    t64 += _COS_P[1]
    _round32(t64, cpoly)
    t64 *= z64
    t64 += _COS_P[2]
    np.copyto(cpoly, t64, casting="unsafe")
    cpoly *= zz
    np.copyto(t64, cpoly)
    t64 *= z64
    z64 *= 0.5  # z/2, exact
    t64 -= z64
    np.copyto(cpoly, t64, casting="unsafe")
    cpoly += F32(1)
    # sine polynomial: s = fma(fma(s0, z, s1), z, s2); s = s * z; s = fma(x, s, x)
    np.copyto(z64, zz)
    spoly = theta  # theta is no longer needed
    np.multiply(z64, _SIN_P[0], out=t64)
    t64 += _SIN_P[1]
    _round32(t64, spoly)
    t64 *= z64
    t64 += _SIN_P[2]
    np.copyto(spoly, t64, casting="unsafe")
    spoly *= zz
    np.copyto(t64, spoly)
    t64 *= xs64
    t64 += xs64
    np.copyto(spoly, t64, casting="unsafe")
    # select the polynomials, then the signs (bitwise, as the kernel does)
    si = spoly.view(np.int32)
    ci = cpoly.view(np.int32)
    d = zz.view(np.int32)
    np.bitwise_xor(si, ci, out=d)
    d &= swap
    si ^= d
    ci ^= d
    si ^= sign_sin
    ci ^= j

    # ---- outputs: fma(radius * cos, std, mean) with std = 1, mean = 0 is radius * cos + 0 ----
    o = out.reshape(nb, 2, 8).transpose(1, 0, 2)
    np.multiply(radius.reshape(nb, 8), cpoly.reshape(nb, 8), out=o[0])
    np.multiply(radius.reshape(nb, 8), spoly.reshape(nb, 8), out=o[1])
    out += F32(0)



def box_muller_f32(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Blocks of 16 engine words (shape (nb, 16), uint32) to float32 normals, as torch's AVX2
    kernel turns the corresponding float uniforms into normals."""
    if out is None:
        out = np.empty(w.shape, F32)
    ws = _workspace()
    for i in range(0, w.shape[0], _CHUNK_BLOCKS):
        _box_muller_f32_chunk(w[i:i + _CHUNK_BLOCKS], out[i:i + _CHUNK_BLOCKS], ws)
    return out
