"""How the denoising loop combines the UNet batch's predictions into one: classifier-free guidance,
and the protocol a pipeline with another combination follows (Safe Latent Diffusion, ...).

A guidance object says how many copies of the latents the UNet batch holds (`copies`: the
unconditional and conditional halves for classifier-free guidance) and combines the UNet's output
for that batch into one prediction per image (`combine`); it may keep state across steps.
"""

from __future__ import annotations

import numpy as np


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Rescale guided noise towards the text prediction's std (Lin et al. 2023, §3.4), as diffusers does."""
    axes = tuple(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


class ClassifierFreeGuidance:
    """uncond + g · (text − uncond) over a [uncond; text] batch, then diffusers' optional rescale."""

    copies = 2

    def __init__(self, guidance_scale: float, guidance_rescale: float = 0.0):
        self.guidance_scale = np.float32(guidance_scale)
        self.guidance_rescale = guidance_rescale

    def combine(self, i: int, t, noise_pred: np.ndarray) -> np.ndarray:
        # in place in the text half: the same float32 operations in the same order as diffusers,
        # without three temporaries per step
        noise_uncond, noise_text = np.split(noise_pred, 2)
        text = noise_text.copy() if self.guidance_rescale > 0 else None
        np.subtract(noise_text, noise_uncond, out=noise_text)
        noise_text *= self.guidance_scale
        noise_text += noise_uncond
        if self.guidance_rescale > 0:
            return rescale_noise_cfg(noise_text, text, self.guidance_rescale)
        return noise_text
