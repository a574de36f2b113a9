"""Floating-point primitives the schedulers compute with, rounded as torch rounds them.

* the working dtype, chosen one way (``compute_dtype``, ``upcast``): float64 stays float64, everything
  else (float32, float16, bfloat16) is computed in float32 and returned in its own dtype by the caller;
* ``linspace_f32``/``linspace_f64`` evaluate points the way torch.linspace does, ``cumprod_f32``
  accumulates in float64 as torch's CPU cumprod does;
* float32 scalar log / exp / expm1 / sqrt rounded once from float64 (torch's are within an ulp);
* ``linear_combination``: sums of coefficient * array pairs in a fixed order (the solvers' updates);
* ``broadcast_to_ndim``: per-batch coefficients given the sample's trailing axes.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def compute_dtype(*arrays):
    """float64 if any input is float64, else float32 (float16/bfloat16 work is done in float32)."""
    return np.float64 if any(np.asarray(a).dtype == np.float64 for a in arrays) else np.float32


def upcast(x: np.ndarray) -> np.ndarray:
    """``x`` in its working dtype (``compute_dtype``): float64 stays, everything else float32; no copy if already so."""
    return x.astype(compute_dtype(x), copy=False)


def broadcast_to_ndim(values, ndim: int) -> np.ndarray:
    """``values`` flattened, then given trailing axes of size 1 up to ``ndim`` (per-batch coefficients)."""
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * max(ndim - 1, 0))


def linspace_f32(start, end, num: int) -> np.ndarray:
    """``num`` float32 points from ``start`` to ``end``, rounded as torch.linspace(dtype=float32) rounds them.

    torch computes step = (end - start) / (num - 1) in float32, then point i as start + step * i in
    the first half and end - step * (num - 1 - i) in the second, each with one rounding (fused
    multiply-add). The float64 evaluation below rounds once in the same way.
    """
    num = int(num)
    start32, end32 = np.float32(start), np.float32(end)
    if num <= 1:
        return np.full(max(num, 0), start32, dtype=np.float32)
    step = np.float32((end32 - start32) / np.float32(num - 1))
    i = np.arange(num)
    from_start = np.float64(start32) + np.float64(step) * i
    from_end = np.float64(end32) - np.float64(step) * (num - 1 - i)
    return np.where(i < num // 2, from_start, from_end).astype(np.float32)


def cumprod_f32(values) -> np.ndarray:
    """Cumulative product of a float32 array, accumulated in float64 like torch.cumprod on the CPU."""
    return np.cumprod(np.asarray(values, dtype=np.float64)).astype(np.float32)



def log_f32(x) -> np.float32:
    """log of a float32 scalar, rounded once to float32 (torch's float32 log is within an ulp of this)."""
    return np.float32(np.log(np.float64(x)))


def exp_f32(x) -> np.float32:
    """exp of a float32 scalar, rounded once to float32."""
    return np.float32(np.exp(np.float64(x)))


def expm1_f32(x) -> np.float32:
    """exp(x) - 1 of a float32 scalar without cancellation, rounded once to float32."""
    return np.float32(np.expm1(np.float64(x)))


def sqrt_f32(x) -> np.float32:
    """sqrt of a float32 scalar, correctly rounded to float32."""
    return np.float32(np.sqrt(np.float64(x)))


def linear_combination(*terms):
    """sum_i c_i * x_i over (c_i, x_i) pairs, accumulated left to right in the arrays' dtype.

    The one place where multistep solvers combine their history: each update is a table of
    coefficients over (sample, model outputs or their differences, noise).
    """
    (c, x), *rest = terms
    total = c * x
    for c, x in rest:
        total = total + c * x
    return total



def linspace_f64(start, end, num: int) -> np.ndarray:
    """``num`` float64 points from ``start`` to ``end`` as torch.linspace(dtype=float64) gives them.

    Point i is start + step * i in the first half and end - step * (num - 1 - i) in the second, each a
    fused multiply-add (one rounding), with step = (end - start) / (num - 1); the exact rational
    arithmetic below rounds once in the same way. (numpy's linspace differs in the last bit.)
    """
    num = int(num)
    start, end = float(start), float(end)
    if num <= 1:
        return np.full(max(num, 0), start, dtype=np.float64)
    step = Fraction((end - start) / (num - 1))
    half = num // 2
    points = [
        float(Fraction(start) + step * i) if i < half else float(Fraction(end) - step * (num - 1 - i))
        for i in range(num)
    ]
    return np.array(points, dtype=np.float64)
