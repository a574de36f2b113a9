"""The safety checker and Safe Latent Diffusion against diffusers, on tiny models (fp32).

Claims: sdort flags the same images as diffusers' `StableDiffusionSafetyChecker` (diffusers'
PyTorch `forward`, with its rounding to 3 decimals and its special-care adjustment), returns them
black as diffusers does, and its other images equal diffusers' within 1e-3 on [0, 1]; the Safe
pipeline's safety guidance (three-way UNet batch, momentum) gives diffusers' images, flags,
`unsafe_images` and `applied_safety_concept`. The tiny checker's thresholds (`THRESHOLDS`, chosen
from its scores on these seeds, far from the rounding edge) make some images flag and some not;
the tests assert that diffusers' flags are mixed, so that the comparison proves something.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import tiny_components

TOLERANCE = 1e-3
SIZE = dict(height=64, width=64)
# concept threshold, special-care threshold of the tiny checker (all 17 / 3 alike)
THRESHOLDS = (0.6095, 0.6)


def tiny_safety_checker(seed: int = 0, thresholds=THRESHOLDS):
    """diffusers' StableDiffusionSafetyChecker with a 2-layer CLIP vision tower on 32 px inputs,
    random concept embeddings (diffusers initialises them to ones) and the given thresholds."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=4),
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(thresholds[0])
        checker.special_care_embeds_weights.fill_(thresholds[1])
    return checker


def clip_feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=32, size=32)


