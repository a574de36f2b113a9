"""Inpainting parity with diffusers' StableDiffusionInpaintPipeline on tiny models (fp32).

Claim: with the same weights, image, mask, prompt, initial latents and seeds, sdort's images equal
diffusers' within 1e-3 max abs on the [0, 1] scale, for a 9-channel inpainting UNet (mask and
masked-image latents as extra UNet channels) and an ordinary 4-channel UNet (known region put back
after each step), at full and partial strength, with `padding_mask_crop`, and with several images
per prompt. The seeded runs check that every random draw (VAE samples of the image and of the
masked image, initial noise, ancestral noise) happens in diffusers' order and shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import latents_for, tiny_components

TOLERANCE = 1e-3


def build_inpaint_model(folder):
    """A tiny SD1-style inpainting model: conftest's parts with a 9-channel UNet, saved and exported."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from sdort.export import export

    components = tiny_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    source = folder / "diffusers"
    StableDiffusionInpaintPipeline(**components).save_pretrained(source)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, export(str(source), folder / "onnx", log=lambda *_: None)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny reference models run in milliseconds on one thread; with two threads on a busy
    two-core machine torch's thread pool makes them tens of times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loaded(reference, folder):
    """(diffusers pipeline, sdort pipeline, folder): sessions are created once per model."""
    from sdort.runtime.pipelines.inpaint import StableDiffusionInpaintPipeline

    ours = StableDiffusionInpaintPipeline.from_pretrained(folder, provider="cpu")
    ours.set_progress_bar_config(disable=True)
    return reference, ours, folder


@pytest.fixture(scope="module")
def sd9(tmp_path_factory, one_torch_thread):
    return loaded(*build_inpaint_model(tmp_path_factory.mktemp("sd9")))


@pytest.fixture(scope="module")
def sd4(sd1):
    """conftest's ordinary 4-channel model, as diffusers' inpainting pipeline."""
    from diffusers import StableDiffusionInpaintPipeline

    reference, folder = sd1
    pipe = StableDiffusionInpaintPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return loaded(pipe, folder)


@pytest.fixture(scope="module")
def models(sd9, sd4):
    return {9: sd9, 4: sd4}


