"""LDM3D parity with diffusers' StableDiffusionLDM3DPipeline on a tiny model (fp32): RGB and depth.

Claim: with the same weights, prompts and int seeds (torch's CPU generator, which sdort reproduces
bit for bit), sdort's RGB images and depth maps equal diffusers' within 1e-3 max abs on [0, 1].
The model is SD's tiny test model with an LDM3D VAE (4 image channels in and out: RGB + depth),
saved with `save_pretrained` and exported with sd-export from that folder.

diffusers 0.42.1 builds its 16-bit depth images with `Image.fromarray(HxWx1, mode="I;16")`, which
Pillow 11.3+ refuses; the "pil" references run diffusers under `_pillow_i16_compat`, which gives
that call the HxW array older Pillow read from it (the same pixels), and nothing else.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
from PIL import Image

TOLERANCE = 1e-3
SIZE = dict(height=64, width=64)
PROMPTS = ["a red fox in the snow", "a lighthouse at night"]


def build_ldm3d_model(folder):
    """Save a tiny diffusers StableDiffusionLDM3DPipeline and export it; returns (diffusers pipe, export dir)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionLDM3DPipeline

    from conftest import tiny_components
    from sdort.export import export

    components = {**tiny_components(), "image_encoder": None}
    torch.manual_seed(11)
    components["vae"] = AutoencoderKL(
        block_out_channels=[32, 32, 32, 32], in_channels=4, out_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64,
    )
    source = folder / "diffusers"
    StableDiffusionLDM3DPipeline(**components).save_pretrained(source)
    pipe = StableDiffusionLDM3DPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, export(str(source), folder / "onnx", log=lambda *_: None)


@pytest.fixture(scope="module")
def ldm3d(tmp_path_factory):
    return build_ldm3d_model(tmp_path_factory.mktemp("ldm3d"))


@pytest.fixture(scope="module")
def ldm3d_preset(tmp_path_factory):
    """The `tiny-ldm3d` preset exported by the `sd-export` code path."""
    from sdort.export import export

    return export("tiny-ldm3d", tmp_path_factory.mktemp("tiny-ldm3d") / "model", log=lambda *_: None)


@contextlib.contextmanager
def _pillow_i16_compat():
    """Let diffusers' `Image.fromarray(depth[H, W, 1], mode="I;16")` build the image Pillow < 11.3 built."""
    original = Image.fromarray

    def fromarray(obj, mode=None):
        if mode == "I;16" and isinstance(obj, np.ndarray) and obj.ndim == 3 and obj.shape[-1] == 1:
            return original(np.ascontiguousarray(obj[..., 0]))
        return original(obj) if mode is None else original(obj, mode)

    Image.fromarray = fromarray
    try:
        yield
    finally:
        Image.fromarray = original


