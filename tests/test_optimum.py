"""Models exported by Optimum's own exporter (`optimum-cli export onnx`) run in sdort and match diffusers.

Claim: a tiny SD 1 model saved by diffusers and exported with Optimum gives, in sdort, the images
diffusers gives from the same folder, seeds and inputs, within 1e-3 max abs on [0, 1] (fp32), for
text-to-image, image-to-image and inpainting (an ordinary 4-channel UNet, which diffusers' inpaint
pipeline accepts). So do a tiny SDXL base (`--task text-to-image`, StableDiffusionXLPipeline) and a
tiny SDXL refiner (`--task image-to-image`: text_encoder_2 alone, aesthetic-score time ids), with
guidance and negative prompts, and the base → refiner hand-off.

What was found (Optimum 2.1 / optimum-onnx 0.1.0, the pins below):

- Optimum's graphs declare other IO forms than sdort's: `input_ids` int64 (sdort: int32), the
  UNet's `timestep` a rank-0 float (sdort: [batch]); the VAE encoder outputs `latent_parameters`
  (mean and logvar; sampled in numpy with the pipeline's generator, exactly as diffusers samples).
  Optimum up to 1.22 traced `latent_dist.sample()` instead: an output `latent_sample` drawn inside
  the graph by ONNX Runtime's random op (see test_io_forms.py for what parity that form allows).
- The first denoising step failed with "Attempting to broadcast an axis by a dimension other than
  1. 2 by 16" in '/time_proj/Mul'. The graph is right: it unsqueezes the rank-0 timestep to [1]
  and expands it to the batch read from `sample`'s shape (the batch is dynamic, not traced), then
  time_proj multiplies [B, 1] by its [1, 16] frequencies. sdort did pass a 0-d timestep, but its
  session wrapper cast inputs with `np.ascontiguousarray`, which returns at least one dimension:
  the timestep reached the graph as [1] (IO binding does not check ranks), the Unsqueeze made
  [1, 1], the Expand [1, B], time_proj [1, 1, B] against [1, 16]. Fixed in
  `OnnxModel.prepare` (sessions.py), which keeps 0-d arrays 0-d.
- Optimum 2.1 runs on transformers 4.57, which cannot read what transformers 5 saves: the CLIP text
  encoder's weights without the `text_model.` prefix (transformers 4 loads them as *random*
  weights, with only a warning) and a tokenizer folder with tokenizer.json alone. The fixture
  writes the folder as Hub checkpoints are laid out (prefixed keys, vocab.json and merges.txt),
  which both transformers versions read as the same weights. (CLIPTextModelWithProjection, SDXL's
  text_encoder_2, is saved by transformers 5 with the prefix; only the tokenizers need the files.)
- SDXL needs no change in sdort: Optimum's folders have sdort's layout and names. Each text
  encoder has `hidden_states.0` .. `hidden_states.N` (N layers; Optimum turns `output_hidden_states`
  on for SDXL only), `last_hidden_state`, and `pooler_output` (text_encoder) or `text_embeds`
  (text_encoder_2), all float32; the UNet takes `text_embeds` [B, projection_dim] and `time_ids`
  [B, 6] (the refiner: [B, 5]) float32 beside the rank-0 timestep; both VAE parts are float32 (the
  default dtype; `--dtype fp16` not tried), with `force_upcast` and SDXL's scaling factor in their
  config.json.
  Oddity, harmless for sdort (it reads the width from the session): text_encoder_2 declares
  `text_embeds` as ['batch_size', 'sequence_length'], its projection axis given the token axis' name.

The Optimum tool chain lives in its own virtual environment (it pins an older transformers than
sdort's tests use), created on first use under ~/.cache/sdort-tests/ (or $SDORT_TEST_CACHE), in a
folder named after the pins below, and reused afterwards. Creating it needs PyPI once; where it
cannot be created the tests fail and say why. SDORT_SKIP_OPTIMUM=1 skips them instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, tiny_components, tiny_xl_components
from venv_support import cached_venv, log_tail, run_logged

TOLERANCE = 1e-3

# The Optimum tool chain, pinned in one place. torch is installed first, alone, and held by a
# constraint: pip left to choose would pull a multi-GB CUDA build. transformers, diffusers and
# huggingface_hub are the newest that optimum-onnx 0.1.0 (optimum 2.1) resolves to.
OPTIMUM_TORCH = "torch==2.13.0"
OPTIMUM_PINS = (
    "optimum-onnx[onnxruntime]==0.1.0",
    "optimum==2.1.0",
    "transformers==4.57.6",
    "diffusers==0.39.0",
    "huggingface_hub==0.36.2",
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
)
EXPORT_TIMEOUT_S = 600


def optimum_venv() -> Path:
    """The cached virtual environment with Optimum's exporter; created here when missing."""
    return cached_venv("optimum-venv", (OPTIMUM_TORCH, *OPTIMUM_PINS),
                       "import optimum.exporters.onnx, torch; assert torch.__version__.startswith('2.13.0')",
                       "SDORT_SKIP_OPTIMUM", first=OPTIMUM_TORCH)


