"""Random numbers that match PyTorch's generators, drawn with numpy alone.

diffusers users pin an image with a seed (``generator=torch.manual_seed(42)``); sdort reproduces
the same noise without torch:

``TorchGenerator``
    PyTorch's CPU generator (``torch.Generator("cpu")``): the mt19937 engine, torch's seeding, its
    byte-exact ``get_state()``/``set_state()`` format and the exact arithmetic of ``torch.randn`` and
    ``torch.rand`` on CPU, for float32, float64, float16 and bfloat16.
``PhiloxGenerator``
    PyTorch's CUDA generator (``torch.Generator("cuda")``): Philox4x32-10 counters laid out as
    torch's grid-stride kernel lays them out, and curand's Box-Muller transform.
``as_generator``
    Turns a pipeline's ``generator`` argument (int seed, generator, list of them) into generators.

Both classes have the ``randn(shape, dtype=...)`` method that ``sdort.schedulers.noise.randn_tensor``
looks for. dtypes are numpy dtypes (``np.float32``, ``np.float64``, ``np.float16``) or
``ml_dtypes.bfloat16``; ml_dtypes is imported only when bfloat16 is asked for. This module never
imports torch.

How ``torch.randn`` works on CPU (ATen ``normal_kernel``, torch 2.x), and so how ``TorchGenerator``
works:

* Tensors of 16 elements or more take a block path. Uniforms are drawn from the engine
  (float: the low 24 bits of one 32-bit output times 2**-24; double: the low 53 bits of two
  outputs, the first one high, times 2**-53), then every block of 16 is turned into normals by
  Box-Muller, lane ``j`` pairing with lane ``j + 8`` (``u1 = 1 - data[j]`` gives the radius,
  ``u2 = data[j + 8]`` the angle; cosines go to lanes 0-7, sines to lanes 8-15). When the size is
  not a multiple of 16, 16 more uniforms are drawn and the last 16 outputs are recomputed from
  them.

  - float32 uses torch's vectorised kernel (``NormalFill16<float>`` with ``log256_ps`` and
    ``sincos256_ps`` from ``avx_mathfun.h``). Torch compiles its distribution kernels for the
    DEFAULT and AVX2 capabilities only, so this kernel runs on every x86-64 CPU with AVX2,
    AVX-512 ones included. GCC contracts the polynomial steps of that kernel into fused
    multiply-adds; this module follows the exact instruction sequence of the shipped binary.
    A float32 FMA ``fl32(a*b + c)`` is computed as ``float32(float64(a)*float64(b) + float64(c))``:
    the product of two float32 numbers is exact in float64, so only the final sum is rounded
    twice. That double rounding could in principle differ from a single rounding, so the whole
    kernel was checked exhaustively against torch's own compiled kernel: every one of the 2**24
    possible radius inputs and every one of the 2**24 angle inputs gives the same bits.
  - Without AVX2 (older x86-64 CPUs, aarch64, ``ATEN_CPU_CAPABILITY=default``) torch runs the
    same blocks through scalar code calling libm's ``logf`` and ``sincosf``; ``kernel="default"``
    reproduces that with glibc's algorithms (checked exhaustively against glibc 2.36 and, through
    torch, bit-exact; aarch64's glibc rounds the sincosf quadrant with an instruction instead,
    which could only matter for exact ties). ``cpu_kernel()`` picks the kernel torch would pick here; the two kernels
    differ in about 40% of values, by at most ~2.4e-6.
  - float64 uses libm's ``log``, ``sin`` and ``cos`` in double precision. numpy's own
    transcendental functions differ from libm in the last bit, so these are evaluated with
    Python's ``math`` module, which calls the same libm as torch (glibc on Linux).
  - float16 and bfloat16 draw 16 float uniforms per block (so the uniforms left over before the
    tail block are not drawn, unlike float32), run the float32 kernel and round the result.

* Smaller tensors take a serial path: every element is ``at::normal_distribution<double>``:
  two 53-bit uniforms ``u1, u2``, ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``; the element is
  ``r cos(theta)`` and ``r sin(theta)`` is cached in the generator for the next element, also
  across calls (``manual_seed`` clears it; ``get_state`` stores it). The double is then cast to
  the output dtype (through float32 for float16 and bfloat16, as c10's Half and BFloat16
  constructors take a float).

Platforms and limits: verified bit-exact against torch 2.13 (x86-64 Linux, glibc 2.36, GCC-built
wheel) for everything above. The AVX2 kernel is reproduced down to the multiply-adds GCC fused in
that build; a torch build whose compiler fused them differently would differ in the last bit of some
values. With another libm (macOS, Windows) the float64 and small-tensor paths still match torch,
because Python's ``math`` calls the same libm as torch, and the AVX2 kernel does not use libm; the
"default" kernel there can differ from torch by an ulp of ``logf``/``sinf``/``cosf``. torch's POWER
(VSX) kernel is not reproduced, nor are older torch releases whose float16/bfloat16 block path drew
11-bit/8-bit uniforms and computed in reduced precision.
"""

