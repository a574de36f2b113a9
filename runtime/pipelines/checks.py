"""The checks every task makes on its arguments, and on what the models return.

Each error names the parameter (or the part and the step), in one message style, so that a bad
call fails before any model runs, and a broken model never gives a silent black image.
"""

from __future__ import annotations

import os

import numpy as np

OUTPUT_TYPES = ("pil", "np", "latent")


class NumericalError(FloatingPointError):
    """A model part returned NaN or infinity (float16 overflow, broken weights): never a silent black image."""


def check_finite(name: str, value) -> None:
    """A real, finite number for `name`; NaN or infinity would silently poison every pixel."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value}")


def check_finite_output(array: np.ndarray, part: str, where) -> None:
    """Refuse NaN/inf from a model part, naming the part and the step (see NumericalError).

    `where` may be a callable, so that the loop formats its step only when there is an error."""
    if not np.isfinite(array).all():
        where = where() if callable(where) else where
        raise NumericalError(f"{part} returned NaN or infinity {where}: the model overflowed (a float16 export? "
                             f"export with --dtype fp32) or its weights are broken")


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def check_generation_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type):
    """The checks every task makes, prompt or not; each error names the parameter."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{name} must be an integer (pixels); got {value!r}")
    if height is not None and width is not None and (height % 8 != 0 or width % 8 != 0):
        raise ValueError(f"height and width must be multiples of 8; got height={height}, width={width}")
    if height is not None and width is not None and (height <= 0 or width <= 0):
        raise ValueError(f"height and width must be positive; got height={height}, width={width}")
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
    check_finite("guidance_scale", guidance_scale)
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must not be negative; got {guidance_scale}")
    if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1; got {num_images_per_prompt!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")


def check_common_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                        negative_prompt, prompt_embeds, negative_prompt_embeds, output_type):
    """The checks every text-conditioned Stable Diffusion task makes (diffusers' `check_inputs` and
    a few more); each error names the parameter. Returns the prompt batch size."""
    check_generation_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type)
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("prompt and prompt_embeds: pass one of them, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("prompt: pass a prompt (or prompt_embeds)")
    if prompt is not None and not (isinstance(prompt, str) or
                                   (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt))):
        raise ValueError(f"prompt must be a str or a list of str; got {type(prompt).__name__}")
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError("prompt: the list of prompts is empty")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("negative_prompt and negative_prompt_embeds: pass one of them, not both")
    batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else np.shape(prompt_embeds)[0]
    if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != batch:
        raise ValueError(f"negative_prompt: a list of {len(negative_prompt)} for {batch} prompt(s); the lengths must match")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if np.shape(prompt_embeds) != np.shape(negative_prompt_embeds):
            raise ValueError(f"negative_prompt_embeds: shape {np.shape(negative_prompt_embeds)} differs from "
                             f"prompt_embeds {np.shape(prompt_embeds)}")
    return batch


def check_strength(strength: float) -> None:
    check_finite("strength", strength)
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1]; got {strength}")
