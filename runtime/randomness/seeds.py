"""A pipeline's ``generator`` argument turned into generators: ``as_generator``."""

from __future__ import annotations

import numpy as np

from .philox import PhiloxGenerator
from .torch_cpu import TorchGenerator

__all__ = ["as_generator"]


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
