"""PyTorch's CUDA generator (``torch.Generator("cuda")``): ``PhiloxGenerator``.

Philox4x32-10 counters laid out as torch's grid-stride kernel lays them out, and curand's
Box-Muller transform, computed on the CPU with numpy; the class docstring says how exact.
"""

from __future__ import annotations

import math
import operator
import threading

import numpy as np

from .common import DEFAULT_SEED, F32, F64, U32, U64, SeededGenerator, as_state_bytes, cast, resolve_dtype, \
    seed_to_uint64, shape_of

__all__ = ["PhiloxGenerator", "philox4x32_10"]


# ---------------------------------------------------------------------------------------------
# PhiloxGenerator
# ---------------------------------------------------------------------------------------------

_PHILOX_M0 = U64(0xD2511F53)
_PHILOX_M1 = U64(0xCD9E8D57)
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_SHIFT32 = U64(32)


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) on arrays: ``counter`` is four uint32 arrays (or ints),
    ``key`` two ints. Returns the four output words as uint32 arrays."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=U32) for c in counter))
    # 32-bit words held in uint64 so that the 32x32 -> 64-bit products need no conversions
    c0, c1, c2, c3 = (c.astype(U64) for c in (c0, c1, c2, c3))
    mask = U64(0xFFFFFFFF)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(10):
        if r:
            k0 = (k0 + _PHILOX_W0) & 0xFFFFFFFF
            k1 = (k1 + _PHILOX_W1) & 0xFFFFFFFF
        p0 = c0 * _PHILOX_M0
        p1 = c2 * _PHILOX_M1
        hi1 = p1 >> _SHIFT32
        hi1 ^= c1
        hi1 ^= U64(k0)
        hi0 = p0 >> _SHIFT32
        hi0 ^= c3
        hi0 ^= U64(k1)
        p1 &= mask
        p0 &= mask
        c0, c1, c2, c3 = hi1, p1, hi0, p0
    return tuple(c.astype(U32) for c in (c0, c1, c2, c3))


_BLOCK_THREADS = 256  # torch's block_size_bound
_CURAND_2POW32_INV = F32(2.3283064e-10)
_CURAND_2POW32_INV_2PI = F32(F32(2.3283064e-10) * F32(6.2831855))
_CURAND_2POW53_INV = 1.1102230246251565e-16