from __future__ import annotations

import math
import os
import platform
import secrets
import threading

import numpy as np

from .philox import PhiloxGenerator, philox4x32_10
from .rng_common import (
    DEFAULT_SEED,
    _F32,
    _F64,
    _TWO_PI,
    _U32,
    _U64,
    _as_state_bytes,
    _cast,
    _resolve_dtype,
    _seed_to_uint64,
    _shape_of,
)

__all__ = [
    "TorchGenerator", "PhiloxGenerator", "as_generator", "cpu_kernel", "set_num_threads", "philox4x32_10",
    "DEFAULT_SEED", "STATE_SIZE",
]

# ---------------------------------------------------------------------------------------------
# mt19937, as in ATen/core/MT19937RNGEngine.h
# ---------------------------------------------------------------------------------------------

_MT_N = 624
_MT_M = 397
_MATRIX_A = _U32(0x9908B0DF)
_UPPER = _U32(0x80000000)
_LOWER = _U32(0x7FFFFFFF)


def _mt_init(seed32: int) -> np.ndarray:
    """Knuth's initialisation of the 624-word state from a 32-bit seed."""
    key = [0] * _MT_N
    x = seed32 & 0xFFFFFFFF
    key[0] = x
    for j in range(1, _MT_N):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        key[j] = x
    return np.array(key, dtype=_U32)


def _mt_twist(key: np.ndarray) -> np.ndarray:
    """One regeneration of the state, vectorised.

    Word i becomes ``key[i + 397] ^ twist(key[i], key[i + 1])`` where indices past the end wrap to
    words already regenerated; 227 = 624 - 397 words can be computed at once.
    """
    old = key
    new = np.empty_like(old)
    y = (old[:-1] & _UPPER) | (old[1:] & _LOWER)
    t = (y >> _U32(1)) ^ ((old[1:] & _U32(1)) * _MATRIX_A)
    k = _MT_N - _MT_M  # 227
    new[:k] = old[_MT_M:] ^ t[:k]
    new[k:2 * k] = new[:k] ^ t[k:2 * k]
    new[2 * k:_MT_N - 1] = new[k:_MT_M - 1] ^ t[2 * k:]
    y_last = (int(old[-1]) & 0x80000000) | (int(new[0]) & 0x7FFFFFFF)
    new[-1] = int(new[_MT_M - 1]) ^ (y_last >> 1) ^ (0x9908B0DF if int(new[0]) & 1 else 0)
    return new


def _temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> _U32(11))
    y ^= (y << _U32(7)) & _U32(0x9D2C5680)
    y ^= (y << _U32(15)) & _U32(0xEFC60000)
    y ^= y >> _U32(18)
    return y


# ---------------------------------------------------------------------------------------------
# float32 Box-Muller: torch's AVX2 kernel (NormalFill16<float> with avx_mathfun's log256_ps and
# sincos256_ps), reproduced operation by operation as GCC compiled it in libtorch_cpu
# ---------------------------------------------------------------------------------------------
#
# Notation: fl32() rounds to float32, fma(a, b, c) = fl32(a * b + c) with one rounding. Every
# fma below is evaluated as fl32(fl64(a * b + c)) with a*b exact in float64; see the module
# docstring for why that double rounding never shows (exhaustive check). Arrays are processed in
# chunks, with preallocated buffers, because numpy's cost here is memory traffic and allocation.

