"""Helpers shared by the step-by-step scheduler comparisons with diffusers."""

from __future__ import annotations

import inspect

import numpy as np
import torch


class TorchDraws:
    """An sdort generator (``randn(shape, dtype)``) replaying the draws of a seeded torch.Generator,
    so that both schedulers see identical noise; `shapes` records what was drawn."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.shapes = []

    def randn(self, shape, dtype=np.float32):
        self.shapes.append(tuple(shape))
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).numpy().astype(dtype)


def accepted(fn, kwargs: dict) -> dict:
    """The subset of `kwargs` that `fn` takes (diffusers' schedulers differ in their step arguments)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}