class PhiloxGenerator(SeededGenerator):
    """PyTorch's CUDA random generator (``torch.Generator("cuda")``) in numpy.

    ``torch.randn(shape, device="cuda", generator=g)`` runs a grid-stride kernel of 256-thread
    blocks. Thread ``t`` calls ``curand_init(seed, subsequence=t, offset)``, so its Philox4x32-10
    counter is ``(offset / 4 + k, t)`` (low and high 64 bits) in its ``k``-th loop iteration, and
    ``curand_normal4`` turns the four words into four normals with curand's Box-Muller
    (``sqrt(-2 log u) * (sin v, cos v)`` for each pair of words; float64 uses
    ``curand_normal2_double``: two normals from four words, with ``sincospi``). The generator's
    offset then grows by 4 per loop iteration (4 per call for all but huge tensors).

    Layout limit: the grid has ``ceil(numel / 256)`` blocks, capped by the GPU at
    ``multiProcessorCount * (maxThreadsPerMultiProcessor // 256)`` blocks. Below the cap (numel
    up to ``multiProcessorCount * maxThreadsPerMultiProcessor``: 221184 on an A100, 125952 on an
    RTX 3090, 196608 on an RTX 4090; a 1x4x128x128 latent is 65536) element ``i`` is the first
    normal of thread ``i`` and this class matches torch for any size. For larger tensors pass the
    GPU's cap as ``max_blocks`` (e.g. ``108 * 8`` for an A100) and the same grid-stride layout is
    reproduced; with ``max_blocks=None`` the grid is never capped. Tensors of 2**31 elements or
    more, which torch splits into several launches, are not reproduced.

    Precision: Philox, the uniforms, the counter layout and the offsets are exact. The GPU
    computes the angle with ``__sincosf`` (a hardware approximation with an absolute error of
    about 2**-21.4) and ``logf`` within 1 ulp; here they are computed accurately and rounded to
    float32, so float32 values agree with torch CUDA to about 1e-6 (the bound scales with the
    value's radius: up to a few 1e-6 for the rare values beyond |x| > 4). float64 agrees to about
    1e-15. ``rand`` involves no transcendental function and is exact.
    """

    device = "cuda"

    def __init__(self, seed=None, max_blocks: int | None = None):
        self._lock = threading.RLock()
        if max_blocks is not None and int(max_blocks) < 1:
            raise ValueError("max_blocks must be a positive number of thread blocks")
        self.max_blocks = None if max_blocks is None else int(max_blocks)
        self.manual_seed(DEFAULT_SEED if seed is None else seed)

    def manual_seed(self, seed) -> "PhiloxGenerator":
        """Seed as ``torch.cuda`` generators: the full 64-bit seed is the Philox key; the offset
        restarts at 0. Returns self."""
        seed = seed_to_uint64(seed)
        with self._lock:
            self._seed = seed
            self._offset = 0
        return self

    def get_offset(self) -> int:
        return self._offset

    def set_offset(self, offset: int) -> "PhiloxGenerator":
        offset = operator.index(offset)
        if offset < 0 or offset % 4:
            raise ValueError("the Philox offset must be a non-negative multiple of 4")
        self._offset = offset
        return self

    def get_state(self) -> np.ndarray:
        """torch's CUDA ``get_state()`` bytes: the seed (uint64) then the offset (int64)."""
        return np.frombuffer(np.array([self._seed, self._offset], dtype="<u8").tobytes(), dtype=np.uint8).copy()

    def set_state(self, new_state) -> "PhiloxGenerator":
        arr = as_state_bytes(new_state, 16)
        seed, offset = (int(v) for v in arr.view("<u8"))
        if offset >= 1 << 63:
            raise ValueError("negative Philox offset in state")
        with self._lock:
            self._seed = seed
            self.set_offset(offset)
        return self

    def clone(self) -> "PhiloxGenerator":
        return PhiloxGenerator(max_blocks=self.max_blocks).set_state(self.get_state())

    def __repr__(self) -> str:
        return f"PhiloxGenerator(initial_seed={self._seed}, offset={self._offset})"

    # -- layout ------------------------------------------------------------------------------
    def _launch(self, n: int, unroll: int):
        """Counters for ``n`` outputs: returns (thread, iteration, lane) arrays and the base counter."""
        grid = -(-n // _BLOCK_THREADS)
        if self.max_blocks is not None:
            grid = min(grid, self.max_blocks)
        stride = _BLOCK_THREADS * grid
        iters = (n - 1) // (stride * unroll) + 1
        with self._lock:
            base = self._offset
            self._offset += iters * 4  # philox_cuda_state(counter_offset)
        i = np.arange(n, dtype=np.int64)
        if stride >= n:  # one element per thread: the usual case
            zeros = np.zeros(n, dtype=np.int64)
            return i, zeros, zeros, base // 4
        q, thread = np.divmod(i, stride)
        k, lane = np.divmod(q, unroll)
        return thread, k, lane, base // 4

    def _words4(self, n: int, unroll: int):
        thread, k, lane, base = self._launch(n, unroll)
        ctr = k.astype(U64) + U64(base)
        t = thread.astype(U64)
        words = philox4x32_10(
            (ctr.astype(U32), (ctr >> _SHIFT32).astype(U32), t.astype(U32), (t >> _SHIFT32).astype(U32)),
            (self._seed & 0xFFFFFFFF, self._seed >> 32))
        return words, lane

    def randn(self, *shape, dtype=np.float32) -> np.ndarray:
        """``torch.randn(shape, device="cuda", generator=g, dtype=...)``, computed on the CPU."""
        shape = shape_of(shape)
        kind, dt = resolve_dtype(dtype)
        n = math.prod(shape)
        if n == 0:
            return np.empty(shape, dt)
        if kind == "float64":
            (x0, x1, x2, x3), lane = self._words4(n, 2)
            zx = x0.astype(U64) ^ (x1.astype(U64) << U64(21))
            zy = x2.astype(U64) ^ (x3.astype(U64) << U64(21))
            u = zx.astype(F64) * _CURAND_2POW53_INV + _CURAND_2POW53_INV / 2.0
            v = zy.astype(F64) * (_CURAND_2POW53_INV * 2.0) + _CURAND_2POW53_INV
            s = np.sqrt(-2.0 * np.log(u))
            v = np.where(v > 1.0, v - 2.0, v)  # sincospi(v): reduce to [-1, 1] exactly first
            ang = np.pi * v
            out = s * np.where(lane == 0, np.sin(ang), np.cos(ang))
            return (out + 0.0).reshape(shape)
        (x0, x1, x2, x3), lane = self._words4(n, 4)
        first = lane < 2
        a = np.where(first, x0, x2)
        b = np.where(first, x1, x3)
        u = (a.astype(F32).astype(F64) * F64(_CURAND_2POW32_INV) + F64(_CURAND_2POW32_INV) / 2).astype(F32)
        v = (b.astype(F32).astype(F64) * F64(_CURAND_2POW32_INV_2PI)
             + F64(_CURAND_2POW32_INV_2PI) / 2).astype(F32)
        s = np.sqrt(F32(-2) * np.log(u.astype(F64)).astype(F32))
        v64 = v.astype(F64)
        odd = (lane % 2).astype(bool)  # lanes 0, 2: sine; 1, 3: cosine
        trig = np.sin(v64) if not odd.any() else np.where(odd, np.cos(v64), np.sin(v64))
        trig = trig.astype(F32)
        out = trig * s + F32(0)
        return cast(out, kind, dt).reshape(shape)

    def rand(self, *shape, dtype=np.float32) -> np.ndarray:
        """``torch.rand(shape, device="cuda", generator=g, dtype=...)``: curand_uniform4 with
        torch's (0, 1] -> [0, 1) reversal of the upper bound."""
        shape = shape_of(shape)
        kind, dt = resolve_dtype(dtype)
        n = math.prod(shape)
        if n == 0:
            return np.empty(shape, dt)
        if kind == "float64":
            (x0, x1, x2, x3), lane = self._words4(n, 2)
            lo = np.where(lane == 0, x0, x2).astype(U64)
            hi = np.where(lane == 0, x1, x3).astype(U64)
            z = lo ^ (hi << U64(21))
            out = z.astype(F64) * _CURAND_2POW53_INV + _CURAND_2POW53_INV / 2.0
            out[out == 1.0] = 0.0
            return out.reshape(shape)
        (x0, x1, x2, x3), lane = self._words4(n, 4)
        w = np.choose(lane, (x0, x1, x2, x3))
        u = (w.astype(F32).astype(F64) * F64(_CURAND_2POW32_INV) + F64(_CURAND_2POW32_INV) / 2).astype(F32)
        out = u.astype(dt)
        out[out == 1] = 0
        return out.reshape(shape)
