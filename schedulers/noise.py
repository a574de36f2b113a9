"""Drawing Gaussian noise from the `generator` argument, as diffusers' `randn_tensor` does.

This module is the generator protocol the schedulers draw noise through. A generator is anything
with a ``randn(shape, dtype=...)`` method (``NoiseGenerator``: sdort's torch-compatible generators
in ``sdort.runtime.randomness``), a ``numpy.random.Generator``, a list of either (one per batch
item), or None. Integers are turned into generators by the runtime before they reach this module.
``randn_tensor`` is written here once, below the runtime, which re-exports it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class NoiseGenerator(Protocol):
    """A generator of the protocol besides numpy's: ``randn(shape, dtype=...)`` returns an array."""

    def randn(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray: ...


def _draw(shape, generator, dtype):
    if generator is None:
        generator = np.random.default_rng()
    if hasattr(generator, "randn"):
        return np.asarray(generator.randn(tuple(shape), dtype=dtype))
    if isinstance(generator, np.random.Generator):
        # numpy draws only float32/float64 normals; other dtypes are rounded from float32.
        draw_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        return generator.standard_normal(tuple(shape), dtype=draw_dtype).astype(dtype, copy=False)
    raise TypeError(
        f"generator must be an int seed, a numpy.random.Generator, an sdort generator or a list of them; "
        f"got {type(generator).__name__}"
    )


def randn_tensor(shape, generator: NoiseGenerator | np.random.Generator | list | tuple | None = None,
                 dtype=np.float32) -> np.ndarray:
    """Standard normal noise of `shape`; matches diffusers.utils.torch_utils.randn_tensor.

    With a list of generators, item ``i`` of the batch is drawn from ``generator[i]`` with
    shape ``(1, *shape[1:])``, exactly as diffusers does, so per-image seeds reproduce.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(
                    f"generator: a list of {len(generator)} generators was given for a batch of {shape[0]}"
                )
            return np.concatenate([_draw((1,) + shape[1:], g, dtype) for g in generator], axis=0)
    return _draw(shape, generator, dtype)
