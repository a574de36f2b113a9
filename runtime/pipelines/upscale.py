"""x4 super-resolution: diffusers' `StableDiffusionUpscalePipeline` on ONNX Runtime.

What it adds to the shared loop: the low-resolution image itself is the conditioning. It is
noised to `noise_level` by the `low_res_scheduler` (a DDPM scheduler of its own), concatenated to
the latents at the image's own size (4 + 3 = 7 UNet channels), and `noise_level` goes to the UNet
as its `class_labels`. The VAE (scaling_factor 0.08333, three blocks) decodes the latents to four
times the input size, which for a 512 px input is 2048 px: `enable_vae_tiling()` keeps that in a
laptop's memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ...schedulers import get_scheduler_class
from ..image_processor import VaeImageProcessor
from ..model_files import read_json
from ..randomness import randn_tensor
from .base import StableDiffusionPipelineOutput, TextConditionedPipeline, retrieve_timesteps
from .safety_checker import SafetyCheckedPipeline
from .step_callbacks import check_callback_steps, legacy_callback

logger = logging.getLogger("sdort")

# diffusers' StableDiffusionUpscalePipeline imposes this VAE scaling factor whatever the config says.
UPSCALER_SCALING_FACTOR = 0.08333


def load_scheduler(folder: Path):
    """The scheduler configured by `folder`/scheduler_config.json (its `_class_name`)."""
    config_path = folder / "scheduler_config.json"
    config = read_json(config_path)
    try:
        return get_scheduler_class(config.get("_class_name", "DDPMScheduler")).from_config(config)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from None


def image_batch_size(image) -> int:
    """How many images `image` holds (a list, an NHWC/NCHW array, or one image), as diffusers counts."""
    if isinstance(image, list):
        return len(image)
    if isinstance(image, np.ndarray) and image.ndim == 4:
        return image.shape[0]
    return 1


def check_image_batch(image, batch: int) -> None:
    """diffusers' upscalers take one image per prompt: the image batch is tiled with the latents."""
    if not isinstance(image, (Image.Image, np.ndarray, list)):
        raise ValueError(f"image must be a PIL image, a numpy array or a list of them; got {type(image).__name__}")
    if isinstance(image, list) and not image:
        raise ValueError("image: the list is empty")
    count = image_batch_size(image)
    if count != batch:
        raise ValueError(f"image: {count} image(s) for {batch} prompt(s); give one image per prompt")


