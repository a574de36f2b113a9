"""Numpy schedulers with diffusers' names, configuration and interface (see docs/architecture.md).

Never imports torch, diffusers or transformers.
"""

from .base import (
    FrozenDict,
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    SchedulerOutput,
    get_scheduler_class,
    register_to_config,
)
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .k_diffusion import SigmaSchedulerMixin
from .kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .names import SCHEDULER_NAMES, scheduler_from_name
from .noise import randn_tensor
from .options import UnsupportedOptionError
from .pndm import PNDMScheduler
from .tcd import TCDScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FrozenDict",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KarrasDiffusionSchedulers",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SCHEDULER_NAMES",
    "SchedulerMixin",
    "SchedulerOutput",
    "SigmaSchedulerMixin",
    "TCDScheduler",
    "UniPCMultistepScheduler",
    "UnsupportedOptionError",
    "get_scheduler_class",
    "randn_tensor",
    "register_to_config",
    "scheduler_from_name",
]