@pytest.fixture(scope="session")
def checked_sd(tmp_path_factory):
    """A tiny StableDiffusionPipeline with a safety checker, saved and exported; (diffusers pipe, export dir)."""
    from diffusers import StableDiffusionPipeline

    from sdort.export import export

    folder = tmp_path_factory.mktemp("checked_sd")
    components = tiny_components()
    components.update(safety_checker=tiny_safety_checker(), feature_extractor=clip_feature_extractor(),
                      requires_safety_checker=True)
    StableDiffusionPipeline(**components).save_pretrained(folder / "diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(folder / "diffusers")
    pipe.set_progress_bar_config(disable=True)
    return pipe, export(str(folder / "diffusers"), folder / "onnx", log=lambda *_: None)


def reference_generator(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def ours(cls_name, folder, **overrides):
    import sdort.runtime

    pipe = getattr(sdort.runtime, cls_name).from_pretrained(folder, provider="cpu", **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(cls_name, pipe, **overrides):
    import diffusers

    pipe = getattr(diffusers, cls_name)(**{**pipe.components, **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare_images(got, expected, flags, tolerance=TOLERANCE):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    for i, flagged in enumerate(flags):
        if flagged:
            assert not got[i].any(), f"image {i} was flagged: it must be black"
        else:
            assert got[i].std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= tolerance


# PIL images are rounded to 8 bits: floats within 1e-3 may round to neighbouring levels.
PIL_TOLERANCE = 1 / 255 + 1e-9


def as_floats(images):
    return [np.asarray(image, np.float64) / 255 for image in images]


def rgb_image(seed=0, size=64):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---- the checker on its own: the flag rule -------------------------------------------------------


@pytest.fixture(scope="session")
def checker_graph(tmp_path_factory):
    """A function (torch checker) -> its ONNX graph, exported alone with sd-export's safety_checker part."""
    from sdort.export import convert
    from sdort.export.parts import SAFETY_CHECKER
    from sdort.runtime.sessions import OnnxModel

    def export(checker, name):
        folder = tmp_path_factory.mktemp(name)
        traced = convert.trace_to_file(SAFETY_CHECKER, checker, {}, folder / "trace")
        convert.save_file(traced, folder / "safety_checker")
        return OnnxModel(folder / "safety_checker" / "model.onnx", provider="cpu")

    return export


def scores(checker, images):
    """diffusers' cosine similarities of each image to the concept and special-care embeddings."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    pixels = torch.from_numpy(np.asarray(clip_feature_extractor()(images, return_tensors="np").pixel_values))
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        return (cosine_distance(embeds, checker.concept_embeds).numpy(),
                cosine_distance(embeds, checker.special_care_embeds).numpy())


def flags_both_ways(checker, session, images):
    """(diffusers' flags, sdort's flags) for PIL `images`."""
    import torch

    from sdort.runtime.feature_extractors import CLIPImageProcessor
    from sdort.runtime.pipelines.safety_checker import check_images

    arrays = np.stack([np.asarray(image, np.float32) / 255 for image in images])
    pixels = clip_feature_extractor()(images, return_tensors="pt").pixel_values
    _, expected = checker(clip_input=pixels, images=arrays.copy())
    extractor = CLIPImageProcessor(**clip_feature_extractor().to_dict())
    with torch.no_grad():
        got = check_images(session, extractor, images, arrays)
    return expected, got


@pytest.mark.parametrize("concept_margin, special_margin, flagged", [
    (0.0003, None, False),  # 0.0003 above the threshold rounds to 0: not flagged (forward_onnx would flag)
    (0.002, None, True),
    (-0.005, None, False),
    (-0.005, 0.002, True),  # a special-care concept counts: +0.01 makes -0.005 count
    (-0.005, 0.0004, False),  # ... but 0.0004 rounds to 0 and does not count
])
def test_flag_rule(checker_graph, concept_margin, special_margin, flagged):
    """Thresholds placed at given margins below an image's similarity to concept 0 (and special-care
    concept 0); every other threshold out of reach. sdort must flag as diffusers' `forward` does."""
    import torch

    images = [rgb_image(7)]
    checker = tiny_safety_checker(thresholds=(1.0, 1.0))
    concept_cos, special_cos = scores(checker, images)
    with torch.no_grad():
        checker.concept_embeds_weights[0] = float(concept_cos[0, 0]) - concept_margin
        if special_margin is not None:
            checker.special_care_embeds_weights[0] = float(special_cos[0, 0]) - special_margin
    session = checker_graph(checker, "rule")
    expected, got = flags_both_ways(checker, session, images)
    assert expected == [flagged]
    assert got == expected
    if (concept_margin, special_margin) == (0.0003, None):
        # the graph's own flag (diffusers' forward_onnx, no rounding) differs: why sdort reads the scores
        outputs = session(clip_input=clip_feature_extractor()(images, return_tensors="np").pixel_values,
                          images=np.zeros((1, 8, 8, 3), np.float32))
        assert bool(outputs["has_nsfw_concepts"][0])


# ---- the SD pipelines ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_text_to_image_flags_and_images(checked_sd, seed):
    pipe, folder = checked_sd
    kwargs = dict(prompt=["a red fox", "a castle"], num_images_per_prompt=2, num_inference_steps=3, **SIZE)
    got = ours("StableDiffusionPipeline", folder)(generator=seed, output_type="np", **kwargs)
    expected = reference("StableDiffusionPipeline", pipe)(generator=reference_generator(seed), output_type="np",
                                                          **kwargs)
    assert got.nsfw_content_detected == expected.nsfw_content_detected
    assert True in expected.nsfw_content_detected and False in expected.nsfw_content_detected
    compare_images(got.images, expected.images, expected.nsfw_content_detected)


def test_pil_output_and_tuple(checked_sd):
    pipe, folder = checked_sd
    kwargs = dict(prompt="a red fox", num_images_per_prompt=4, num_inference_steps=2, **SIZE)
    images, flags = ours("StableDiffusionPipeline", folder)(generator=3, return_dict=False, **kwargs)
    expected = reference("StableDiffusionPipeline", pipe)(generator=reference_generator(3), **kwargs)
    assert flags == expected.nsfw_content_detected and True in flags and False in flags
    compare_images(as_floats(images), as_floats(expected.images), flags, PIL_TOLERANCE)


@pytest.mark.parametrize("task", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_image_tasks_flags_and_images(checked_sd, task):
    pipe, folder = checked_sd
    from PIL import Image

    # inpainting: all but the last column repainted (a kept half would keep every score below the
    # threshold; sdort refuses an all-white mask)
    mask = Image.fromarray(np.where(np.arange(64)[None, :] < 63, 255, 0).astype(np.uint8).repeat(64, 0))
    extra = {"mask_image": mask, "strength": 1.0} if "Inpaint" in task else {"strength": 0.9}
    kwargs = dict(prompt="a red fox", image=rgb_image(), num_images_per_prompt=4, num_inference_steps=4, **extra)
    got = ours(task, folder)(generator=2, output_type="np", **kwargs)
    expected = reference(task, pipe)(generator=reference_generator(2), output_type="np", **kwargs)
    assert got.nsfw_content_detected == expected.nsfw_content_detected
    assert True in expected.nsfw_content_detected and False in expected.nsfw_content_detected
    compare_images(got.images, expected.images, expected.nsfw_content_detected)


def test_safety_checker_none(checked_sd, caplog):
    pipe, folder = checked_sd
    with caplog.at_level(logging.WARNING, logger="sdort"):
        unchecked = ours("StableDiffusionPipeline", folder, safety_checker=None)
    assert "You have disabled the safety checker for" in caplog.text
    kwargs = dict(prompt="a red fox", num_images_per_prompt=2, num_inference_steps=2, **SIZE)
    got = unchecked(generator=0, output_type="np", **kwargs)
    expected = reference("StableDiffusionPipeline", pipe, safety_checker=None)(
        generator=reference_generator(0), output_type="np", **kwargs)
    assert got.nsfw_content_detected is None and expected.nsfw_content_detected is None
    compare_images(got.images, expected.images, [False, False])
    latents = ours("StableDiffusionPipeline", folder)(generator=0, output_type="latent", **kwargs)
    assert latents.nsfw_content_detected is None  # diffusers does not check latents


def test_export_writes_the_checker(checked_sd):
    pipe, folder = checked_sd
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["requires_safety_checker"] is True
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    source = folder.parent / "diffusers" / "feature_extractor" / "preprocessor_config.json"
    assert (folder / "feature_extractor" / "preprocessor_config.json").read_bytes() == source.read_bytes()
    from sdort.runtime.sessions import OnnxModel

    session = OnnxModel(folder / "safety_checker" / "model.onnx", provider="cpu")
    assert list(session.inputs) == ["clip_input", "images"]
    assert {"out_images", "has_nsfw_concepts"} <= set(session.outputs)


def test_no_safety_checker_export(checked_sd, tmp_path):
    from sdort.export.cli import main

    pipe, folder = checked_sd
    out = tmp_path / "unchecked"
    assert main([str(folder.parent / "diffusers"), str(out), "--no-safety-checker"]) == 0
    assert not (out / "safety_checker").exists() and not (out / "feature_extractor").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    result = ours("StableDiffusionPipeline", out)(prompt="a fox", num_inference_steps=2, generator=0, **SIZE)
    assert result.nsfw_content_detected is None


# ---- Safe Latent Diffusion -----------------------------------------------------------------------


def safe_reference(pipe, scheduler=None):
    import diffusers

    # diffusers' SafeStableDiffusionSafetyChecker does not load under transformers 5 (no post_init);
    # StableDiffusionSafetyChecker has its weights and scores, and the Safe pipeline keeps its own
    # copy of the images before the check, so `unsafe_images` and the flags are the same
    ref = reference("StableDiffusionPipelineSafe", pipe)
    if scheduler:
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    return ref


def safe_flags(expected):
    """The images diffusers' Safe pipeline flagged, read from its `unsafe_images` (kept, not black).

    Its `nsfw_content_detected` is a list only when nothing is flagged: its loop over the flags
    reuses the list's name, leaving the last image's flag (a bool); sdort returns the list."""
    flags = [bool(np.asarray(image).any()) for image in expected.unsafe_images]
    assert expected.nsfw_content_detected == (flags[-1] if any(flags) else flags)
    return flags


def safe_ours(folder, scheduler=None):
    import sdort.schedulers

    pipe = ours("StableDiffusionPipelineSafe", folder)
    if scheduler:
        pipe.scheduler = getattr(sdort.schedulers, scheduler).from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler"])
def test_safe_latent_diffusion(checked_sd, scheduler):
    pipe, folder = checked_sd
    # warm-up 2 of 5 steps: the safety guidance applies from step 3, its momentum built from step 1.
    # sld_guidance_scale multiplies |text - concept| below 1/scale, and guidance_scale the result: ONNX
    # Runtime's and torch's float32 UNet outputs (about 1e-6 apart) grow by scale x 7.5 there, so the
    # end-to-end runs use 50 (the maths at 2000 is checked exactly below, on diffusers' own UNet outputs)
    kwargs = dict(prompt="a red fox", num_images_per_prompt=2, num_inference_steps=5, sld_warmup_steps=2,
                  sld_guidance_scale=50, sld_threshold=0.025, sld_momentum_scale=0.5, sld_mom_beta=0.7, **SIZE)
    got = safe_ours(folder, scheduler)(generator=4, output_type="np", **kwargs)
    expected = safe_reference(pipe, scheduler)(generator=reference_generator(4), output_type="np", **kwargs)
    assert got.applied_safety_concept == expected.applied_safety_concept is not None
    assert got.nsfw_content_detected == safe_flags(expected)
    if scheduler is None:  # with these thresholds, PNDM's images flag one of two; DDIM's none
        assert got.nsfw_content_detected == [True, False]
    compare_images(got.images, expected.images, got.nsfw_content_detected)
    assert np.abs(got.unsafe_images - expected.unsafe_images).max() <= TOLERANCE
    # the safety guidance changed the images: plain classifier-free guidance gives others
    plain = safe_ours(folder, scheduler)(generator=4, output_type="np", **{**kwargs, "sld_guidance_scale": 0})
    assert np.abs(plain.unsafe_images + plain.images - got.unsafe_images - got.images).max() > 1e-2


@pytest.mark.parametrize("config", ["MEDIUM", "STRONG", "MAX"])
def test_safe_guidance_maths_on_diffusers_predictions(checked_sd, config):
    """`SafeLatentGuidance.combine` on the UNet outputs of diffusers' own run gives, step by step,
    the prediction diffusers hands its scheduler (float32 numpy against float32 torch)."""
    import torch

    from sdort.runtime import SafetyConfig
    from sdort.runtime.pipelines.safe import SafeLatentGuidance

    pipe, folder = checked_sd
    ref = safe_reference(pipe)
    settings = {**getattr(SafetyConfig, config), "sld_warmup_steps": 2}
    raw, combined = [], []
    unet_forward, step = ref.unet.forward, ref.scheduler.step
    ref.unet.forward = lambda *a, **k: (lambda out: raw.append(out.sample.numpy().copy()) or out)(unet_forward(*a, **k))
    ref.scheduler.step = lambda output, *a, **k: combined.append(output.numpy().copy()) or step(output, *a, **k)
    ref("a red fox", num_images_per_prompt=2, num_inference_steps=5, generator=reference_generator(4),
        output_type="np", **settings, **SIZE)
    guidance = SafeLatentGuidance(7.5, **settings)
    for i, (noise_pred, expected) in enumerate(zip(raw, combined)):
        np.testing.assert_allclose(guidance.combine(i, None, noise_pred.copy()), expected, rtol=0, atol=1e-6)
    assert len(raw) == len(combined) == len(ref.scheduler.timesteps) == 6  # PNDM repeats one timestep


def test_safe_flags_and_pil_output(checked_sd):
    pipe, folder = checked_sd
    kwargs = dict(prompt=["a red fox", "a castle"], num_inference_steps=4, sld_warmup_steps=1, **SIZE)
    ours_pipe = safe_ours(folder)
    ours_pipe.safety_concept = "a storm"
    ref = safe_reference(pipe)
    ref.safety_concept = "a storm"
    got = ours_pipe(generator=5, **kwargs)
    expected = ref(generator=reference_generator(5), **kwargs)
    assert got.applied_safety_concept == expected.applied_safety_concept == "a storm"
    assert got.nsfw_content_detected == safe_flags(expected)
    compare_images(as_floats(got.images), as_floats(expected.images), got.nsfw_content_detected, PIL_TOLERANCE)
    assert np.abs(np.stack(as_floats(got.unsafe_images)) - np.stack(as_floats(expected.unsafe_images))).max() \
        <= PIL_TOLERANCE


def test_safe_guidance_off_warns(checked_sd):
    pipe, folder = checked_sd
    kwargs = dict(prompt="a red fox", num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2, **SIZE)
    with pytest.warns(UserWarning, match="Safety checker disabled"):
        got = safe_ours(folder)(generator=6, output_type="np", **kwargs)
    expected = safe_reference(pipe)(generator=reference_generator(6), output_type="np", **kwargs)
    assert got.applied_safety_concept is None and expected.applied_safety_concept is None
    assert got.nsfw_content_detected == safe_flags(expected)
    compare_images(got.images, expected.images, got.nsfw_content_detected)


def test_safe_bad_input(checked_sd):
    pipe, folder = checked_sd
    safe = safe_ours(folder)
    with pytest.raises(ValueError, match="sld_warmup_steps"):
        safe("a fox", sld_warmup_steps=-1)
    with pytest.raises(ValueError, match="sld_threshold"):
        safe("a fox", sld_threshold=float("nan"))
    with pytest.raises(ValueError, match="negative_prompt"):
        safe("a fox", negative_prompt=["a", "b"])
    from sdort.runtime import SafetyConfig
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig as Reference

    assert [SafetyConfig.WEAK, SafetyConfig.MEDIUM, SafetyConfig.STRONG, SafetyConfig.MAX] == \
        [Reference.WEAK, Reference.MEDIUM, Reference.STRONG, Reference.MAX]


def test_tiny_safe_preset_and_cli(tmp_path):
    """The tiny-safe preset exports offline; `sdort txt2img` picks the Safe pipeline from its
    model_index.json and takes the --sld-* options."""
    from PIL import Image

    from sdort.export import export
    from sdort.runtime.cli import main

    out = export("tiny-safe", tmp_path / "model", log=lambda *_: None)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipelineSafe" and index["safety_checker"][0] is not None
    png = tmp_path / "fox.png"
    argv = ["txt2img", "--model", str(out), "a fox", "--steps", "3", "--seed", "1", "-o", str(png)]
    assert main([*argv, "--sld-warmup-steps", "1", "--safety-config", "strong"]) == 0
    image = Image.open(png)
    assert image.text["pipeline"] == "StableDiffusionPipelineSafe"
    assert main([*argv, "--clip-skip", "1"]) == 2
