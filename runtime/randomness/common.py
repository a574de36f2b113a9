"""What every generator in this package shares: torch's default seed and seed conversion, the
dtypes a draw may ask for, shapes, generator state bytes, and the methods that only restate
``manual_seed``.

A dtype is a numpy dtype (``np.float32``, ``np.float64``, ``np.float16``), ``ml_dtypes.bfloat16``
or a name such as ``"float16"`` or ``"torch.bfloat16"``; ml_dtypes is imported only when bfloat16
is asked for.
"""

from __future__ import annotations

import math
import operator
import secrets

import numpy as np

#: The seed of a freshly constructed ``torch.Generator()`` (c10's ``default_rng_seed_val``).
DEFAULT_SEED = 67280421310721

# short names for the word and float types the generators compute with
U32 = np.uint32
U64 = np.uint64
F32 = np.float32
F64 = np.float64
TWO_PI = 2.0 * math.pi


class SeededGenerator:
    """The part of torch's generator interface that follows from ``manual_seed``.

    A generator sets ``self._seed`` in its ``manual_seed(seed)``, which returns the generator, and
    defines ``randn``; this base adds ``seed()``, ``initial_seed()`` and ``normal()``.
    """

    def seed(self) -> int:
        """Re-seed from the operating system's entropy; returns the new seed (``Generator.seed``)."""
        s = secrets.randbits(64)
        self.manual_seed(s)
        return s

    def initial_seed(self) -> int:
        return self._seed

    def normal(self, *shape, dtype=np.float32) -> np.ndarray:
        """Alias of ``randn``."""
        return self.randn(*shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------

def seed_to_uint64(seed) -> int:
    """torch's ``manual_seed`` conversion: an int in [-2**63, 2**64); negatives wrap to uint64."""
    if isinstance(seed, (bool, np.bool_)):
        seed = int(seed)
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}") from None
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed {seed} is outside [-2**63, 2**64) (torch: 'Overflow when unpacking long long')")
    return seed & 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------------------
# dtypes and shapes
# ---------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    "float32": "float32", "float": "float32", "f4": "float32",
    "float64": "float64", "double": "float64", "f8": "float64",
    "float16": "float16", "half": "float16", "f2": "float16",
    "bfloat16": "bfloat16",
}


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("bfloat16 draws need the ml_dtypes package (pip install ml_dtypes)") from exc
    return np.dtype(ml_dtypes.bfloat16)


def resolve_dtype(dtype):
    """Return (kind, numpy dtype) with kind one of float32, float64, float16, bfloat16."""
    if dtype is None:
        return "float32", np.dtype(F32)
    if isinstance(dtype, str):
        name = dtype.lower().replace("torch.", "").replace("np.", "").replace("numpy.", "")
        kind = _DTYPE_NAMES.get(name)
        if kind is None:
            raise TypeError(f"unsupported dtype {dtype!r}: use float32, float64, float16 or bfloat16")
        return kind, (_bfloat16() if kind == "bfloat16" else np.dtype(kind))
    try:
        dt = np.dtype(dtype)
    except TypeError:
        name = getattr(dtype, "__name__", None) or str(dtype)
        return resolve_dtype(str(name))
    if dt.name in ("float32", "float64", "float16", "bfloat16"):
        return dt.name, dt
    raise TypeError(f"unsupported dtype {dt}: use float32, float64, float16 or ml_dtypes.bfloat16")


def shape_of(shape):
    """The shape of ``randn(*shape)``: sizes as arguments or one sequence of them."""
    if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
        shape = tuple(shape[0])
    shape = tuple(operator.index(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return shape


def cast(values: np.ndarray, kind: str, dt: np.dtype) -> np.ndarray:
    """Computed values to the requested dtype, rounding doubles as torch's Half and BFloat16 do."""
    if kind in ("float16", "bfloat16") and values.dtype == F64:
        values = values.astype(F32)  # c10::Half / c10::BFloat16 are constructed from float
    return values.astype(dt, copy=False)


# ---------------------------------------------------------------------------------------------
# generator states
# ---------------------------------------------------------------------------------------------

def as_state_bytes(new_state, size: int) -> np.ndarray:
    """A ``set_state`` argument (bytes, a uint8 array, a torch ByteTensor, a list) as ``size`` bytes."""
    if isinstance(new_state, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(new_state), dtype=np.uint8)
    else:
        arr = np.asarray(new_state)  # numpy arrays, torch ByteTensors (via __array__), lists
        if arr.dtype != np.uint8:
            if arr.dtype.kind in "iu" and arr.size and (arr.min() < 0 or arr.max() > 255):
                raise TypeError("RNG state must be a uint8 (byte) array")
            if arr.dtype.kind not in "iu" and arr.size:
                raise TypeError(f"RNG state must be a uint8 (byte) array, got {arr.dtype}")
            arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr).reshape(-1)
    if arr.size != size:
        raise ValueError(f"expected an RNG state of {size} bytes, got {arr.size}")
    return arr
