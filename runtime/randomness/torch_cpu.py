"""PyTorch's CPU generator (``torch.Generator("cpu")``): ``TorchGenerator``.

``TorchGenerator`` draws the bits ``torch.randn`` and ``torch.rand`` draw on CPU, for float32,
float64, float16 and bfloat16, from the mt19937 engine with torch's seeding and state format
(``mt19937.py``). This module holds the generator and the paths of ``torch.randn`` (ATen
``normal_kernel``, torch 2.x); the float32 arithmetic is in ``avx2_kernel.py`` and
``default_kernel.py``.

* Tensors of 16 elements or more take a block path. Uniforms are drawn from the engine
  (float: the low 24 bits of one 32-bit output times 2**-24; double: the low 53 bits of two
  outputs, the first one high, times 2**-53), then every block of 16 is turned into normals by
  Box-Muller, lane ``j`` pairing with lane ``j + 8`` (``u1 = 1 - data[j]`` gives the radius,
  ``u2 = data[j + 8]`` the angle; cosines go to lanes 0-7, sines to lanes 8-15). When the size is
  not a multiple of 16, 16 more uniforms are drawn and the last 16 outputs are recomputed from
  them.

  - float32 runs one of torch's two float32 kernels: the AVX2 one on x86-64 CPUs with AVX2,
    the scalar "default" one elsewhere (``cpu_kernel()`` picks as torch would).
  - float64 uses libm's ``log``, ``sin`` and ``cos`` in double precision (``_box_muller_f64``).
  - float16 and bfloat16 draw 16 float uniforms per block (so the uniforms left over before the
    tail block are not drawn, unlike float32), run the float32 kernel and round the result.

* Smaller tensors take a serial path: every element is ``at::normal_distribution<double>``:
  two 53-bit uniforms ``u1, u2``, ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``; the element is
  ``r cos(theta)`` and ``r sin(theta)`` is cached in the generator for the next element, also
  across calls (``manual_seed`` clears it; ``get_state`` stores it). The double is then cast to
  the output dtype (through float32 for float16 and bfloat16, as c10's Half and BFloat16
  constructors take a float).

Platforms and limits: verified bit-exact against torch 2.13 (x86-64 Linux, glibc 2.36, GCC-built
wheel) for everything above. With another libm (macOS, Windows) the float64 and small-tensor paths
still match torch, because Python's ``math`` calls the same libm as torch; the kernels' modules
say what holds for float32 there. torch's POWER (VSX) kernel is not reproduced, nor are older
torch releases whose float16/bfloat16 block path drew 11-bit/8-bit uniforms and computed in
reduced precision.
"""

from __future__ import annotations

import math
import os
import platform
import threading

import numpy as np

from . import avx2_kernel, default_kernel
from .common import DEFAULT_SEED, F32, F64, TWO_PI, U32, U64, SeededGenerator, cast, resolve_dtype, \
    seed_to_uint64, shape_of
from .mt19937 import MT19937, pack_state, unpack_state

__all__ = ["TorchGenerator", "cpu_kernel"]

# float32 Box-Muller of blocks of 16 engine words, by the name of torch's kernel
_KERNELS = {"avx2": avx2_kernel.box_muller_f32, "default": default_kernel.box_muller_f32}


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


# float64 Box-Muller (NormalFill16<double>). numpy's own transcendental functions differ from libm
# in the last bit, so log, cos and sin are evaluated with Python's math module, which calls the
# same libm as torch (glibc on Linux).

def _libm_map(func, values: np.ndarray) -> np.ndarray:
    return np.fromiter(map(func, values.ravel().tolist()), dtype=F64, count=values.size).reshape(values.shape)


def _box_muller_f64(u: np.ndarray) -> np.ndarray:
    radius = np.sqrt(-2.0 * _libm_map(math.log, 1.0 - u[:, :8]))
    theta = TWO_PI * u[:, 8:]
    out = np.empty_like(u)
    np.multiply(radius, _libm_map(math.cos, theta), out=out[:, :8])
    np.multiply(radius, _libm_map(math.sin, theta), out=out[:, 8:])
    out += 0.0
    return out


