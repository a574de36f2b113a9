"""diffusers' older per-step callback, `callback(step, timestep, latents)` every `callback_steps`
steps, as an `after_step` hook of the denoising loop (the pipelines that still take it: image
variation, Safe SD, the x4 and latent x2 upscalers)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def check_callback_steps(callback_steps) -> None:
    if isinstance(callback_steps, bool) or not isinstance(callback_steps, (int, np.integer)) or callback_steps <= 0:
        raise ValueError(f"callback_steps must be a positive integer; got {callback_steps!r}")


def legacy_callback(callback: Callable | None, callback_steps: int, timesteps, num_inference_steps: int,
                    order: int, warmup: int | None = None) -> Callable | None:
    """The loop's `after_step` that calls `callback` where diffusers does: when its progress bar
    advances (the last step, or after the warm-up steps every `order` steps) and the step index is a
    multiple of `callback_steps`, with the step counted in scheduler orders.

    `warmup`: diffusers' `num_warmup_steps`, len(timesteps) - num_inference_steps * order by default
    (the latent upscaler fixes it at 0)."""
    if callback is None:
        return None
    count = len(timesteps)
    warmup = count - num_inference_steps * order if warmup is None else warmup

    def after_step(i, t, latents):
        if (i == count - 1 or (i + 1 > warmup and (i + 1) % order == 0)) and i % callback_steps == 0:
            callback(i // order, t, latents)
        return latents

    return after_step
