"""Image variations: diffusers' `StableDiffusionImageVariationPipeline` on ONNX Runtime.

The model has no text encoder: the UNet's cross-attention reads the CLIP image embedding of the
input picture (one token, [B, 1, D]); the unconditional input for guidance is zeros. Otherwise
the text-to-image loop: noise, denoise, decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..feature_extractors import CLIPImageProcessor
from .base import OnnxDiffusionPipeline, StableDiffusionPipelineOutput, retrieve_timesteps
from .checks import check_generation_inputs
from .safety_checker import SafetyCheckedPipeline
from .step_callbacks import check_callback_steps, legacy_callback


def check_variation_inputs(image, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                           output_type, callback_steps) -> None:
    """diffusers' check_inputs and the common checks; each error names the parameter."""
    if image is None:
        raise ValueError("image: an input image is required")
    if not isinstance(image, (Image.Image, np.ndarray, list)):
        raise ValueError(f"image must be a PIL image, a numpy array or a list of them; got {type(image).__name__}")
    if isinstance(image, list) and not image:
        raise ValueError("image: the list is empty")
    check_generation_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type)
    check_callback_steps(callback_steps)


class StableDiffusionImageVariationPipeline(SafetyCheckedPipeline, OnnxDiffusionPipeline):
    """Variations of an image, with diffusers' parameters, defaults and output.

    Parts: `image_encoder` (CLIP vision model with projection: pixel_values -> image_embeds),
    `unet`, `vae_decoder`; `feature_extractor/preprocessor_config.json` configures the CLIP
    preprocessing (transformers' CLIPImageProcessor defaults when absent). No text encoder or
    tokenizer: prompts do not exist here.
    """

    required_parts = ("image_encoder", "unet", "vae_decoder")
    optional_parts = ()
    # diffusers' image-variation pipeline leaves the scheduler config as it is.
    legacy_scheduler_fix = False

    def __init__(self, unet, vae_decoder, scheduler, image_encoder=None, feature_extractor=None,
                 vae_encoder=None, **extra_parts):
        super().__init__(unet, vae_decoder, scheduler, vae_encoder,
                         image_encoder=image_encoder,
                         feature_extractor=feature_extractor if feature_extractor is not None else CLIPImageProcessor(),
                         **extra_parts)

    @classmethod
    def from_pretrained(cls, path, provider: str = "auto", session_options=None, precision: str = "fp32",
                        **overrides):
        """Load an exported image-variation model (no tokenizer folder needed)."""
        if "feature_extractor" not in overrides:
            config = Path(path) / "feature_extractor" / "preprocessor_config.json"
            overrides["feature_extractor"] = CLIPImageProcessor.from_pretrained(config) if config.is_file() else None
        return super().from_pretrained(path, provider=provider, session_options=session_options, precision=precision,
                                       **overrides)

    @staticmethod
    def _is_pixel_values(image) -> bool:
        # As diffusers takes a tensor for already preprocessed input: an NCHW float array, 3 channels.
        return (isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == 3
                and np.issubdtype(image.dtype, np.floating))

    def encode_image_embeddings(self, image, num_images_per_prompt: int, do_classifier_free_guidance: bool):
        """CLIP image embeddings [B * n, 1, D] (each image n times in a row) and, with guidance, the
        unconditional zeros of the same shape; diffusers' `_encode_image`.

        `image`: PIL image(s) or numpy HWC/NHWC images, preprocessed by the feature extractor; or an
        NCHW float array of `pixel_values` already preprocessed, used as it is.
        """
        if self._is_pixel_values(image):
            pixel_values = image
        else:
            single = isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim < 4)
            pixel_values = self.feature_extractor([image] if single else list(image))
        embeds = self.image_encoder(pixel_values=pixel_values)["image_embeds"].astype(np.float32)
        embeds = np.repeat(embeds[:, None, :], num_images_per_prompt, axis=0)
        negative = np.zeros_like(embeds) if do_classifier_free_guidance else None
        return embeds, negative

    def __call__(
        self,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
    ):
        """As diffusers: `image` is a PIL image, a list of them, or numpy images (HWC/NHWC, uint8 or
        floats in [0, 1]); an NCHW float array is taken as CLIP `pixel_values`, as diffusers takes a
        tensor. `callback(step, timestep, latents)` is called every `callback_steps` steps."""
        height, width = self.default_size(height, width)
        check_variation_inputs(image, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                               output_type, callback_steps)
        do_cfg = guidance_scale > 1
        embeds, negative = self.encode_image_embeddings(image, num_images_per_prompt, do_cfg)
        total = embeds.shape[0]
        generator = self.check_generator(generator, total)

        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        latents = self.prepare_latents(self.latent_shape(total, height, width), generator, latents, scheduler)

        after_step = legacy_callback(callback, callback_steps, timesteps, num_inference_steps,
                                     getattr(scheduler, "order", 1))

        latents = self.denoise(latents, timesteps, scheduler, embeds, negative, guidance_scale,
                               generator=generator, eta=eta, after_step=after_step)
        images, has_nsfw = self.decode(latents, output_type, return_nsfw=True)
        if not return_dict:
            return (images, has_nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)
