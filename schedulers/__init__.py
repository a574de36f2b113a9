"""Numpy schedulers with diffusers' names, configuration and interface (see DESIGN.md).

Never imports torch, diffusers or transformers.
"""

from .base import (
    FrozenDict,
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    SchedulerOutput,
    SigmaSchedulerMixin,
    UnsupportedOptionError,
    get_scheduler_class,
    register_to_config,
)
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .noise import randn_tensor
from .pndm import PNDMScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FrozenDict",
    "KarrasDiffusionSchedulers",
    "PNDMScheduler",
    "SchedulerMixin",
    "SchedulerOutput",
    "SigmaSchedulerMixin",
    "UnsupportedOptionError",
    "get_scheduler_class",
    "randn_tensor",
    "register_to_config",
]
