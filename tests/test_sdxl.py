"""SDXL parity with diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline on tiny models (fp32).

Claim: with the same weights, inputs and seeds (int seeds: torch's CPU generator, which sdort
reproduces bit for bit), sdort's images equal diffusers' within 1e-3 max abs on the [0, 1] scale.
The models are built from configs (two text encoders of widths 32 and 64, `addition_embed_type=
"text_time"`), saved with `save_pretrained` and exported with sd-export.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

TOLERANCE = 1e-3
SIZE = dict(height=64, width=64)


def reference_generator(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def ours_for(cls_name, folder_or_components, scheduler=None):
    import sdort.runtime
    import sdort.schedulers

    cls = getattr(sdort.runtime, cls_name)
    pipe = (cls(**folder_or_components) if isinstance(folder_or_components, dict)
            else cls.from_pretrained(folder_or_components, provider="cpu"))
    if scheduler:
        pipe.scheduler = getattr(sdort.schedulers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_for(cls_name, reference, scheduler=None, **config):
    import diffusers

    pipe = getattr(diffusers, cls_name)(**reference.components, add_watermarker=False, **config)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= TOLERANCE


def run_txt2img(model, seed=0, scheduler=None, **kwargs):
    reference, folder = model
    ours = ours_for("StableDiffusionXLPipeline", folder, scheduler)
    ref = reference_for("StableDiffusionXLPipeline", reference, scheduler)
    kwargs = {"num_inference_steps": 4, **SIZE, **kwargs}
    got = ours(generator=seed, output_type="np", **kwargs).images
    expected = ref(generator=reference_generator(seed), output_type="np", **kwargs).images
    return got, expected


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_text_to_image(sdxl, guidance_scale):
    compare(*run_txt2img(sdxl, prompt="a red fox in the snow", guidance_scale=guidance_scale))


def test_negative_prompt_prompt_2_and_two_images_per_prompt(sdxl):
    got, expected = run_txt2img(sdxl, seed=3, prompt=["a castle", "an astronaut"], prompt_2=["at dusk", "on mars"],
                                negative_prompt=["blurry", "low quality"], negative_prompt_2="watermark",
                                num_images_per_prompt=2)
    assert got.shape == (4, 64, 64, 3)
    compare(got, expected)


def test_size_and_crop_conditioning_and_guidance_rescale(sdxl):
    # negative sizes differ from the positive ones: diffusers' text-to-image then alternates the
    # rows of add_time_ids across the batch, which sdort reproduces (two images show it)
    compare(*run_txt2img(sdxl, seed=5, prompt="a lighthouse", original_size=(1024, 768), crops_coords_top_left=(16, 32),
                         target_size=(512, 640), negative_original_size=(256, 256), negative_target_size=(128, 192),
                         negative_crops_coords_top_left=(8, 0), guidance_rescale=0.7, num_images_per_prompt=2))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip(sdxl, clip_skip):
    got, expected = run_txt2img(sdxl, prompt="a watercolor of a boat", negative_prompt="dark", clip_skip=clip_skip)
    compare(got, expected)
    plain, _ = run_txt2img(sdxl, prompt="a watercolor of a boat", negative_prompt="dark")
    assert np.abs(got - plain).max() > 1e-3  # the layer taken makes a difference


def test_prompt_embeds_given(sdxl):
    reference, folder = sdxl
    embeds = [t.detach().numpy() for t in reference.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=True,
                                                         negative_prompt="a dog")]
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    import torch

    ours = ours_for("StableDiffusionXLPipeline", folder)
    got = ours(**dict(zip(names, embeds)), generator=1, output_type="np", num_inference_steps=3, **SIZE).images
    expected = reference_for("StableDiffusionXLPipeline", reference)(
        **{k: torch.from_numpy(v) for k, v in zip(names, embeds)}, generator=reference_generator(1),
        output_type="np", num_inference_steps=3, **SIZE).images
    compare(got, expected)


def test_image_to_image_shares_components(sdxl):
    reference, folder = sdxl
    base = ours_for("StableDiffusionXLPipeline", folder)
    ours = ours_for("StableDiffusionXLImg2ImgPipeline", base.components)
    assert ours.unet is base.unet and ours.text_encoder_2 is base.text_encoder_2
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kwargs = dict(prompt="a fox", image=image, strength=0.6, num_inference_steps=5, negative_prompt="blur")
    got = ours(generator=2, output_type="np", **kwargs).images
    expected = reference_for("StableDiffusionXLImg2ImgPipeline", reference)(
        generator=reference_generator(2), output_type="np", **kwargs).images
    compare(got, expected)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DDIMScheduler"])
def test_base_to_refiner_hand_off(sdxl, sdxl_refiner, scheduler):
    """The base runs the first 80 % of the schedule and returns latents, the refiner the rest: the same
    split of the timesteps as diffusers (Heun, a second-order scheduler, is never cut mid-step)."""
    (reference, folder), (reference_refiner, refiner_folder) = sdxl, sdxl_refiner
    base = ours_for("StableDiffusionXLPipeline", folder, scheduler)
    refiner = ours_for("StableDiffusionXLImg2ImgPipeline", refiner_folder, scheduler)
    assert refiner.config["requires_aesthetics_score"] and refiner.text_encoder is None
    ref_base = reference_for("StableDiffusionXLPipeline", reference, scheduler)
    ref_refiner = reference_for("StableDiffusionXLImg2ImgPipeline", reference_refiner, scheduler,
                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    common = dict(prompt="a majestic lion", num_inference_steps=6)
    latents = base(generator=4, denoising_end=0.8, output_type="latent", **common, **SIZE).images
    expected_latents = ref_base(generator=reference_generator(4), denoising_end=0.8, output_type="latent", **common,
                                **SIZE).images
    assert np.abs(latents - expected_latents.numpy()).max() <= TOLERANCE
    got = refiner(image=latents, generator=5, denoising_start=0.8, output_type="np", **common).images
    expected = ref_refiner(image=expected_latents, generator=reference_generator(5), denoising_start=0.8,
                           output_type="np", **common).images
    compare(got, expected)


def inpaint_inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    return image, Image.fromarray(mask)


@pytest.mark.parametrize("kind", ["9-channel", "4-channel"])
def test_inpaint(sdxl_inpaint, sdxl, kind):
    reference, folder = sdxl_inpaint if kind == "9-channel" else sdxl
    ours = ours_for("StableDiffusionXLInpaintPipeline", folder if kind == "9-channel"
                    else ours_for("StableDiffusionXLPipeline", folder).components)
    image, mask = inpaint_inputs()
    kwargs = dict(prompt="a cat on a bench", image=image, mask_image=mask, num_inference_steps=5, **SIZE)
    got = ours(generator=6, output_type="np", **kwargs).images
    expected = reference_for("StableDiffusionXLInpaintPipeline", reference)(
        generator=reference_generator(6), output_type="np", **kwargs).images
    compare(got, expected)


def test_inpaint_strength_padding_crop_and_denoising_end(sdxl_inpaint):
    reference, folder = sdxl_inpaint
    ours = ours_for("StableDiffusionXLInpaintPipeline", folder)
    image, mask = inpaint_inputs(1)
    kwargs = dict(prompt="a rose", image=image, mask_image=mask, num_inference_steps=6, strength=0.7,
                  padding_mask_crop=4, denoising_end=0.9, **SIZE)
    got = np.asarray(ours(generator=7, **kwargs).images[0], np.int16)
    expected = np.asarray(reference_for("StableDiffusionXLInpaintPipeline", reference)(
        generator=reference_generator(7), **kwargs).images[0], np.int16)
    # PIL results are rounded to 1/255: values within 1e-3 may round to neighbouring levels.
    assert got.shape == expected.shape and got.std() > 1
    assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 0.01
    outside = np.asarray(image, np.int16)[np.asarray(mask) == 0]
    assert np.abs(got[np.asarray(mask) == 0] - outside).max() <= 1  # the kept region pasted back


def test_bad_input_is_named(sdxl, sdxl_refiner):
    _, folder = sdxl
    ours = ours_for("StableDiffusionXLPipeline", folder)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=np.zeros((1, 77, 96), np.float32), num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match="original_size"):
        ours("a fox", original_size=(64,), num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        ours("a fox", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["mask"], **SIZE)
    with pytest.raises(ValueError, match="clip_skip"):
        ours("a fox", clip_skip=9, num_inference_steps=2, **SIZE)
    refiner = ours_for("StableDiffusionXLImg2ImgPipeline", sdxl_refiner[1])
    refiner.config["requires_aesthetics_score"] = False
    with pytest.raises(ValueError, match="requires_aesthetics_score=True"):
        refiner("a fox", image=np.zeros((1, 4, 8, 8), np.float32), num_inference_steps=4, strength=0.5)
    with pytest.raises(ValueError, match="denoising_start"):
        ours_for("StableDiffusionXLImg2ImgPipeline", sdxl_refiner[1])(
            "a fox", image=np.zeros((1, 4, 8, 8), np.float32), denoising_start=0.9, denoising_end=0.5)


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_use(sdxl, steps):
    """SDXL-Turbo as diffusers documents it: guidance_scale=0.0 (no guidance), 1-4 steps, an Euler
    ancestral scheduler with timestep_spacing="trailing" (as sdxl-turbo's scheduler config)."""
    import diffusers

    import sdort.schedulers

    reference, folder = sdxl
    ours = ours_for("StableDiffusionXLPipeline", folder)
    ours.scheduler = sdort.schedulers.EulerAncestralDiscreteScheduler.from_config(
        ours.scheduler.config, timestep_spacing="trailing")
    ref = reference_for("StableDiffusionXLPipeline", reference)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config,
                                                                          timestep_spacing="trailing")
    kwargs = dict(prompt="a cinematic shot of a raccoon", num_inference_steps=steps, guidance_scale=0.0, **SIZE)
    compare(ours(generator=8, output_type="np", **kwargs).images,
            ref(generator=reference_generator(8), output_type="np", **kwargs).images)