def make_image(width=64, height=64, seed=0) -> Image.Image:
    """A smooth colour image (gradients plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) + 0.05 * rng.standard_normal((height, width, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def make_mask(width=64, height=64, box=(16, 20, 44, 48)) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask)


def ours_for(model, scheduler=None):
    """A pipeline on the model's loaded sessions, with its own scheduler."""
    import sdort.schedulers
    from sdort.runtime.pipelines.inpaint import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**model[1].components)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = getattr(sdort.schedulers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def reference_for(model, scheduler=None):
    import diffusers

    reference = model[0]
    if scheduler:
        reference = type(reference)(**reference.components)
        reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
        reference.set_progress_bar_config(disable=True)
    return reference


def generators(seed, count):
    """The same seeds as sdort generators and as torch generators (one, or a list of `count`)."""
    import torch

    from sdort.runtime import TorchGenerator

    if count is None:
        return TorchGenerator(seed), torch.Generator().manual_seed(seed)
    return ([TorchGenerator(seed + i) for i in range(count)],
            [torch.Generator().manual_seed(seed + i) for i in range(count)])


def run_both(model, scheduler=None, seed=0, generator_list=None, latent_shape=None, output_type="np", **kwargs):
    import torch

    ours, reference = ours_for(model, scheduler), reference_for(model, scheduler)
    ours_kwargs, ref_kwargs = dict(kwargs), dict(kwargs)
    if latent_shape is not None:
        latents = latents_for(latent_shape, seed)
        ours_kwargs["latents"], ref_kwargs["latents"] = latents, torch.from_numpy(latents)
    if "masked_image_latents" in kwargs:
        ref_kwargs["masked_image_latents"] = torch.from_numpy(kwargs["masked_image_latents"])
    ours_kwargs["generator"], ref_kwargs["generator"] = generators(seed, generator_list)
    got = ours(output_type=output_type, **ours_kwargs).images
    expected = reference(output_type=output_type, **ref_kwargs).images
    if output_type == "pil":
        return got, expected
    assert got.shape == expected.shape and got.dtype == np.float32
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    return got, expected


@pytest.mark.parametrize("channels, strength, scheduler, explicit_latents", [
    (9, 1.0, None, True),
    (9, 1.0, "EulerAncestralDiscreteScheduler", False),
    (9, 0.3, None, False),
    (4, 1.0, None, True),
    (4, 0.3, "DDIMScheduler", False),
    (4, 0.6, "EulerAncestralDiscreteScheduler", False),
])
def test_matches_diffusers_two_images_per_prompt(models, channels, strength, scheduler, explicit_latents):
    got, expected = run_both(
        models[channels], scheduler, prompt="a red fox in the snow", image=make_image(), mask_image=make_mask(),
        strength=strength, num_inference_steps=8, num_images_per_prompt=2,
        latent_shape=(2, 4, 8, 8) if explicit_latents else None,
    )
    assert got.shape == (2, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE
    # two images per prompt are two different draws
    assert np.abs(got[0] - got[1]).max() > 1e-3


@pytest.mark.parametrize("channels", [9, 4])
def test_generator_list_batch_of_prompts_and_eta(models, channels):
    """One generator per image: image i is VAE-sampled with generator i, the latents are tiled, and
    every image's noise comes from its own generator (DDIM with eta draws in every step too)."""
    got, expected = run_both(
        models[channels], "DDIMScheduler", seed=3, generator_list=4,
        prompt=["a castle", "a boat on a lake"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
        image=make_image(seed=1), mask_image=make_mask(box=(8, 8, 40, 56)), strength=0.75, eta=0.5,
        num_inference_steps=6,
    )
    assert got.shape == (4, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_numpy_inputs_sizes_and_guidance_off(sd9):
    """numpy image and mask of other sizes than the output: both are resized to height x width."""
    image = np.asarray(make_image(80, 72), np.float32) / 255
    mask = np.zeros((96, 96), np.float32)
    mask[30:70, 10:60] = 1
    got, expected = run_both(sd9, prompt="a lighthouse", image=image, mask_image=mask, height=72, width=56,
                             guidance_scale=1.0, num_inference_steps=4, strength=0.9)
    assert got.shape == (1, 72, 56, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_masked_image_latents_given(sd9):
    masked = latents_for((1, 4, 8, 8), seed=7)
    got, expected = run_both(sd9, prompt="a cat", image=make_image(), mask_image=make_mask(),
                             masked_image_latents=masked, num_inference_steps=4, latent_shape=(1, 4, 8, 8))
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("channels", [9, 4])
def test_padding_mask_crop(models, channels):
    """The masked area (plus margin) is generated at 64x64 and pasted back into the 120x96 original."""
    from sdort.runtime.image_processor import VaeImageProcessor

    image = make_image(120, 96, seed=2)
    mask = make_mask(120, 96, box=(70, 50, 100, 80))
    got, expected = run_both(models[channels], prompt="a flower", image=image, mask_image=mask, padding_mask_crop=8,
                             num_inference_steps=4, strength=0.8, num_images_per_prompt=2, output_type="pil")
    assert len(got) == 2 and all(g.size == (120, 96) and g.mode == "RGB" for g in got)
    for ours, theirs in zip(got, expected):
        ours, theirs = np.asarray(ours, np.int16), np.asarray(theirs, np.int16)
        # PIL results are rounded to 1/255: values within 1e-3 may round to neighbouring levels.
        assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01
        # outside the crop region the original is untouched
        original = np.asarray(image, np.int16)
        x1, y1, x2, y2 = VaeImageProcessor.get_crop_region(mask, 64, 64, pad=8)
        outside = np.ones(original.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(ours[outside], original[outside])
    assert np.abs(np.asarray(got[0], np.int16) - np.asarray(image, np.int16)).max() > 0  # something was painted


def test_callback_sees_mask_and_prompt_embeds_path(sd9):
    pipe = ours_for(sd9)
    embeds, negative = pipe.encode_prompt("a cat", 1, True)
    seen = []

    def callback(p, i, t, tensors):
        seen.append({k: v.shape for k, v in tensors.items()})
        return {"latents": tensors["latents"], "mask": tensors["mask"]}

    kwargs = dict(image=make_image(), mask_image=make_mask(), num_inference_steps=3, output_type="np",
                  latents=latents_for((1, 4, 8, 8)))
    a = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=1, callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=["latents", "mask", "masked_image_latents"], **kwargs).images
    b = pipe("a cat", generator=1, **kwargs).images
    np.testing.assert_array_equal(a, b)
    assert seen[0] == {"latents": (1, 4, 8, 8), "mask": (2, 1, 8, 8), "masked_image_latents": (2, 4, 8, 8)}


@pytest.mark.parametrize("channels", [9, 4])
def test_callback_replacing_the_mask_matches_diffusers(models, channels):
    """A callback that inverts the mask after each step: the next UNet calls (9 channels) or the
    known-region blend (4 channels) use the new mask, in sdort as in diffusers."""
    got, expected = run_both(models[channels], seed=4, prompt="a window", image=make_image(), mask_image=make_mask(),
                             num_inference_steps=4, callback_on_step_end=lambda p, i, t, d: {"mask": 1 - d["mask"]},
                             callback_on_step_end_tensor_inputs=["mask"])
    assert np.abs(got - expected).max() <= TOLERANCE
    plain = ours_for(models[channels])("a window", image=make_image(), mask_image=make_mask(), num_inference_steps=4,
                                      generator=generators(4, None)[0], output_type="np").images
    assert np.abs(got - plain).max() > 1e-2, "the callback's mask must change the image"


def test_shares_sessions_with_text_to_image(sd9):
    from sdort.runtime import StableDiffusionPipeline
    from sdort.runtime.pipelines.inpaint import StableDiffusionInpaintPipeline

    txt2img = StableDiffusionPipeline.from_pretrained(sd9[2], provider="cpu")
    inpaint = StableDiffusionInpaintPipeline(**txt2img.components)
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tokenizer"):
        assert getattr(inpaint, name) is getattr(txt2img, name)
    assert inpaint.unet_in_channels == 9


def test_preset_is_a_9_channel_inpainting_model():
    from sdort.export.sources import PRESETS, preset_config

    assert "tiny-inpaint" in PRESETS
    config, plain = preset_config("tiny-inpaint"), preset_config("tiny")
    assert config["unet"]["in_channels"] == 9 and config["pipeline"] == "StableDiffusionInpaintPipeline"
    assert {**config["unet"], "in_channels": 4} == plain["unet"] and config["vae"] == plain["vae"]


def _white(size=64):
    return Image.new("L", (size, size), 255)


@pytest.mark.parametrize("kwargs, name", [
    (dict(strength=1.5), "strength"),
    (dict(strength=-0.1), "strength"),
    (dict(strength=0.05), "strength"),  # int(8 * 0.05) = 0 steps left
    (dict(image=None), "image"),
    (dict(mask_image=None), "mask_image"),
    (dict(mask_image=Image.new("L", (64, 64), 0)), "mask_image"),  # all black: nothing to repaint
    (dict(mask_image=_white()), "mask_image"),  # all white: nothing kept
    (dict(mask_image=Image.new("L", (64, 64), 0), padding_mask_crop=4), "mask_image"),
    (dict(mask_image=[make_mask()] * 3, num_images_per_prompt=2), "mask_image"),
    (dict(image=[make_image()] * 3, num_images_per_prompt=2), "image"),
    (dict(masked_image_latents=np.zeros((1, 4, 4, 4), np.float32)), "masked_image_latents"),
    (dict(masked_image_latents=np.zeros((1, 3, 64, 64), np.float32)), "masked_image_latents"),
    (dict(masked_image_latents=np.zeros((3, 4, 8, 8), np.float32), num_images_per_prompt=2), "masked_image_latents"),
    (dict(image=np.zeros((64, 64, 3), np.float32), padding_mask_crop=4), "image"),
    (dict(padding_mask_crop=4, output_type="np"), "output_type"),
    (dict(padding_mask_crop=-1), "padding_mask_crop"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents"),
    (dict(height=60), "height"),
    (dict(image="picture.png"), "image"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
])
def test_bad_input_names_the_parameter(sd9, kwargs, name):
    pipe = ours_for(sd9)
    kwargs = {"prompt": "a dog", "image": make_image(), "mask_image": make_mask(), "num_inference_steps": 8,
              "output_type": "pil", **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_mask_crushed_by_resizing_is_rejected(sd9):
    """A mask whose only white pixels vanish when it is resized to the output size is all black."""
    mask = np.zeros((640, 640), np.float32)
    mask[5, 5] = 1
    with pytest.raises(ValueError, match="mask_image: mask 0 is all black"):
        ours_for(sd9)("a dog", image=make_image(), mask_image=mask, num_inference_steps=2)
