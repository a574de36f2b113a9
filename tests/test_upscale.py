"""Parity with diffusers' StableDiffusionUpscalePipeline (x4), StableDiffusionLatentUpscalePipeline (x2)
and AutoencoderKL's tiling and slicing, on tiny models (fp32).

Claim: with the same weights, inputs and seeds (int seeds: torch's CPU generator, which sdort
reproduces bit for bit), sdort's images equal diffusers' within 1e-3 max abs on the [0, 1] scale,
also with VAE tiling on over inputs that take several tiles. The models are the tiny-upscale and
tiny-latent-upscale presets' configs and weights, built in diffusers, saved with `save_pretrained`
and exported with sd-export from that folder (`upscale_support.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from upscale_support import build_latent_upscale_model, build_upscale_model, preset_components

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    return build_upscale_model(tmp_path_factory.mktemp("x4"))


@pytest.fixture(scope="module")
def x2(tmp_path_factory):
    return build_latent_upscale_model(tmp_path_factory.mktemp("x2"))


def reference_generator(seed):
    return torch.Generator().manual_seed(seed)


def picture(size: int, seed: int = 0) -> Image.Image:
    """A smooth RGB picture (gradients and a few waves), not white noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * (x + y) + seed)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def ours_for(cls_name, folder, scheduler=None):
    import sdort.runtime
    import sdort.schedulers

    pipe = getattr(sdort.runtime, cls_name).from_pretrained(folder, provider="cpu")
    if scheduler:
        pipe.scheduler = getattr(sdort.schedulers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_for(reference, scheduler=None):
    pipe = type(reference)(**reference.components)  # the same modules, a scheduler of its own
    if scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= TOLERANCE


# ---- x4 upscaler -----------------------------------------------------------------------------

def run_x4(model, seed=0, scheduler=None, tiling=False, slicing=False, **kwargs):
    reference, folder = model
    ours, ref = ours_for("StableDiffusionUpscalePipeline", folder, scheduler), reference_for(reference, scheduler)
    if tiling:
        ours.enable_vae_tiling()
        ref.vae.enable_tiling()
    if slicing:
        ours.enable_vae_slicing()
        ref.vae.enable_slicing()
    kwargs = {"num_inference_steps": 3, "image": picture(16), **kwargs}
    try:
        got = ours(generator=seed, output_type="np", **kwargs).images
        expected = ref(generator=reference_generator(seed), output_type="np", **kwargs).images
    finally:  # the switches live on the module's shared diffusers VAE
        ref.vae.disable_tiling()
        ref.vae.disable_slicing()
    return got, expected


@pytest.mark.parametrize("scheduler", [None, "EulerDiscreteScheduler"])  # None: the preset's DDIM (v-prediction)
def test_upscale_matches_diffusers(x4, scheduler):
    got, expected = run_x4(x4, scheduler=scheduler, prompt="a red fox", negative_prompt="blurry", noise_level=40)
    assert got.shape == (1, 64, 64, 3)  # four times the 16 px input
    compare(got, expected)


def test_upscale_two_prompts_two_images_each_without_guidance(x4):
    # images tiled a, b, a, b against prompts a, a, b, b: diffusers' order, kept as it is
    got, expected = run_x4(x4, seed=5, prompt=["a cat", "a boat"], image=[picture(16, 1), picture(16, 2)],
                           num_images_per_prompt=2, guidance_scale=1.0, noise_level=0)
    assert got.shape == (4, 64, 64, 3)
    compare(got, expected)


def test_upscale_noise_level_changes_the_image(x4):
    reference, folder = x4
    ours = ours_for("StableDiffusionUpscalePipeline", folder)
    low, high = (ours("a fox", image=picture(16), num_inference_steps=2, noise_level=level, generator=1,
                      output_type="np").images for level in (0, 300))
    assert np.abs(low - high).max() > 10 * TOLERANCE  # class_labels reach the UNet


def test_upscale_with_vae_tiling_and_slicing_over_several_tiles(x4):
    # a 24 px input: 24x24 latents, tiles of 8 latents (the VAE's sample_size 32 / 4) every 6:
    # 4 x 4 tiles, each blended with its neighbours; two images, decoded one at a time
    got, expected = run_x4(x4, seed=2, tiling=True, slicing=True, prompt="a lighthouse", image=picture(24, 3),
                           num_images_per_prompt=2)
    assert got.shape == (2, 96, 96, 3)
    compare(got, expected)
    untiled, _ = run_x4(x4, seed=2, prompt="a lighthouse", image=picture(24, 3), num_images_per_prompt=2)
    assert np.abs(got - untiled).max() > 10 * TOLERANCE  # the tiles were blended, not one decode


def test_upscale_callback_steps_as_diffusers(x4):
    reference, folder = x4
    ours = ours_for("StableDiffusionUpscalePipeline", folder)
    seen, expected = [], []
    ours("a fox", image=picture(16), num_inference_steps=4, generator=0, output_type="latent",
         callback=lambda i, t, latents: seen.append((i, int(t))), callback_steps=2)
    reference_for(reference)("a fox", image=picture(16), num_inference_steps=4, generator=reference_generator(0),
                             output_type="latent", callback=lambda i, t, latents: expected.append((i, int(t))),
                             callback_steps=2)
    assert seen == expected and len(seen) == 2


@pytest.mark.parametrize("kwargs, word", [
    ({"noise_level": 351}, "noise_level"),
    ({"noise_level": -1}, "noise_level"),
    ({"noise_level": 2.5}, "noise_level"),
    ({"image": [picture(16), picture(16)]}, "image"),
    ({"image": None}, "image"),
    ({"callback_steps": 0}, "callback_steps"),
])
def test_upscale_bad_input_names_the_parameter(x4, kwargs, word):
    ours = ours_for("StableDiffusionUpscalePipeline", x4[1])
    with pytest.raises(ValueError, match=word):
        ours(**{"prompt": "a fox", "image": picture(16), "num_inference_steps": 2, **kwargs})


# ---- latent x2 upscaler ----------------------------------------------------------------------

def run_x2(model, seed=0, tiling=False, image=None, reference_image=None, **kwargs):
    reference, folder = model
    ours, ref = ours_for("StableDiffusionLatentUpscalePipeline", folder), reference_for(reference)
    if tiling:
        ours.enable_vae_tiling()
        ref.vae.enable_tiling()
    kwargs = {"num_inference_steps": 3, **kwargs}
    got = ours(image=image, generator=seed, output_type="np", **kwargs).images
    try:
        expected = ref(image=image if reference_image is None else reference_image,
                       generator=reference_generator(seed), output_type="np", **kwargs).images
    finally:  # the switch lives on the module's shared diffusers VAE
        ref.vae.disable_tiling()
    return got, expected


def test_latent_upscale_of_an_image_matches_diffusers(x2):
    got, expected = run_x2(x2, image=picture(64), prompt="a red fox", negative_prompt="blurry")
    assert got.shape == (1, 128, 128, 3)
    compare(got, expected)


def test_latent_upscale_of_latents_without_guidance(x2):
    # the chained use diffusers documents: another pipeline's output_type="latent", guidance_scale=0
    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    got, expected = run_x2(x2, seed=3, image=latents, reference_image=torch.from_numpy(latents),
                           prompt=["a cat", "a boat"], guidance_scale=0)
    assert got.shape == (2, 128, 128, 3)
    compare(got, expected)


def test_latent_upscale_with_vae_tiling_encodes_and_decodes_in_tiles(x2):
    # a 96 px image: encoded in 2 x 2 tiles of 64 px (the VAE's sample_size), every 48; its 12x12
    # latents upscale to 24x24, decoded in 4 x 4 tiles of 8 latents every 6
    got, expected = run_x2(x2, seed=1, tiling=True, image=picture(96, 5), prompt="a garden")
    assert got.shape == (1, 192, 192, 3)
    compare(got, expected)
    untiled, _ = run_x2(x2, seed=1, image=picture(96, 5), prompt="a garden")
    assert np.abs(got - untiled).max() > 10 * TOLERANCE


@pytest.mark.parametrize("kwargs, word", [
    ({"image": picture(48)}, "image"),  # 6x6 latents -> 12x12: the k-diffusion UNet takes multiples of 8
    ({"prompt": ["a", "b"]}, "image"),
    ({"prompt": None, "prompt_embeds": np.zeros((1, 77, 32), np.float32)}, "pooled_prompt_embeds"),
])
def test_latent_upscale_bad_input_names_the_parameter(x2, kwargs, word):
    ours = ours_for("StableDiffusionLatentUpscalePipeline", x2[1])
    with pytest.raises(ValueError, match=word):
        ours(**{"prompt": "a fox", "image": picture(64), "num_inference_steps": 2, **kwargs})


# ---- tiling in an ordinary pipeline ------------------------------------------------------------

def test_image_to_image_with_vae_tiling_matches_diffusers(sd1):
    # the tiny SD model's VAE has sample_size 64: a 128 px image is encoded in 3 x 3 tiles and its
    # 16x16 latents decoded in 3 x 3 tiles, through the same ONNX parts as every pipeline
    import diffusers

    reference, folder = sd1
    ours = ours_for("StableDiffusionImg2ImgPipeline", folder)
    ref = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    ref.set_progress_bar_config(disable=True)
    ours.vae.enable_tiling()
    ref.vae.enable_tiling()  # on the session's shared diffusers VAE: switched off again below
    try:
        kwargs = dict(prompt="a harbour", image=picture(128, 7), num_inference_steps=4, strength=0.7)
        got = ours(generator=0, output_type="np", **kwargs).images
        expected = ref(generator=reference_generator(0), output_type="np", **kwargs).images
    finally:
        ref.vae.disable_tiling()
    compare(got, expected)


# ---- presets and the command line ------------------------------------------------------------

def sdort(*args):
    return subprocess.run([sys.executable, "-m", "sdort.runtime.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.parametrize("preset, command, diffusers_class, size, extra", [
    ("tiny-upscale", "upscale", "StableDiffusionUpscalePipeline", 16, ["--noise-level", "30"]),
    ("tiny-latent-upscale", "latent-upscale", "StableDiffusionLatentUpscalePipeline", 64, []),
])
def test_preset_from_the_command_line_matches_diffusers(tmp_path, preset, command, diffusers_class, size, extra):
    import diffusers

    from sdort.export import export

    model = export(preset, tmp_path / "model", log=lambda *_: None)
    picture(size, 9).save(tmp_path / "low.png")
    out = tmp_path / "out.png"
    result = sdort(command, "--model", str(model), "a fox", "--image", str(tmp_path / "low.png"), "--steps", "2",
                   "--seed", "7", "--vae-tiling", *extra, "-o", str(out))
    assert result.returncode == 0, result.stderr
    parts, config = preset_components(preset)
    reference = getattr(diffusers, diffusers_class)(**parts, **config)
    reference.set_progress_bar_config(disable=True)
    reference.vae.enable_tiling()
    kwargs = {"noise_level": 30} if extra else {}
    expected = reference("a fox", image=picture(size, 9), num_inference_steps=2, generator=reference_generator(7),
                         output_type="np", **kwargs).images[0]
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert got.shape == expected.shape
    # the PNG holds 8-bit levels: a float difference far below 1e-3 may round to the next level
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6
    assert Image.open(out).text["pipeline"] == diffusers_class


@pytest.mark.parametrize("command, model, args, word", [
    ("upscale", "x4", ["--noise-level", "400"], "noise_level"),
    ("latent-upscale", "x2", ["--num-images", "2"], "--num-images"),
])
def test_command_line_bad_input_exits_2_with_one_line(request, tmp_path, command, model, args, word):
    folder = request.getfixturevalue(model)[1]
    picture(64).save(tmp_path / "in.png")
    result = sdort(command, "--model", str(folder), "--image", str(tmp_path / "in.png"), "--steps", "1", *args,
                   "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and word in lines[0], result.stderr
    assert not (tmp_path / "out.png").exists()