# log256_ps: cephes logf polynomial, evaluated as fma(y, x, p_k) from p0 * x + p1
_LOG_P = [_F64(_F32(v)) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F64(_F32(0.693359375))
_SQRTHF_BITS = 0x3F3504F3  # float32 sqrt(0.5), the cephes threshold
# sincos256_ps: cephes sinf/cosf with Cody-Waite reduction by multiples of pi/4
_FOPI = _F32(1.27323954473516)  # 4 / pi
# DP1 (8 significant bits) and DP2 (11 bits) are short enough that y*DP1 and y*DP2 (y <= 8) are
# exact and so are the first two reduction steps: x + y*DP1 + y*DP2 needs no rounding at all.
_DP12 = _F64(_F32(-0.78515625)) + _F64(_F32(-2.4187564849853515625e-4))  # exact in float64
_DP3 = _F64(_F32(-3.77489497744594108e-8))
_SIN_P = [_F64(_F32(v)) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COS_P = [_F64(_F32(v)) for v in (2.443315711809948e-005, -1.388731625493765e-003, 4.166664568298827e-002)]
# theta = fl32(fl32(2 pi) * u2) with u2 = k * 2**-24 equals fl32(k * fl32(2 pi) * 2**-24): scaling
# by a power of two commutes with rounding, so theta is one multiplication of the integer k.
_THETA_SCALE = _F32(_F32(2.0 * math.pi) * _F32(2.0 ** -24))

_CHUNK_BLOCKS = 2048  # blocks of 16 per pass (16384 pairs): buffers stay in L2
_workspaces = threading.local()


class _Workspace:
    """Scratch buffers for one chunk, reused across calls (per thread)."""

    def __init__(self, n: int):
        self.n = n
        self.lanes = np.empty((2, n), np.int32)
        self.f32 = [np.empty(n, _F32) for _ in range(5)]
        self.f64 = [np.empty(n, _F64) for _ in range(3)]
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
    x -= _F32(1)
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
    z *= _F32(0.5)  # y = fnmadd(z, 0.5, y) = fl32(y - z/2): z/2 is exact
    y32 -= z
    x += y32  # x = x + y
    np.copyto(y64, ez)  # log = fma(e, q2, x)
    y64 *= _LOG_Q2
    np.copyto(t64, x)
    y64 += t64
    np.copyto(radius, y64, casting="unsafe")
    radius *= _F32(-2)
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
    cpoly += _F32(1)
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
    out += _F32(0)


def _chunks_serial(w: np.ndarray, out: np.ndarray, starts) -> None:
    ws = _workspace()
    for i in starts:
        _box_muller_f32_chunk(w[i:i + _CHUNK_BLOCKS], out[i:i + _CHUNK_BLOCKS], ws)


_pool = None
_pool_lock = threading.Lock()
_num_threads = None


def set_num_threads(n: int | None) -> None:
    """Threads for large float32/float16/bfloat16 draws: 1 (the default) or 2; None restores the
    default. The environment variable SDORT_RANDOM_THREADS sets the same. Results never depend
    on it. Two threads only pay off when a second core is idle: on a busy machine they were
    slower than one in our measurements, hence the default."""
    global _num_threads
    _num_threads = None if n is None else max(1, int(n))


def _threads() -> int:
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get("SDORT_RANDOM_THREADS")
    return max(1, int(env)) if env else 1


def _box_muller_f32(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Blocks of 16 engine words (shape (nb, 16), uint32) to float32 normals, as torch's AVX2
    kernel turns the corresponding float uniforms into normals. numpy releases the GIL inside
    its loops, so large draws can split their chunks between two threads."""
    global _pool
    if out is None:
        out = np.empty(w.shape, _F32)
    starts = list(range(0, w.shape[0], _CHUNK_BLOCKS))
    if len(starts) < 2 or _threads() < 2:
        _chunks_serial(w, out, starts)
        return out
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdort-random")
    half = len(starts) // 2
    job = _pool.submit(_chunks_serial, w, out, starts[half:])
    _chunks_serial(w, out, starts[:half])
    job.result()
    return out


# ---------------------------------------------------------------------------------------------
# float32 Box-Muller without AVX2 (torch's DEFAULT capability: CPUs without AVX2, aarch64):
# NormalFill16<float> in scalar code, calling libm's logf and sincosf. These are glibc's
# (ARM optimized-routines) algorithms, in double precision with a float result.
# ---------------------------------------------------------------------------------------------
#
# The double arithmetic below is written without fused multiply-adds, as in glibc's generic
# build; glibc's FMA build differs from it in the last double bits only, and for every input this
# path can see (u1 = k * 2**-24 and theta = fl32(2 pi k * 2**-24), 2**24 values each) both give the
# same float results, as checked exhaustively against glibc 2.36's FMA build.

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
    k = (tmp.view(np.int32) >> 23).astype(_F64)
    z = (ix - (tmp & np.uint32(0xFF800000))).view(_F32).astype(_F64)  # x = 2**k z, z in [0x3f330000, ...)
    r = z * np.take(_LOGF_INVC, i) - 1.0
    y0 = np.take(_LOGF_LOGC, i) + k * _LOGF_LN2
    r2 = r * r
    y = _LOGF_A1 * r + _LOGF_A2
    y = _LOGF_A0 * r2 + y
    y = y * r2 + (y0 + r)
    return y.astype(_F32)


def _libm_sincosf(theta: np.ndarray):
    """glibc's sincosf for float32 ``theta`` in [0, 120)."""
    top = theta.view(np.uint32) >> np.uint32(20)
    x = theta.astype(_F64)
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
    sin_ = (s + x5 * s1).astype(_F32)
    cos_ = (c + x6 * c2).astype(_F32)
    odd = (n & 1).astype(bool)  # odd quadrants swap the two results
    sin_out = np.where(odd, cos_, sin_)
    cos_out = np.where(odd, sin_, cos_)
    tiny = top < _ABSTOP12_TINY
    if tiny.any():
        sin_out[tiny] = theta[tiny]
        cos_out[tiny] = 1.0
    return sin_out, cos_out


def _box_muller_f32_libm(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Blocks of 16 engine words (nb, 16) to float32 normals, as torch's scalar (DEFAULT) kernel:
    ``radius = sqrtf(-2 * logf(1 - u1))``, ``theta = (float)(2 pi * (double)u2)``,
    ``fmaf(radius * cosf(theta), 1, 0)`` (sine for lanes 8-15)."""
    if out is None:
        out = np.empty(w.shape, _F32)
    for i in range(0, w.shape[0], _CHUNK_BLOCKS):
        c = w[i:i + _CHUNK_BLOCKS]
        u = (c & _U32(0xFFFFFF)).astype(_F32)
        u *= _F32(2.0 ** -24)
        radius = np.sqrt(_libm_logf(_F32(1) - u[:, :8]) * _F32(-2))
        theta = (u[:, 8:].astype(_F64) * _TWO_PI).astype(_F32)
        s, co = _libm_sincosf(theta)
        o = out[i:i + _CHUNK_BLOCKS]
        np.multiply(radius, co, out=o[:, :8])
        np.multiply(radius, s, out=o[:, 8:])
        o += _F32(0)
    return out


def _cpu_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            feats = {}
    return dict(feats)


def cpu_kernel() -> str:
    """The float32 kernel torch would use here: "avx2" on x86-64 CPUs with AVX2 and FMA (torch's
    AVX2 and AVX512 capabilities share it), "default" otherwise. ``ATEN_CPU_CAPABILITY=default``
    selects "default", as it does in torch."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if cap == "default":
        return "default"
    if platform.machine().lower() not in ("x86_64", "amd64", "x64"):
        return "default"
    feats = _cpu_features()
    if feats and not (feats.get("AVX2") and feats.get("FMA3")):
        return "default"
    return "avx2"


# ---------------------------------------------------------------------------------------------
# float64 Box-Muller (NormalFill16<double>): libm's log and sincos, through Python's math module
# ---------------------------------------------------------------------------------------------

def _libm_map(func, values: np.ndarray) -> np.ndarray:
    return np.fromiter(map(func, values.ravel().tolist()), dtype=_F64, count=values.size).reshape(values.shape)


def _box_muller_f64(u: np.ndarray) -> np.ndarray:
    radius = np.sqrt(-2.0 * _libm_map(math.log, 1.0 - u[:, :8]))
    theta = _TWO_PI * u[:, 8:]
    out = np.empty_like(u)
    np.multiply(radius, _libm_map(math.cos, theta), out=out[:, :8])
    np.multiply(radius, _libm_map(math.sin, theta), out=out[:, 8:])
    out += 0.0
    return out


# ---------------------------------------------------------------------------------------------
# TorchGenerator
# ---------------------------------------------------------------------------------------------

# torch's CPUGeneratorImplState (CPUGeneratorImpl.cpp), 5056 bytes on LP64 platforms
_STATE_DTYPE = np.dtype({
    "names": ["seed", "left", "seeded", "next", "state", "normal_x", "normal_y", "normal_rho",
              "normal_is_valid", "next_float", "next_float_valid"],
    "formats": ["<u8", "<i4", "<i4", "<u8", ("<u8", (_MT_N,)), "<f8", "<f8", "<f8", "<i4", "<f4", "u1"],
    "offsets": [0, 8, 12, 16, 24, 5016, 5024, 5032, 5040, 5048, 5052],
    "itemsize": 5056,
})
STATE_SIZE = _STATE_DTYPE.itemsize


class TorchGenerator:
    """PyTorch's CPU random generator (``torch.Generator("cpu")``) in numpy.

    ``TorchGenerator(seed)`` draws what ``torch.Generator().manual_seed(seed)`` draws:
    ``randn`` and ``rand`` give the bits torch gives for float32, float64, float16 and bfloat16
    (see the module docstring for the algorithms and the platforms), and the state advances as
    torch's does across calls of any size and dtype. ``get_state()`` returns the bytes of torch's
    ``get_state()`` and ``set_state()`` accepts them (also straight from torch).

    ``seed=None`` gives torch's default seed (``torch.Generator()`` without ``manual_seed``);
    call ``seed()`` for a non-deterministic one.

    ``kernel`` picks the float32 Box-Muller arithmetic of tensors with 16 or more elements (also
    used for float16 and bfloat16): "avx2" is torch's vectorised kernel, used by torch on every
    x86-64 CPU with AVX2; "default" is torch's scalar kernel with libm's ``logf``/``sincosf``
    (glibc's algorithms), used by torch without AVX2 (older x86, aarch64) or under
    ``ATEN_CPU_CAPABILITY=default``. None or "auto" picks what torch would pick on this machine
    (see ``cpu_kernel()``). Both are bit-exact with torch where torch runs that kernel with glibc;
    with another libm (macOS, Windows) "default" can differ from torch by an ulp of ``logf``,
    ``sinf`` or ``cosf``. The two kernels differ from each other in about 40% of the values, by at
    most about 2.4e-6.
    """

    device = "cpu"

    def __init__(self, seed=None, *, kernel: str | None = None):
        self._lock = threading.RLock()
        self._bitgen = None
        if kernel in (None, "auto"):
            kernel = cpu_kernel()
        if kernel not in ("avx2", "default"):
            raise ValueError(f"kernel must be 'auto', 'avx2' or 'default', not {kernel!r}")
        self.kernel = kernel
        self.manual_seed(DEFAULT_SEED if seed is None else seed)

    # -- seeding and state -------------------------------------------------------------------
    def manual_seed(self, seed) -> "TorchGenerator":
        """Seed as ``torch.Generator.manual_seed``: 64-bit seeds keep their low 32 bits for the
        engine, negative seeds wrap around 2**64; the cached normal is cleared. Returns self."""
        seed = _seed_to_uint64(seed)
        with self._lock:
            self._seed = seed
            self._key = _mt_init(seed & 0xFFFFFFFF)
            self._left = 1
            self._next = 0
            self._next_double = None
            self._next_float = None
        return self

    def seed(self) -> int:
        """Re-seed from the operating system's entropy; returns the new seed (``Generator.seed``)."""
        s = secrets.randbits(64)
        self.manual_seed(s)
        return s

    def initial_seed(self) -> int:
        return self._seed

    def get_state(self) -> np.ndarray:
        """The generator state as torch's ``get_state()`` bytes (a uint8 array of 5056 bytes)."""
        with self._lock:
            rec = np.zeros((), dtype=_STATE_DTYPE)
            rec["seed"] = self._seed
            rec["left"] = self._left
            rec["seeded"] = 1
            rec["next"] = self._next
            rec["state"] = self._key.astype(_U64)
            if self._next_double is not None:
                rec["normal_is_valid"] = 1
                rec["normal_y"] = self._next_double
            if self._next_float is not None:
                rec["next_float_valid"] = 1
                rec["next_float"] = self._next_float
            return np.frombuffer(rec.tobytes(), dtype=np.uint8).copy()

    def set_state(self, new_state) -> "TorchGenerator":
        """Restore a state from ``get_state()`` bytes (this class's or torch's). Returns self."""
        arr = _as_state_bytes(new_state, STATE_SIZE)
        rec = arr.view(_STATE_DTYPE)[0]
        left, seeded, nxt = int(rec["left"]), int(rec["seeded"]), int(rec["next"]) & 0xFFFFFFFF
        if not (seeded != 0 and 0 < left <= _MT_N and nxt <= _MT_N):
            raise ValueError("Invalid mt19937 state")
        with self._lock:
            self._seed = int(rec["seed"])
            self._key = rec["state"].astype(_U32)  # torch copies the uint64 words into uint32
            self._left = left
            self._next = nxt
            self._next_double = float(rec["normal_y"]) if int(rec["normal_is_valid"]) else None
            self._next_float = float(rec["next_float"]) if int(rec["next_float_valid"]) else None
        return self

    def clone(self) -> "TorchGenerator":
        """An independent copy with the same state."""
        return TorchGenerator(kernel=self.kernel).set_state(self.get_state())

    def __repr__(self) -> str:
        return f"TorchGenerator(initial_seed={self._seed}, kernel={self.kernel!r})"

    # -- the engine ------------------------------------------------------------------------
    def _words(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs of the engine, as torch's ``random()`` would return them."""
        out = np.empty(n, dtype=_U32)
        k = min(n, self._left - 1)  # words left before torch regenerates the state
        if k > 0:
            if self._next + k > _MT_N:
                raise RuntimeError("mt19937 state is inconsistent (next + left > 625); torch would read "
                                   "past its state array here")
            out[:k] = _temper(self._key[self._next:self._next + k])
            self._next += k
            self._left -= k
        rest = n - k
        if rest <= 0:
            return out
        if rest <= 2 * _MT_N:
            pos = k
            while rest > 0:
                self._key = _mt_twist(self._key)
                take = min(rest, _MT_N)
                out[pos:pos + take] = _temper(self._key[:take])
                pos += take
                rest -= take
                self._next = take
                self._left = _MT_N + 1 - take
            return out
        # Long draws: numpy's MT19937 bit generator runs the same mt19937 recurrence and
        # tempering in C. Its state is the 624 words and a read position; position 624 means
        # "regenerate before the next read", which is where torch stands now.
        if self._bitgen is None:
            self._bitgen = np.random.MT19937()
        bg = self._bitgen
        bg.state = {"bit_generator": "MT19937", "state": {"key": self._key, "pos": _MT_N}}
        out[k:] = bg.random_raw(rest)
        st = bg.state["state"]
        self._key = np.asarray(st["key"], dtype=_U32).copy()
        self._next = int(st["pos"])
        self._left = _MT_N + 1 - self._next
        return out

    def _uniform_f32(self, n: int) -> np.ndarray:
        w = self._words(n)
        w &= _U32(0xFFFFFF)
        u = w.astype(_F32)
        u *= _F32(2.0 ** -24)
        return u

    def _uniform_f64(self, n: int) -> np.ndarray:
        w = self._words(2 * n).astype(_U64)
        v = (w[0::2] & _U64(0x1FFFFF)) << _U64(32)
        v |= w[1::2]
        u = v.astype(_F64)
        u *= 2.0 ** -53
        return u

    def _normal_serial(self, n: int) -> np.ndarray:
        """``at::normal_distribution<double>`` element by element, with the cached second sample."""
        vals = []
        if n and self._next_double is not None:
            vals.append(self._next_double)
            self._next_double = None
        pairs = (n - len(vals) + 1) // 2
        if pairs:
            w = self._words(4 * pairs).tolist()
            for p in range(pairs):
                a, b, c, d = w[4 * p:4 * p + 4]
                u1 = (((a & 0x1FFFFF) << 32) | b) * 2.0 ** -53
                u2 = (((c & 0x1FFFFF) << 32) | d) * 2.0 ** -53
                r = math.sqrt(-2.0 * math.log1p(-u2))
                theta = _TWO_PI * u1
                vals.append(r * math.cos(theta))
                sample = r * math.sin(theta)
                if len(vals) < n:
                    vals.append(sample)
                else:
                    self._next_double = sample
        out = np.array(vals, dtype=_F64)
        out += 0.0  # val * std + mean with std = 1, mean = 0
        return out

    # -- distributions ---------------------------------------------------------------------
    def randn(self, *shape, dtype=np.float32) -> np.ndarray:
        """``torch.randn(shape, generator=g, dtype=...)``: standard normal noise."""
        shape = _shape_of(shape)
        kind, dt = _resolve_dtype(dtype)
        n = math.prod(shape)
        with self._lock:
            if n < 16:
                return _cast(self._normal_serial(n), kind, dt).reshape(shape)
            nb, tail = divmod(n, 16)
            if kind == "float64":
                u = self._uniform_f64(n + (16 if tail else 0))
                out = np.empty(n, _F64)
                out[:16 * nb] = _box_muller_f64(u[:16 * nb].reshape(nb, 16)).reshape(-1)
                if tail:
                    out[n - 16:] = _box_muller_f64(u[n:].reshape(1, 16)).reshape(-1)
                return out.reshape(shape)
            # float uniforms are the low 24 bits of a word times 2**-24; the kernel takes the words
            if kind == "float32":
                w = self._words(n + (16 if tail else 0))
                body, extra = w[:16 * nb], w[n:]  # the leftover uniforms are drawn, then overwritten
            else:  # float16 / bfloat16 draw 16 uniforms per block, then 16 for the tail
                w = self._words(16 * nb + (16 if tail else 0))
                body, extra = w[:16 * nb], w[16 * nb:]
            box_muller = _box_muller_f32 if self.kernel == "avx2" else _box_muller_f32_libm
            out = np.empty(n, _F32)
            box_muller(body.reshape(nb, 16), out[:16 * nb].reshape(nb, 16))
            if tail:
                out[n - 16:] = box_muller(extra.reshape(1, 16)).reshape(-1)
            return _cast(out, kind, dt).reshape(shape)

    def rand(self, *shape, dtype=np.float32) -> np.ndarray:
        """``torch.rand(shape, generator=g, dtype=...)``: uniform on [0, 1)."""
        shape = _shape_of(shape)
        kind, dt = _resolve_dtype(dtype)
        n = math.prod(shape)
        with self._lock:
            if kind == "float64":
                return self._uniform_f64(n).reshape(shape)
            u = self._uniform_f32(n)
        if kind == "float32":
            return u.reshape(shape)
        out = u.astype(dt)
        out[out == 1] = 0  # a value rounded up to the upper bound is clamped to the lower one
        return out.reshape(shape)

    def normal(self, *shape, dtype=np.float32) -> np.ndarray:
        """Alias of ``randn``."""
        return self.randn(*shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# as_generator
# ---------------------------------------------------------------------------------------------

def _from_torch_generator(gen):
    """A torch.Generator (duck-typed, torch is not imported) -> the equivalent sdort generator.

    The copy starts from the torch generator's current state; drawing from it does not advance
    the torch generator.
    """
    device = str(getattr(gen, "device", "cpu"))
    state = np.asarray(gen.get_state())
    if device.startswith("cuda"):
        return PhiloxGenerator().set_state(state)
    if device.startswith("cpu"):
        return TorchGenerator().set_state(state)
    raise TypeError(f"cannot reproduce a generator on device {device!r}")


def as_generator(generator):
    """Normalise a pipeline's ``generator`` argument.

    int seed -> ``TorchGenerator(seed)`` (the numbers of ``torch.Generator().manual_seed(seed)``);
    list or tuple -> list of converted items; ``numpy.random.Generator``, ``TorchGenerator``,
    ``PhiloxGenerator`` and None pass through unchanged; a ``torch.Generator`` (recognised without
    importing torch) becomes a ``TorchGenerator``/``PhiloxGenerator`` with a copy of its state.
    """
    if generator is None:
        return None
    if isinstance(generator, (TorchGenerator, PhiloxGenerator, np.random.Generator)):
        return generator
    if isinstance(generator, (list, tuple)):
        return [as_generator(g) for g in generator]
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, (bool, np.bool_)):
        return TorchGenerator(int(generator))
    if type(generator).__module__.startswith("torch") and hasattr(generator, "get_state") \
            and hasattr(generator, "initial_seed"):
        return _from_torch_generator(generator)
    raise TypeError(
        "generator must be an int seed, a TorchGenerator, a PhiloxGenerator, a numpy.random.Generator, "
        f"None or a list of them; got {type(generator).__name__}"
    )
