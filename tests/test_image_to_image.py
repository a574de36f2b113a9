"""Image-to-image parity with diffusers' StableDiffusionImg2ImgPipeline (fp32, tiny model).

Claim: same weights, image, prompt and seed (sdort's TorchGenerator against torch's CPU generator)
give images within 1e-3 max abs on the [0, 1] scale.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

TOLERANCE = 1e-3


def init_image(width=64, height=64, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def run_both(sd1, scheduler=None, seeds=(3,), **kwargs):
    import diffusers
    import torch

    import sdort.schedulers
    from sdort.runtime import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    txt2img, folder = sd1
    reference = diffusers.StableDiffusionImg2ImgPipeline(**txt2img.components)
    reference.set_progress_bar_config(disable=True)
    ours = StableDiffusionImg2ImgPipeline(**StableDiffusionPipeline.from_pretrained(folder, provider="cpu").components)
    if scheduler:
        reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
        ours.scheduler = getattr(sdort.schedulers, scheduler).from_config(ours.scheduler.config)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    expected = reference(generator=generators if len(seeds) > 1 else generators[0], output_type="np", **kwargs).images
    got = ours(generator=list(seeds) if len(seeds) > 1 else seeds[0], output_type="np", **kwargs).images
    assert got.shape == expected.shape and got.std() > 1e-3
    return got, expected


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_strength(sd1, strength):
    got, expected = run_both(sd1, prompt="a watercolor fox", image=init_image(), strength=strength,
                             num_inference_steps=10)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_euler_two_images_per_prompt_and_odd_image(sd1):
    # a 75x70 image is resized down to 72x64, as diffusers' image processor does
    got, expected = run_both(sd1, "EulerDiscreteScheduler", seeds=(5, 6), prompt="a boat", image=init_image(75, 70),
                             strength=0.6, num_inference_steps=5, num_images_per_prompt=2,
                             negative_prompt="blurry")
    assert got.shape == (2, 64, 72, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_shares_sessions_and_rejects_bad_strength(sd1):
    from sdort.runtime import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    txt2img = StableDiffusionPipeline.from_pretrained(sd1[1], provider="cpu")
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    assert img2img.unet is txt2img.unet and img2img.vae_encoder is txt2img.vae_encoder
    with pytest.raises(ValueError, match="strength"):
        img2img("a cat", image=init_image(), strength=1.5)
    with pytest.raises(ValueError, match="image"):
        img2img("a cat")
