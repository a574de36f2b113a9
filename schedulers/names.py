"""Short scheduler names for the CLI (`sdort txt2img --scheduler dpm++2m-karras`), as users know them
from other Stable Diffusion front ends, each a diffusers class plus configuration overrides."""

from __future__ import annotations

SCHEDULER_NAMES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun-karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a-karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # diffusers' DPMSolverSDEScheduler needs torchsde's Brownian tree; the SDE variant of
    # DPM-Solver++(2M) is what sdort offers under the usual "DPM++ SDE" names.
    "dpm++sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++sde-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}),
    "dpm++2s-karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "edm-euler": ("EDMEulerScheduler", {}),
    "edm-dpm++2m": ("EDMDPMSolverMultistepScheduler", {}),
}


def scheduler_from_name(name: str, config):
    """A scheduler built from `config` (e.g. `pipe.scheduler.config`) for a short name or a class name."""
    from . import get_scheduler_class

    class_name, overrides = SCHEDULER_NAMES.get(name.lower(), (name, {}))
    try:
        cls = get_scheduler_class(class_name)
    except ValueError:
        raise ValueError(
            f"scheduler: unknown name {name!r}; use a class name or one of {', '.join(SCHEDULER_NAMES)}"
        ) from None
    return cls.from_config(config, **overrides)