def save_hub_layout(folder: Path) -> None:
    """Rewrite what transformers 5 saved into the layout of Hub checkpoints, which transformers 4 reads.

    transformers 5 saves CLIPTextModel's weights without the `text_model.` prefix and the
    tokenizers as tokenizer.json alone; transformers 4 would load the text encoder with random
    weights (a warning only) and cannot build the slow CLIPTokenizer that model_index.json names.
    CLIPTextModelWithProjection (SDXL's text_encoder_2) keeps `text_model.` beside `text_projection.`.
    """
    from safetensors.numpy import load_file, save_file

    for part in ("text_encoder", "text_encoder_2"):
        weights = folder / part / "model.safetensors"
        if not weights.is_file():
            continue
        tensors = load_file(weights)
        if not any(name.startswith("text_model.") for name in tensors):
            save_file({name if name.startswith("text_projection.") else f"text_model.{name}": value
                       for name, value in tensors.items()}, weights, metadata={"format": "pt"})
    for part in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            if (folder / part).is_dir() and not (folder / part / name).is_file():
                shutil.copy(TOKENIZER_DIR / name, folder / part / name)


def optimum_export(cls, components, folder: Path, task: str, **load):
    """(diffusers pipeline, Optimum export dir): `components` saved by diffusers as `cls`, read back by
    diffusers as the reference and exported by `optimum-cli export onnx --task TASK`."""
    if os.environ.get("SDORT_SKIP_OPTIMUM") == "1":
        pytest.skip("SDORT_SKIP_OPTIMUM=1: the Optimum export tests are skipped")
    import torch

    venv = optimum_venv()
    source = folder / "diffusers"
    cls(**components).save_pretrained(source)
    save_hub_layout(source)
    reference = cls.from_pretrained(source, **load)
    reference.set_progress_bar_config(disable=True)
    # the rewritten text encoders are still the ones built (transformers 5 reads the prefixed keys)
    for part in ("text_encoder", "text_encoder_2"):
        if components.get(part) is not None:
            built = components[part].state_dict()
            loaded = getattr(reference, part).state_dict()
            assert loaded.keys() == built.keys()
            assert all(torch.equal(value, built[name]) for name, value in loaded.items())

    out, log = folder / "optimum", folder / "optimum-cli.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = run_logged([venv / "bin" / "optimum-cli", "export", "onnx", "--task", task, "--model", source, out],
                log, EXPORT_TIMEOUT_S, env=env)
    if code != 0:
        pytest.fail(f"optimum-cli export failed (exit code {code}):\n{log_tail(log)}", pytrace=False)
    if "newly initialized" in log.read_text(errors="replace"):
        pytest.fail(f"Optimum's transformers loaded part of the model with random weights:\n{log_tail(log)}",
                    pytrace=False)
    return reference, out


