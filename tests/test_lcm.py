"""LCM parity with diffusers' LatentConsistencyModel{,Img2Img}Pipeline on a tiny model (fp32), and
diffusers' StableDiffusionPipeline with the same consistency-distilled UNet.

Claim: with the same weights, inputs and int seeds (torch's CPU generator, which sdort reproduces
bit for bit), sdort's images equal diffusers' within 1e-3 max abs on the [0, 1] scale. The UNet is
the tiny SD one of conftest with `time_cond_proj_dim` set (it takes the guidance-scale embedding as
`timestep_cond`), the scheduler LCMScheduler; saved with `save_pretrained`, exported with sd-export.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_components

TOLERANCE = 1e-3
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


def lcm_components(seed: int = 0):
    import torch
    from diffusers import LCMScheduler, UNet2DConditionModel

    parts = tiny_components(seed=seed)
    unet = parts["unet"]
    torch.manual_seed(seed + 10)
    parts["unet"] = UNet2DConditionModel(**{**unet.config, "time_cond_proj_dim": 32})
    # LCM-Dreamshaper's scheduler settings
    parts["scheduler"] = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      set_alpha_to_one=True, steps_offset=1, original_inference_steps=50)
    return parts


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """(diffusers LatentConsistencyModelPipeline loaded from the saved folder, sdort export dir)."""
    from diffusers import LatentConsistencyModelPipeline

    from sdort.export import export

    folder = tmp_path_factory.mktemp("lcm")
    LatentConsistencyModelPipeline(**lcm_components()).save_pretrained(folder / "diffusers")
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder / "diffusers", safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, export(str(folder / "diffusers"), folder / "onnx", log=lambda *_: None)


def ours(cls_name, folder):
    import sdort.runtime

    pipe = getattr(sdort.runtime, cls_name).from_pretrained(folder, provider="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(cls_name, lcm_pipe):
    import diffusers

    pipe = getattr(diffusers, cls_name)(**lcm_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def torch_generator(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def compare(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= TOLERANCE


def test_guidance_scale_embedding_matches_diffusers():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    from sdort.runtime.pipelines.guidance_embedding import guidance_scale_embedding

    w = [7.5, 0.0, -1.0, 2.25]
    # sdort's frequencies are the correctly rounded exp; torch's float32 exp is one ulp off that for
    # one frequency in 128 at width 256 (LCM-Dreamshaper's), which moves its angle 1000 w f by at most
    # 1000 |w| 2^-24 (f <= 1): the bound there. Elsewhere the operations are torch's, to float32 noise.
    one_ulp_of_angle = 1000 * max(map(abs, w)) * 2.0**-24
    for dim, atol in ((32, 1e-6), (33, 1e-6), (64, 1e-6), (256, one_ulp_of_angle)):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor(w), dim).numpy()
        got = guidance_scale_embedding(w, dim)
        assert got.shape == (4, dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_export_gives_the_unet_a_timestep_cond_input(lcm):
    _, folder = lcm
    unet = ours("LatentConsistencyModelPipeline", folder).unet
    assert list(unet.inputs) == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet.inputs["timestep_cond"].shape[1] == 32


def test_text_to_image_two_images_per_prompt_and_callback(lcm):
    pipe, folder = lcm
    seen = {"ours": [], "diffusers": []}

    def recorder(name):
        def callback(_pipe, i, t, tensors):
            seen[name].append({k: np.asarray(v).copy() for k, v in tensors.items()})
            return {}
        return callback

    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=2, output_type="np",
                  callback_on_step_end_tensor_inputs=["latents", "denoised", "w_embedding"])
    got = ours("LatentConsistencyModelPipeline", folder)(generator=5, callback_on_step_end=recorder("ours"), **kwargs)
    expected = pipe(generator=torch_generator(5), callback_on_step_end=recorder("diffusers"), **kwargs)
    assert got.images.shape == (4, 64, 64, 3) and got.nsfw_content_detected is None
    compare(got.images, expected.images)
    assert len(seen["ours"]) == len(seen["diffusers"]) == 4  # the default 4 steps
    for mine, theirs in zip(seen["ours"], seen["diffusers"]):
        for name in ("latents", "denoised", "w_embedding"):
            np.testing.assert_allclose(mine[name], theirs[name], rtol=0, atol=1e-4)


def test_text_to_image_guidance_original_steps_and_custom_timesteps(lcm):
    pipe, folder = lcm
    mine = ours("LatentConsistencyModelPipeline", folder)
    for kwargs in (dict(guidance_scale=3.0, num_inference_steps=3, original_inference_steps=30),
                   dict(timesteps=[999, 759, 499, 259], guidance_scale=1.0)):
        got = mine("a castle", generator=2, output_type="np", **kwargs).images
        expected = pipe("a castle", generator=torch_generator(2), output_type="np", **kwargs).images
        compare(got, expected)


def test_image_to_image_two_images_per_prompt(lcm):
    pipe, folder = lcm
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kwargs = dict(prompt=PROMPTS, image=image, num_images_per_prompt=2, output_type="np")
    ref = reference("LatentConsistencyModelImg2ImgPipeline", pipe)
    mine = ours("LatentConsistencyModelImg2ImgPipeline", folder)
    compare(mine(generator=4, **kwargs).images, ref(generator=torch_generator(4), **kwargs).images)
    # strength 0.5 of 4 steps: diffusers shortens the distillation schedule itself
    compare(mine(generator=4, strength=0.5, **kwargs).images,
            ref(generator=torch_generator(4), strength=0.5, **kwargs).images)


def test_stable_diffusion_pipeline_with_an_lcm_unet(lcm):
    # diffusers' StableDiffusionPipeline gives an LCM UNet the embedding of guidance_scale - 1 as
    # timestep_cond and runs no classifier-free batch (the negative prompt is then unused)
    pipe, folder = lcm
    kwargs = dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
                  num_inference_steps=4, guidance_scale=7.5, output_type="np")
    got = ours("StableDiffusionPipeline", folder)(generator=1, **kwargs).images
    expected = reference("StableDiffusionPipeline", pipe)(generator=torch_generator(1), **kwargs).images
    compare(got, expected)


def test_bad_input_names_the_parameter(lcm):
    from sdort.schedulers import EulerDiscreteScheduler

    _, folder = lcm
    mine = ours("LatentConsistencyModelPipeline", folder)
    with pytest.raises(TypeError):
        mine("a cat", negative_prompt="blurry")  # as diffusers: LCM takes no negative prompt
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        mine("a cat", callback_on_step_end_tensor_inputs=["noise_pred"])
    plain = types.SimpleNamespace(config={"in_channels": 4, "sample_size": 8}, inputs={})
    with pytest.raises(ValueError, match="'unet'.*time_cond_proj_dim"):
        type(mine)(**{**mine.components, "unet": plain})("a cat")
    other = type(mine)(**{**mine.components, "scheduler": EulerDiscreteScheduler.from_config(mine.scheduler.config)})
    with pytest.raises(ValueError, match="scheduler: .*LCMScheduler"):
        other("a cat")
    img2img = ours("LatentConsistencyModelImg2ImgPipeline", folder)
    with pytest.raises(ValueError, match="strength"):
        img2img("a cat", image=Image.new("RGB", (64, 64)), strength=1.5)


def test_cli_txt2img_runs_the_lcm_pipeline(lcm, tmp_path):
    from sdort.runtime import cli

    _, folder = lcm
    out = tmp_path / "fox.png"
    assert cli.main(["txt2img", "a red fox", "--model", str(folder), "--seed", "3", "-o", str(out)]) == 0
    image = Image.open(out)
    assert image.text["pipeline"] == "LatentConsistencyModelPipeline" and image.text["steps"] == "4"
    expected = ours("LatentConsistencyModelPipeline", folder)("a red fox", generator=3).images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    assert cli.main(["txt2img", "a red fox", "--model", str(folder), "--negative-prompt", "blurry",
                     "-o", str(tmp_path / "no.png")]) == 2


def test_tiny_lcm_preset_exports_and_runs(tmp_path):
    from sdort.export import export

    folder = export("tiny-lcm", tmp_path / "model", log=lambda *_: None)
    pipe = ours("LatentConsistencyModelPipeline", folder)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    images = pipe("a cat", generator=0, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and images.std() > 1e-3


@pytest.mark.parametrize("task", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_image_tasks_with_an_lcm_unet(lcm, task):
    """diffusers' img2img and inpainting, like its text-to-image, give an LCM UNet the embedding of
    guidance_scale - 1 as timestep_cond and run no classifier-free batch."""
    pipe, folder = lcm
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kwargs = dict(prompt=PROMPTS[0], image=image, num_inference_steps=4, guidance_scale=7.5, output_type="np")
    if task == "StableDiffusionInpaintPipeline":
        mask = np.zeros((64, 64), np.uint8)
        mask[8:40, 16:56] = 255
        kwargs.update(mask_image=Image.fromarray(mask), height=64, width=64, strength=0.9)
    got = ours(task, folder)(generator=2, **kwargs).images
    expected = reference(task, pipe)(generator=torch_generator(2), **kwargs).images
    compare(got, expected)
