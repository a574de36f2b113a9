"""Text-to-image parity with diffusers' StableDiffusionPipeline on tiny models (fp32).

Claim: with the same weights, prompt and initial latents, sdort's images equal diffusers' within
1e-3 max abs on the [0, 1] scale.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import latents_for

TOLERANCE = 1e-3


def run_both(model, scheduler=None, latent_shape=(1, 4, 8, 8), **kwargs):
    import diffusers
    import torch

    import sdort.schedulers
    from sdort.runtime import StableDiffusionPipeline

    reference, folder = model
    ours = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    ours.set_progress_bar_config(disable=True)
    if scheduler:
        # as users swap schedulers: on the built pipeline (a new pipeline would rewrite clip_sample)
        reference = type(reference)(**reference.components)
        reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
        reference.set_progress_bar_config(disable=True)
        ours.scheduler = getattr(sdort.schedulers, scheduler).from_config(ours.scheduler.config)
    latents = latents_for(latent_shape)
    got = ours(latents=latents, output_type="np", **kwargs).images
    expected = reference(latents=torch.from_numpy(latents), output_type="np", **kwargs).images
    assert got.shape == expected.shape and got.dtype == np.float32
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    return got, expected


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_schedulers_match_diffusers(sd1, scheduler):
    got, expected = run_both(sd1, scheduler, prompt="a red fox in the snow", num_inference_steps=6,
                             height=64, width=64)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_negative_prompt_and_two_images_per_prompt(sd1):
    got, expected = run_both(
        sd1, prompt=["a castle on a hill", "an astronaut riding a horse"],
        negative_prompt=["blurry", "low quality, watermark"], num_images_per_prompt=2,
        num_inference_steps=4, latent_shape=(4, 4, 8, 8), height=64, width=64,
    )
    assert got.shape == (4, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_guidance_off(sd1):
    got, expected = run_both(sd1, prompt="a lighthouse", guidance_scale=1.0, num_inference_steps=4,
                             height=64, width=64)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_odd_size_and_guidance_rescale(sd1):
    # 72x56 gives 9x7 latents: the UNet must take diffusers' upsample_size path inside the graph.
    got, expected = run_both(sd1, "EulerDiscreteScheduler", prompt="a boat", num_inference_steps=3,
                             height=72, width=56, latent_shape=(1, 4, 9, 7), guidance_rescale=0.7)
    assert got.shape == (1, 72, 56, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_sd2_v_prediction_at_768(sd2):
    got, expected = run_both(sd2, prompt="a mountain lake at dawn!", num_inference_steps=3,
                             height=768, width=768, latent_shape=(1, 4, 96, 96))
    assert np.abs(got - expected).max() <= TOLERANCE


def test_prompt_embeds_and_callback(sd1):
    from sdort.runtime import StableDiffusionPipeline

    _, folder = sd1
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    embeds, negative = pipe.encode_prompt("a cat", 1, True)
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tensors["latents"].shape))
        return {"latents": tensors["latents"]}

    latents = latents_for((1, 4, 8, 8))
    a = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=3, latents=latents,
             output_type="np", callback_on_step_end=callback).images
    b = pipe("a cat", num_inference_steps=3, latents=latents, output_type="np").images
    np.testing.assert_array_equal(a, b)
    # PNDM with skip_prk_steps runs one extra (repeated) timestep: 3 steps are 4 UNet calls
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][2] == (1, 4, 8, 8)


def test_output_types(sd1):
    from sdort.runtime import StableDiffusionPipeline

    _, folder = sd1
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    latents = latents_for((1, 4, 8, 8))
    kwargs = dict(prompt="a tree", num_inference_steps=2, latents=latents)
    pil = pipe(**kwargs).images
    as_np = pipe(output_type="np", **kwargs).images
    lat = pipe(output_type="latent", **kwargs).images
    assert pil[0].size == (64, 64) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    assert lat.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("kwargs, name", [
    (dict(height=60, width=64), "height"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(generator=[1, 2, 3]), "generator"),
])
def test_bad_input_names_the_parameter(sd1, kwargs, name):
    from sdort.runtime import StableDiffusionPipeline

    _, folder = sd1
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    kwargs = {"prompt": "a dog", "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_missing_parts(tmp_path, sd1):
    import shutil

    from sdort.runtime import StableDiffusionPipeline

    with pytest.raises(FileNotFoundError, match="no such model folder"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(sd1[1], broken)
    (broken / "unet" / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="unet"):
        StableDiffusionPipeline.from_pretrained(broken)


def test_session_names_the_part_and_input(sd1):
    from sdort.runtime import OnnxModel

    unet = OnnxModel(sd1[1] / "unet" / "model.onnx", provider="cpu")
    with pytest.raises(ValueError, match=r"unet: input 'sample' float32 \[batch, 4, latent_height, latent_width\]"):
        unet(sample=np.zeros((1, 3, 8, 8)), timestep=np.zeros(1), encoder_hidden_states=np.zeros((1, 77, 32)))
    with pytest.raises(ValueError, match="missing input"):
        unet(sample=np.zeros((1, 4, 8, 8)))


@pytest.mark.parametrize("scheduler, eta", [
    ("DDIMScheduler", 1.0), ("EulerAncestralDiscreteScheduler", 0.0), ("DDPMScheduler", 0.0),
])
def test_seed_reproduces_diffusers_cpu_generator(sd1, scheduler, eta):
    """No `latents`: the initial noise and the noise inside every step come from the seed.

    sdort's int seed means TorchGenerator, which draws what torch.Generator().manual_seed(seed) draws."""
    import diffusers
    import torch

    import sdort.schedulers
    from sdort.runtime import StableDiffusionPipeline

    reference, folder = sd1
    reference = type(reference)(**reference.components)
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    ours.scheduler = getattr(sdort.schedulers, scheduler).from_config(ours.scheduler.config)
    kwargs = dict(prompt="a snowy owl", num_inference_steps=5, eta=eta, output_type="np", num_images_per_prompt=2)
    got = ours(generator=1234, **kwargs).images
    expected = reference(generator=torch.Generator().manual_seed(1234), **kwargs).images
    assert got.std() > 1e-3
    assert np.abs(got - expected).max() <= TOLERANCE
    # a list of seeds, one per image, as a list of torch generators
    got = ours(generator=[7, 8], **kwargs).images
    expected = reference(generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)], **kwargs).images
    assert np.abs(got - expected).max() <= TOLERANCE