class StableDiffusionUpscalePipeline(SafetyCheckedPipeline, TextConditionedPipeline):
    """x4 upscaling with diffusers' `StableDiffusionUpscalePipeline` parameters, defaults and output.

    Parts: `text_encoder`, `unet` (7 input channels, `class_labels` input), `vae_decoder`, the
    `scheduler` and the `low_res_scheduler/` config; `max_noise_level` from model_index.json; the
    safety checker when the folder has one, run after decoding as diffusers' upscaler runs it.
    """

    optional_parts = ()
    # diffusers' upscaler does not correct old scheduler configs
    legacy_scheduler_fix = False
    conditioning_channels = (3,)
    callback_tensor_inputs = ("latents",)
    config_names = ("max_noise_level",)

    def __init__(self, text_encoder, tokenizer, unet, vae_decoder, scheduler, low_res_scheduler=None,
                 vae_encoder=None, max_noise_level: int = 350, requires_safety_checker: bool = False,
                 **extra_parts):
        if low_res_scheduler is None:
            raise ValueError("StableDiffusionUpscalePipeline needs the 'low_res_scheduler' (a DDPMScheduler)")
        # diffusers' upscaler takes no requires_safety_checker and never warns without a checker
        super().__init__(text_encoder, tokenizer, unet, vae_decoder, scheduler, vae_encoder,
                         low_res_scheduler=low_res_scheduler, requires_safety_checker=requires_safety_checker,
                         **extra_parts)
        self.max_noise_level = max_noise_level
        # diffusers: VaeImageProcessor(resample="bicubic") for the low-res input
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        factor = self.vae_decoder.config.get("scaling_factor")
        if factor != UPSCALER_SCALING_FACTOR:
            logger.warning("sdort: the VAE config's scaling_factor is %s; StableDiffusionUpscalePipeline uses "
                           "%s, as diffusers does", factor, UPSCALER_SCALING_FACTOR)
        if "class_labels" not in self.unet.inputs:
            raise ValueError("'unet': this UNet has no 'class_labels' input (the noise level); export an x4 "
                             "upscaler with sd-export, whose UNet config sets num_class_embeds")

    @classmethod
    def from_pretrained(cls, path, provider: str = "auto", session_options=None, precision: str = "fp32",
                        **overrides):
        """Load an exported x4 upscaler: the parts, and the low_res_scheduler/ config besides scheduler/."""
        if "low_res_scheduler" not in overrides:
            folder = Path(path) / "low_res_scheduler"
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: missing; the x4 upscaler noises its input with this scheduler")
            overrides["low_res_scheduler"] = load_scheduler(folder)
        overrides.setdefault("requires_safety_checker", False)  # see __init__
        return super().from_pretrained(path, provider=provider, session_options=session_options, precision=precision,
                                       **overrides)

    def unscale_latents(self, latents: np.ndarray) -> np.ndarray:
        return latents / np.float32(UPSCALER_SCALING_FACTOR)

    def check_noise_level(self, noise_level) -> None:
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)):
            raise ValueError(f"noise_level must be an integer; got {noise_level!r}")
        if not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"noise_level must be in [0, {self.max_noise_level}] (max_noise_level); got {noise_level}")

    def noised_low_res_image(self, image: np.ndarray, noise_level: int, generator) -> np.ndarray:
        """The low-res image noised to `noise_level` by the low_res_scheduler, with noise drawn from
        `generator` first (one draw per image: with a list of generators, the first ones)."""
        if isinstance(generator, list):
            generator = generator[:image.shape[0]]
        noise = randn_tensor(image.shape, generator=generator, dtype=self.unet.inputs["sample"].dtype)
        return self.low_res_scheduler.add_noise(image, noise.astype(np.float32), np.array([noise_level]))

    def __call__(
        self,
        prompt=None,
        image=None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        noise_level: int = 20,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        """Upscale `image` (PIL, numpy HWC/NHWC in [0, 1], or a list; one per prompt) four times.

        `callback(step, timestep, latents)` every `callback_steps` steps, as diffusers; sdort also
        takes `callback_on_step_end` as its other pipelines do."""
        # 1. check inputs
        if image is None:
            raise ValueError("image: an input image is required")
        check_callback_steps(callback_steps)
        self.check_noise_level(noise_level)
        total, generator = self.check_inputs(
            prompt, None, None, num_inference_steps, guidance_scale, num_images_per_prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        batch = total // num_images_per_prompt
        check_image_batch(image, batch)

        # 2. encode the prompt
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)

        # 3. the low-res image, in [-1, 1]
        image = self.preprocess_image(image)
        if image.shape[1] != 3:
            raise ValueError(f"image: a {image.shape[1]}-channel image; the x4 upscaler takes RGB images")
        height, width = image.shape[2:]
        if self.vae_tiling is None:
            self.check_fits_in_memory(total, height * self.vae_scale_factor, width * self.vae_scale_factor)

        # 4. the schedule
        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps

        # 5. noise the image (before the latents: diffusers draws in this order) and tile it as
        # diffusers' cat([image] * (2 if guidance) * num_images_per_prompt): a, b, a, b, ...
        image = self.noised_low_res_image(image, noise_level, generator)
        copies = 2 if do_cfg else 1
        conditioning = np.concatenate([image] * (copies * num_images_per_prompt))
        class_labels = np.full((conditioning.shape[0],), noise_level, dtype=np.int64)

        # 6. the latents, at the low-res image's size
        channels = self.vae_decoder.config.get("latent_channels", 4)
        latents = self.prepare_latents((total, channels, height, width), generator, latents, scheduler)

        # 7. the denoising loop
        after_step = legacy_callback(callback, callback_steps, timesteps, num_inference_steps,
                                     getattr(scheduler, "order", 1))
        latents = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None, guidance_scale,
            generator=generator, eta=eta, conditioning=conditioning, added_inputs={"class_labels": class_labels},
            after_step=after_step, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 8. decode to four times the size
        images, has_nsfw = self.decode(latents, output_type, return_nsfw=True)
        if not return_dict:
            return (images, has_nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)
