"""Random numbers that match PyTorch's generators, drawn with numpy alone.

diffusers users pin an image with a seed (``generator=torch.manual_seed(42)``); sdort reproduces
the same noise without torch. Everything random in the runtime comes from this package:

``TorchGenerator``
    PyTorch's CPU generator (``torch.Generator("cpu")``), bit-exact for ``randn`` and ``rand`` in
    float32, float64, float16 and bfloat16, with torch's ``get_state()``/``set_state()`` bytes.
``PhiloxGenerator``
    PyTorch's CUDA generator (``torch.Generator("cuda")``), computed on the CPU.
``as_generator``
    Turns a pipeline's ``generator`` argument (int seed, generator, list of them) into generators.
``randn_tensor``
    Draws a latent-shaped noise tensor from that argument, as diffusers' ``randn_tensor`` does.

The modules, one concern each:

``common.py``         what every generator shares: default seed, seed conversion, dtypes, shapes,
                      state bytes, and ``SeededGenerator`` (``seed()``, ``initial_seed()``, ``normal()``)
``mt19937.py``        the engine of torch's CPU generator, its seeding and torch's state format
``torch_cpu.py``      ``TorchGenerator``: the block, serial and float64 paths of ``torch.randn``
``avx2_kernel.py``    torch's float32 Box-Muller kernel on CPUs with AVX2
``default_kernel.py`` torch's float32 Box-Muller kernel elsewhere (scalar code with glibc's logf/sincosf)
``philox.py``         ``PhiloxGenerator`` and the Philox4x32-10 function
``seeds.py``          ``as_generator``

A new generator gets a module of its own here: a class with ``randn(*shape, dtype=...)`` (and
``rand``, ``manual_seed``, ``get_state``/``set_state`` as torch's), built on ``common.py``, exported
below and accepted by ``as_generator``.

Why ``randn_tensor`` is written in ``sdort.schedulers.noise`` and re-exported here: scheduler
steps draw noise too, and the schedulers are the lowest layer, which never imports the runtime.
They draw through a small protocol, defined there: a generator is anything with a
``randn(shape, dtype=...)`` method (both classes here), a ``numpy.random.Generator``, None, or a
list of them, one per batch item. ``randn_tensor`` is the function that dispatches on that
protocol, so it lives beside it, once; the pipelines take it from here with the rest of their
randomness, and imports still flow one way (runtime to schedulers).

dtypes are numpy dtypes (``np.float32``, ``np.float64``, ``np.float16``) or ``ml_dtypes.bfloat16``;
ml_dtypes is imported only when bfloat16 is asked for. This package never imports torch.
"""

from ...schedulers.noise import randn_tensor
from .common import DEFAULT_SEED
from .mt19937 import STATE_SIZE
from .philox import PhiloxGenerator, philox4x32_10
from .seeds import as_generator
from .torch_cpu import TorchGenerator, cpu_kernel

__all__ = [
    "DEFAULT_SEED",
    "STATE_SIZE",
    "PhiloxGenerator",
    "TorchGenerator",
    "as_generator",
    "cpu_kernel",
    "philox4x32_10",
    "randn_tensor",
]