def ours_for(folder, scheduler=None):
    import sdort.schedulers
    from sdort.runtime import StableDiffusionLDM3DPipeline

    pipe = StableDiffusionLDM3DPipeline.from_pretrained(folder, provider="cpu")
    if scheduler:
        pipe.scheduler = getattr(sdort.schedulers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_for(reference, scheduler=None):
    import diffusers

    pipe = diffusers.StableDiffusionLDM3DPipeline(**reference.components)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_generator(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def run_both(model, seed=0, scheduler=None, output_type="np", **kwargs):
    reference, folder = model
    kwargs = {"num_inference_steps": 4, **SIZE, **kwargs}
    got = ours_for(folder, scheduler)(generator=seed, output_type=output_type, **kwargs)
    with _pillow_i16_compat():
        expected = reference_for(reference, scheduler)(generator=reference_generator(seed), output_type=output_type,
                                                       **kwargs)
    return got, expected


def compare(got, expected, tolerance=TOLERANCE):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= tolerance


# PNDM (the model's own, no noise in its steps), DDIM with eta (noise drawn from the generator in
# every step) and Euler ancestral (sigma-space, noise in every step).
@pytest.mark.parametrize("scheduler, extra", [
    (None, {}),
    ("DDIMScheduler", {"eta": 0.5}),
    ("EulerAncestralDiscreteScheduler", {}),
])
def test_rgb_and_depth_two_prompts_two_images_each(ldm3d, scheduler, extra):
    got, expected = run_both(ldm3d, seed=3, scheduler=scheduler, prompt=PROMPTS, negative_prompt=["blurry", "dark"],
                             num_images_per_prompt=2, **extra)
    assert got.rgb.shape == (4, 64, 64, 3) and got.depth.shape == (4, 64, 64, 1)
    assert got.rgb.dtype == np.float32 and got.depth.dtype == np.float32
    assert got.nsfw_content_detected is None and expected.nsfw_content_detected is None
    compare(got.rgb, expected.rgb)
    compare(got.depth, expected.depth)


def test_pil_rgb_and_16_bit_depth(ldm3d):
    got, expected = run_both(ldm3d, seed=5, output_type="pil", prompt=PROMPTS[0], num_images_per_prompt=2)
    assert len(got.rgb) == len(got.depth) == 2
    for rgb, depth, ref_rgb, ref_depth in zip(got.rgb, got.depth, expected.rgb, expected.depth):
        assert (rgb.mode, rgb.size) == ("RGB", (64, 64)) and (depth.mode, depth.size) == ("I;16", (64, 64))
        assert (ref_rgb.mode, ref_depth.mode) == ("RGB", "I;16")
        # 8 bits rounded and 16 bits truncated from values within 1e-3: one quantisation step more
        compare(np.asarray(rgb) / 255, np.asarray(ref_rgb) / 255, TOLERANCE + 1 / 255)
        compare(np.asarray(depth) / 65535, np.asarray(ref_depth) / 65535, TOLERANCE + 1 / 65535)


def test_no_guidance_latents_and_tuple_output(ldm3d):
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)
    reference, folder = ldm3d
    import torch

    got = ours_for(folder)("a boat", guidance_scale=1.0, latents=latents, num_inference_steps=3, output_type="np",
                           return_dict=False, **SIZE)
    expected = reference_for(reference)("a boat", guidance_scale=1.0, latents=torch.from_numpy(latents),
                                        num_inference_steps=3, output_type="np", return_dict=False, **SIZE)
    (rgb, depth), flags = got
    assert flags is None
    compare(rgb, expected[0][0])
    compare(depth, expected[0][1])


def test_defaults_are_diffusers():
    import inspect

    import diffusers

    from sdort.runtime import StableDiffusionLDM3DPipeline

    ours = inspect.signature(StableDiffusionLDM3DPipeline.__call__).parameters
    theirs = inspect.signature(diffusers.StableDiffusionLDM3DPipeline.__call__).parameters
    for name in ("num_inference_steps", "guidance_scale", "output_type", "eta", "guidance_rescale",
                 "num_images_per_prompt", "clip_skip"):
        assert ours[name].default == theirs[name].default, name


def test_preset_exports_and_matches_diffusers(ldm3d_preset):
    """The tiny-ldm3d preset's export runs and equals diffusers on the preset's own torch modules."""
    import diffusers
    from transformers import CLIPTokenizer

    from sdort.export.sources import build_preset

    index = (ldm3d_preset / "model_index.json").read_text()
    assert '"StableDiffusionLDM3DPipeline"' in index
    source = build_preset("tiny-ldm3d")
    tokenizer = CLIPTokenizer.from_pretrained(ldm3d_preset / "tokenizer")
    scheduler = diffusers.PNDMScheduler.from_pretrained(ldm3d_preset / "scheduler")
    reference = diffusers.StableDiffusionLDM3DPipeline(
        vae=source.modules["vae"], text_encoder=source.modules["text_encoder"], tokenizer=tokenizer,
        unet=source.modules["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    got, expected = run_both((reference, ldm3d_preset), seed=1, prompt="a fox", num_inference_steps=3)
    compare(got.rgb, expected.rgb)
    compare(got.depth, expected.depth)


# ---- the image processor -------------------------------------------------------------------------


def test_processor_matches_diffusers_on_a_4_channel_decode():
    import torch
    from diffusers.image_processor import VaeImageProcessorLDM3D as Reference

    from sdort.runtime import VaeImageProcessorLDM3D

    decoded = np.random.default_rng(0).uniform(-1.2, 1.2, (2, 4, 16, 24)).astype(np.float32)
    ours, theirs = VaeImageProcessorLDM3D(), Reference()
    rgb, depth = ours.postprocess(decoded, output_type="np")
    ref_rgb, ref_depth = theirs.postprocess(torch.from_numpy(decoded), output_type="np")
    np.testing.assert_array_equal(rgb, ref_rgb)
    np.testing.assert_array_equal(depth, ref_depth)
    rgb, depth = ours.postprocess(decoded, output_type="pil", do_denormalize=[True, False])
    with _pillow_i16_compat():
        ref_rgb, ref_depth = theirs.postprocess(torch.from_numpy(decoded), output_type="pil",
                                                do_denormalize=[True, False])
    for a, b in zip(rgb + depth, ref_rgb + ref_depth):
        assert a.mode == b.mode and a.size == b.size
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_processor_6_channel_rgb_like_depth():
    """Depth in two 8-bit channels (high byte, low byte): 16-bit G * 256 + B, worked out by hand."""
    from sdort.runtime import VaeImageProcessorLDM3D

    # values in [0, 1] whose 8-bit roundings are exact: channel 4 = 3 (high), channel 5 = 200 (low)
    decoded01 = np.zeros((1, 6, 2, 2), np.float32)
    decoded01[:, 4], decoded01[:, 5] = 3 / 255, 200 / 255
    rgb, depth = VaeImageProcessorLDM3D().postprocess(decoded01 * 2 - 1, output_type="pil")
    assert depth[0].mode == "I;16"
    np.testing.assert_array_equal(np.asarray(depth[0]), np.full((2, 2), 3 * 256 + 200))
    _, depth = VaeImageProcessorLDM3D().postprocess(decoded01 * 2 - 1, output_type="np")
    np.testing.assert_allclose(depth, np.full((1, 2, 2, 1), (3 * 256 + 200) / 65535), rtol=1e-6)


def test_processor_refusals():
    from sdort.runtime import VaeImageProcessorLDM3D

    with pytest.raises(ValueError, match="has 3"):
        VaeImageProcessorLDM3D().postprocess(np.zeros((1, 3, 8, 8), np.float32), output_type="np")
    with pytest.raises(ValueError, match="output_type"):
        VaeImageProcessorLDM3D().postprocess(np.zeros((1, 4, 8, 8), np.float32), output_type="latent")


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_output_types_diffusers_cannot_give_are_refused(ldm3d, output_type):
    with pytest.raises(ValueError, match="output_type"):
        ours_for(ldm3d[1])("a fox", output_type=output_type, num_inference_steps=2, **SIZE)


def test_a_plain_sd_vae_is_refused(ldm3d):
    pipe = ours_for(ldm3d[1])
    config = {**pipe.vae_decoder.config, "out_channels": 3}
    from sdort.runtime import StableDiffusionLDM3DPipeline

    plain = StableDiffusionLDM3DPipeline(**{**pipe.components, "vae_decoder": types.SimpleNamespace(
        config=config, outputs=pipe.vae_decoder.outputs)})
    with pytest.raises(ValueError, match="'vae_decoder'.*3 channels"):
        plain("a fox", num_inference_steps=2, **SIZE)


# ---- the command line ----------------------------------------------------------------------------


def test_cli_writes_rgb_and_16_bit_depth(ldm3d_preset, tmp_path, capsys):
    from sdort.runtime import StableDiffusionLDM3DPipeline
    from sdort.runtime.cli import main

    out = tmp_path / "out.png"
    assert main(["txt2img", "--model", str(ldm3d_preset), "a fox", "--steps", "2", "--seed", "4",
                 "--num-images", "2", "-o", str(out)]) == 0
    names = ["out-1.png", "out-1-depth.png", "out-2.png", "out-2-depth.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert capsys.readouterr().out.split() == [str(tmp_path / n) for n in names]
    pipe = StableDiffusionLDM3DPipeline.from_pretrained(ldm3d_preset, provider="cpu")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a fox", num_inference_steps=2, generator=4, num_images_per_prompt=2)
    for i in range(2):
        with Image.open(tmp_path / f"out-{i + 1}.png") as rgb, Image.open(tmp_path / f"out-{i + 1}-depth.png") as depth:
            assert rgb.mode == "RGB" and depth.mode.startswith("I;16")  # a 16-bit grey PNG
            assert rgb.text["pipeline"] == depth.text["pipeline"] == "StableDiffusionLDM3DPipeline"
            assert rgb.text["seed"] == "4" and rgb.text["guidance"] == "5.0"
            np.testing.assert_array_equal(np.asarray(rgb), np.asarray(expected.rgb[i]))
            np.testing.assert_array_equal(np.asarray(depth), np.asarray(expected.depth[i]))


def test_cli_one_image(ldm3d_preset, tmp_path):
    from sdort.runtime.cli import main

    assert main(["txt2img", "--model", str(ldm3d_preset), "a fox", "--steps", "1", "--seed", "0",
                 "-o", str(tmp_path / "fox.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-depth.png", "fox.png"]


@pytest.fixture(scope="module")
def checked_ldm3d(tmp_path_factory):
    """The tiny LDM3D model with diffusers' safety checker (test_safety's tiny one), saved and exported."""
    from diffusers import StableDiffusionLDM3DPipeline

    from test_safety import clip_feature_extractor, tiny_safety_checker

    folder = tmp_path_factory.mktemp("checked_ldm3d")
    reference, _ = build_ldm3d_model(folder / "plain")
    components = {**reference.components, "safety_checker": tiny_safety_checker(thresholds=CHECKED_THRESHOLDS),
                  "feature_extractor": clip_feature_extractor(), "requires_safety_checker": True}
    StableDiffusionLDM3DPipeline(**components).save_pretrained(folder / "diffusers")
    pipe = StableDiffusionLDM3DPipeline.from_pretrained(folder / "diffusers")
    pipe.set_progress_bar_config(disable=True)
    from sdort.export import export

    return pipe, export(str(folder / "diffusers"), folder / "onnx", log=lambda *_: None)


# concept / special-care thresholds of the tiny checker, set between the scores of these seeds' RGB
# images so that some are flagged and some not
CHECKED_THRESHOLDS = (0.6435, 0.6)  # concept scores of seeds 0-3: 0.6461, 0.6410, 0.6385, 0.6428


def test_safety_checker_looks_at_the_rgb_images(checked_ldm3d):
    """As diffusers' LDM3D: the checker sees the RGB half of the decode; a flagged image's RGB and
    depth both come out black, the others equal diffusers'."""
    flags = []
    for seed in range(4):
        got, expected = run_both(checked_ldm3d, seed=seed, prompt=PROMPTS[0])
        assert got.nsfw_content_detected == list(expected.nsfw_content_detected)
        flags += got.nsfw_content_detected
        for mine, theirs in ((got.rgb, expected.rgb), (got.depth, expected.depth)):
            assert np.abs(np.asarray(mine, np.float64) - np.asarray(theirs, np.float64)).max() <= TOLERANCE
        if got.nsfw_content_detected[0]:
            assert not got.rgb.any() and not got.depth.any()
    assert any(flags) and not all(flags), f"the thresholds should flag some of these images: {flags}"