@pytest.fixture(scope="session")
def optimum_sd1(tmp_path_factory):
    """conftest's tiny SD 1 model exported by Optimum (`optimum_export`)."""
    from diffusers import StableDiffusionPipeline

    return optimum_export(StableDiffusionPipeline, tiny_components(), tmp_path_factory.mktemp("optimum"),
                          "text-to-image", safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def optimum_sdxl(tmp_path_factory):
    """conftest's tiny SDXL base exported by Optimum (StableDiffusionXLPipeline: `text-to-image`)."""
    from diffusers import StableDiffusionXLPipeline

    return optimum_export(StableDiffusionXLPipeline, {**tiny_xl_components("base"), "add_watermarker": False},
                          tmp_path_factory.mktemp("optimum_sdxl"), "text-to-image", add_watermarker=False)


@pytest.fixture(scope="session")
def optimum_sdxl_refiner(tmp_path_factory):
    """conftest's tiny SDXL refiner exported by Optimum (StableDiffusionXLImg2ImgPipeline: `image-to-image`)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return optimum_export(StableDiffusionXLImg2ImgPipeline,
                          {**tiny_xl_components("refiner"), "add_watermarker": False},
                          tmp_path_factory.mktemp("optimum_sdxl_refiner"), "image-to-image", add_watermarker=False)


def ours(folder, cls_name="StableDiffusionPipeline", scheduler=None):
    import sdort.runtime
    import sdort.schedulers

    pipe = getattr(sdort.runtime, cls_name).from_pretrained(folder, provider="cpu")
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = getattr(sdort.schedulers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def reference_as(reference, cls_name="StableDiffusionPipeline", scheduler=None):
    """diffusers' `cls_name` on the reference's components and pipeline config (the refiner's
    `requires_aesthetics_score`, `force_zeros_for_empty_prompt`); never a watermark."""
    import inspect

    import diffusers

    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {name: value for name, value in reference.config.items()
              if name in accepted and name not in reference.components}
    if "add_watermarker" in accepted:
        config["add_watermarker"] = False
    pipe = cls(**reference.components, **config)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def compare(model, cls_name="StableDiffusionPipeline", scheduler=None, seeds=(3,), **kwargs):
    """sdort's and diffusers' images for the same call, seeded with sdort's TorchGenerator and torch's."""
    import torch

    reference, folder = model
    torch_generators = [torch.Generator().manual_seed(s) for s in seeds]
    expected = reference_as(reference, cls_name, scheduler)(
        generator=torch_generators if len(seeds) > 1 else torch_generators[0], output_type="np", **kwargs).images
    got = ours(folder, cls_name, scheduler)(
        generator=list(seeds) if len(seeds) > 1 else seeds[0], output_type="np", **kwargs).images
    assert got.shape == expected.shape and got.dtype == np.float32
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    return np.abs(got - expected).max()


def init_image(width=64, height=64, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) + 0.05 * rng.standard_normal((height, width, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def mask_image(width=64, height=64, box=(16, 20, 44, 48)):
    from PIL import Image

    mask = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask)


def test_optimum_io_forms_are_the_ones_described(optimum_sd1):
    """The export really has the forms this file is about (so the tests below exercise them)."""
    from sdort.runtime import OnnxModel

    folder = optimum_sd1[1]
    unet = OnnxModel(folder / "unet" / "model.onnx", provider="cpu")
    text_encoder = OnnxModel(folder / "text_encoder" / "model.onnx", provider="cpu")
    vae_encoder = OnnxModel(folder / "vae_encoder" / "model.onnx", provider="cpu")
    assert unet.inputs["timestep"].shape == () and unet.inputs["timestep"].dtype == np.float32
    assert text_encoder.inputs["input_ids"].dtype == np.int64
    assert list(vae_encoder.outputs) == ["latent_parameters"] and vae_encoder.outputs["latent_parameters"].shape[1] == 8


@pytest.mark.parametrize("scheduler, kwargs", [
    (None, dict(prompt="a red fox in the snow")),
    # guidance with 2 images for 2 prompts: the rank-0 timestep is expanded to a UNet batch of 8
    ("EulerAncestralDiscreteScheduler", dict(prompt=["a castle", "a boat"], negative_prompt=["blurry", "dark"],
                                             num_images_per_prompt=2)),
    # batch 1; not 72x56 (9x7 latents): Optimum traces the UNet on a size where diffusers takes no
    # upsample_size path, so its graphs need latent sides divisible by 2 ** (up blocks - 1)
    ("DDIMScheduler", dict(prompt="a lighthouse", guidance_scale=1.0, height=80, width=48)),
])
def test_text_to_image_matches_diffusers(optimum_sd1, scheduler, kwargs):
    assert compare(optimum_sd1, scheduler=scheduler, num_inference_steps=5, **kwargs) <= TOLERANCE


@pytest.mark.parametrize("scheduler, seeds", [(None, (3,)), ("EulerDiscreteScheduler", (5, 6))])
def test_image_to_image_matches_diffusers(optimum_sd1, scheduler, seeds):
    # the VAE sample of the image and the noise after it both come from the seed(s)
    error = compare(optimum_sd1, "StableDiffusionImg2ImgPipeline", scheduler, seeds, prompt="a watercolor fox",
                    image=init_image(), strength=0.6, num_inference_steps=6, num_images_per_prompt=len(seeds))
    assert error <= TOLERANCE


@pytest.mark.parametrize("strength, scheduler", [(1.0, None), (0.6, "EulerAncestralDiscreteScheduler")])
def test_inpaint_with_a_4_channel_unet_matches_diffusers(optimum_sd1, strength, scheduler):
    error = compare(optimum_sd1, "StableDiffusionInpaintPipeline", scheduler, prompt="a red fox in the snow",
                    image=init_image(), mask_image=mask_image(), strength=strength, num_inference_steps=6,
                    num_images_per_prompt=2)
    assert error <= TOLERANCE


def test_optimum_sdxl_io_forms_are_the_ones_described(optimum_sdxl, optimum_sdxl_refiner):
    """What Optimum writes for SDXL (the docstring's list), so the parity tests below are about it."""
    from sdort.runtime import OnnxModel

    hidden = [f"hidden_states.{i}" for i in range(6)]  # the embeddings and 5 layers
    for folder, time_ids, parts in ((optimum_sdxl[1], 6, ("text_encoder", "text_encoder_2")),
                                    (optimum_sdxl_refiner[1], 5, ("text_encoder_2",))):
        assert (folder / "text_encoder").exists() == (len(parts) == 2)
        models = {part: OnnxModel(folder / part / "model.onnx", provider="cpu")
                  for part in (*parts, "unet", "vae_encoder", "vae_decoder")}
        for part in parts:
            pooled = "pooler_output" if part == "text_encoder" else "text_embeds"
            assert list(models[part].inputs) == ["input_ids"] and models[part].inputs["input_ids"].dtype == np.int64
            assert sorted(models[part].outputs) == sorted(["last_hidden_state", pooled, *hidden])
        unet = models["unet"]
        assert list(unet.inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
        assert unet.inputs["timestep"].shape == () and unet.inputs["time_ids"].shape[1] == time_ids
        assert unet.inputs["text_embeds"].shape[1] == 32 and list(unet.outputs) == ["out_sample"]
        assert list(models["vae_encoder"].outputs) == ["latent_parameters"]
        assert list(models["vae_decoder"].inputs) == ["latent_sample"]
        for model in models.values():
            assert all(spec.dtype in (np.float32, np.int64)
                       for spec in [*model.inputs.values(), *model.outputs.values()])


@pytest.mark.parametrize("scheduler, seeds, kwargs", [
    # two prompts, their negative prompts, two seeds
    (None, (3, 4), dict(prompt=["a red fox in the snow", "a castle"], negative_prompt=["blurry", "dark"])),
    # guidance without a negative prompt: zero negative embeddings (force_zeros_for_empty_prompt);
    # prompt_2 for the second encoder, two images of the prompt
    ("EulerAncestralDiscreteScheduler", (5, 6), dict(prompt="a lighthouse", prompt_2="at dusk",
                                                     num_images_per_prompt=2)),
])
def test_sdxl_text_to_image_matches_diffusers(optimum_sdxl, scheduler, seeds, kwargs):
    error = compare(optimum_sdxl, "StableDiffusionXLPipeline", scheduler, seeds, num_inference_steps=4,
                    guidance_scale=5.0, height=64, width=64, **kwargs)
    assert error <= TOLERANCE


def test_sdxl_refiner_image_to_image_matches_diffusers(optimum_sdxl_refiner):
    # only text_encoder_2; aesthetic-score time ids; the VAE sample of the image from the seed
    error = compare(optimum_sdxl_refiner, "StableDiffusionXLImg2ImgPipeline", None, (5,), prompt="a watercolor fox",
                    negative_prompt="blurry", image=init_image(), strength=0.6, num_inference_steps=4,
                    guidance_scale=5.0, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    assert error <= TOLERANCE


def test_sdxl_base_to_refiner_hand_off_matches_diffusers(optimum_sdxl, optimum_sdxl_refiner):
    """The base's first 75 % of the schedule as latents, the refiner's rest, both exported by Optimum."""
    import torch

    common = dict(prompt="a red fox in the snow", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0)
    latents = ours(optimum_sdxl[1], "StableDiffusionXLPipeline")(
        generator=4, denoising_end=0.75, output_type="latent", height=64, width=64, **common).images
    expected_latents = reference_as(optimum_sdxl[0], "StableDiffusionXLPipeline")(
        generator=torch.Generator().manual_seed(4), denoising_end=0.75, output_type="latent", height=64, width=64,
        **common).images
    assert np.abs(latents - expected_latents.numpy()).max() <= TOLERANCE
    refiner = ours(optimum_sdxl_refiner[1], "StableDiffusionXLImg2ImgPipeline")
    assert refiner.config["requires_aesthetics_score"] and refiner.text_encoder is None
    got = refiner(image=latents, generator=5, denoising_start=0.75, output_type="np", **common).images
    expected = reference_as(optimum_sdxl_refiner[0], "StableDiffusionXLImg2ImgPipeline")(
        image=expected_latents, generator=torch.Generator().manual_seed(5), denoising_start=0.75, output_type="np",
        **common).images
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= TOLERANCE