class TorchGenerator(SeededGenerator):
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
        if kernel in (None, "auto"):
            kernel = cpu_kernel()
        if not (isinstance(kernel, str) and kernel in _KERNELS):
            raise ValueError(f"kernel must be 'auto', 'avx2' or 'default', not {kernel!r}")
        self.kernel = kernel
        self.manual_seed(DEFAULT_SEED if seed is None else seed)

    # -- seeding and state -------------------------------------------------------------------
    def manual_seed(self, seed) -> "TorchGenerator":
        """Seed as ``torch.Generator.manual_seed``: 64-bit seeds keep their low 32 bits for the
        engine, negative seeds wrap around 2**64; the cached normal is cleared. Returns self."""
        seed = seed_to_uint64(seed)
        with self._lock:
            self._seed = seed
            self._engine = MT19937.seeded(seed & 0xFFFFFFFF)
            self._next_double = None
            self._next_float = None
        return self

    def get_state(self) -> np.ndarray:
        """The generator state as torch's ``get_state()`` bytes (a uint8 array of 5056 bytes)."""
        with self._lock:
            return pack_state(self._seed, self._engine, self._next_double, self._next_float)

    def set_state(self, new_state) -> "TorchGenerator":
        """Restore a state from ``get_state()`` bytes (this class's or torch's). Returns self."""
        seed, engine, next_double, next_float = unpack_state(new_state)
        with self._lock:
            self._seed = seed
            self._engine = engine
            self._next_double = next_double
            self._next_float = next_float
        return self

    def clone(self) -> "TorchGenerator":
        """An independent copy with the same state."""
        return TorchGenerator(kernel=self.kernel).set_state(self.get_state())

    def __repr__(self) -> str:
        return f"TorchGenerator(initial_seed={self._seed}, kernel={self.kernel!r})"

    # -- uniforms and the serial path ------------------------------------------------------
    def _uniform_f32(self, n: int) -> np.ndarray:
        w = self._engine.words(n)
        w &= U32(0xFFFFFF)
        u = w.astype(F32)
        u *= F32(2.0 ** -24)
        return u

    def _uniform_f64(self, n: int) -> np.ndarray:
        w = self._engine.words(2 * n).astype(U64)
        v = (w[0::2] & U64(0x1FFFFF)) << U64(32)
        v |= w[1::2]
        u = v.astype(F64)
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
            w = self._engine.words(4 * pairs).tolist()
            for p in range(pairs):
                a, b, c, d = w[4 * p:4 * p + 4]
                u1 = (((a & 0x1FFFFF) << 32) | b) * 2.0 ** -53
                u2 = (((c & 0x1FFFFF) << 32) | d) * 2.0 ** -53
                r = math.sqrt(-2.0 * math.log1p(-u2))
                theta = TWO_PI * u1
                vals.append(r * math.cos(theta))
                sample = r * math.sin(theta)
                if len(vals) < n:
                    vals.append(sample)
                else:
                    self._next_double = sample
        out = np.array(vals, dtype=F64)
        out += 0.0  # val * std + mean with std = 1, mean = 0
        return out

    # -- distributions ---------------------------------------------------------------------
    def randn(self, *shape, dtype=np.float32) -> np.ndarray:
        """``torch.randn(shape, generator=g, dtype=...)``: standard normal noise."""
        shape = shape_of(shape)
        kind, dt = resolve_dtype(dtype)
        n = math.prod(shape)
        with self._lock:
            if n < 16:
                return cast(self._normal_serial(n), kind, dt).reshape(shape)
            nb, tail = divmod(n, 16)
            if kind == "float64":
                u = self._uniform_f64(n + (16 if tail else 0))
                out = np.empty(n, F64)
                out[:16 * nb] = _box_muller_f64(u[:16 * nb].reshape(nb, 16)).reshape(-1)
                if tail:
                    out[n - 16:] = _box_muller_f64(u[n:].reshape(1, 16)).reshape(-1)
                return out.reshape(shape)
            # float uniforms are the low 24 bits of a word times 2**-24; the kernel takes the words
            if kind == "float32":
                w = self._engine.words(n + (16 if tail else 0))
                body, extra = w[:16 * nb], w[n:]  # the leftover uniforms are drawn, then overwritten
            else:  # float16 / bfloat16 draw 16 uniforms per block, then 16 for the tail
                w = self._engine.words(16 * nb + (16 if tail else 0))
                body, extra = w[:16 * nb], w[16 * nb:]
            box_muller = _KERNELS[self.kernel]
            out = np.empty(n, F32)
            box_muller(body.reshape(nb, 16), out[:16 * nb].reshape(nb, 16))
            if tail:
                out[n - 16:] = box_muller(extra.reshape(1, 16)).reshape(-1)
            return cast(out, kind, dt).reshape(shape)

    def rand(self, *shape, dtype=np.float32) -> np.ndarray:
        """``torch.rand(shape, generator=g, dtype=...)``: uniform on [0, 1)."""
        shape = shape_of(shape)
        kind, dt = resolve_dtype(dtype)
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