ALL_SCHEDULERS = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler", "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
]


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_every_scheduler_with_a_seed(sd1, scheduler):
    """Each scheduler swapped in as users do, seeded (initial and in-step noise from the seed)."""
    import diffusers
    import torch

    import sdort.schedulers
    from sdort.runtime import StableDiffusionPipeline

    reference, folder = sd1
    reference = type(reference)(**reference.components)
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    ours.scheduler = getattr(sdort.schedulers, scheduler).from_config(ours.scheduler.config)
    kwargs = dict(prompt="a bowl of fruit", num_inference_steps=4, output_type="np")
    got = ours(generator=11, **kwargs).images
    expected = reference(generator=torch.Generator().manual_seed(11), **kwargs).images
    assert got.std() > 1e-3
    assert np.abs(got - expected).max() <= TOLERANCE


def test_concurrent_calls_do_not_share_scheduler_state(sd1):
    """Two threads generating with one pipeline get what they get alone (state is per call)."""
    from concurrent.futures import ThreadPoolExecutor

    from sdort.runtime import StableDiffusionPipeline
    from sdort.schedulers import DPMSolverMultistepScheduler

    pipe = StableDiffusionPipeline.from_pretrained(sd1[1], provider="cpu")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    jobs = [dict(prompt="a fox", generator=1, num_inference_steps=5), dict(prompt="a cat", generator=2, num_inference_steps=3)]
    alone = [pipe(output_type="np", **job).images for job in jobs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda job: pipe(output_type="np", **job).images, jobs))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
