"""Text to RGB and depth: diffusers' `StableDiffusionLDM3DPipeline` (Intel/ldm3d-4c) on ONNX Runtime.

The denoising is Stable Diffusion's text-to-image, unchanged; what differs is the VAE, whose decoder
gives RGB and depth together (4 channels: RGB + depth; 6: RGB + "RGB-like" depth), split by
`VaeImageProcessorLDM3D` into `LDM3DPipelineOutput.rgb` and `.depth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..image_processor_ldm3d import DEPTH_FORMATS, VaeImageProcessorLDM3D
from .base import TextConditionedPipeline, retrieve_timesteps
from .safety_checker import SafetyCheckedPipeline


@dataclass
class LDM3DPipelineOutput:
    """As diffusers': `rgb` (PIL list or NHWC float32 array), `depth` (16-bit "I;16" PIL list or NHW1
    float32 array) and the safety flags.

    `nsfw_content_detected`: one boolean per image when the model has a safety checker, else None.
    """

    rgb: object
    depth: object
    nsfw_content_detected: list | None = None


class StableDiffusionLDM3DPipeline(SafetyCheckedPipeline, TextConditionedPipeline):
    """Text to RGB and depth, with diffusers' `StableDiffusionLDM3DPipeline.__call__` parameters,
    defaults (49 steps, guidance 5.0) and output.

    `output_type` is "pil" or "np": diffusers' LDM3D image processor has no other (it fails on
    "latent" and "pt"), and sdort says so with a ValueError before any model runs.
    """

    callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_processor = VaeImageProcessorLDM3D(vae_scale_factor=self.vae_scale_factor)

    def __call__(
        self,
        prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 49,
        timesteps=None,
        sigmas=None,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type: StableDiffusionLDM3DPipeline gives 'pil' or 'np' (RGB and depth); "
                             f"got {output_type!r}")
        self.check_decoder_channels()
        height, width = self.default_size(height, width)
        total, generator = self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        # diffusers: no classifier-free guidance at guidance_scale <= 1
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)

        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
        scheduler.set_begin_index(0)
        latents = self.prepare_latents(self.latent_shape(total, height, width), generator, latents, scheduler)
        latents = self.denoise(
            latents, scheduler.timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None,
            guidance_scale, guidance_rescale, generator=generator, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        (rgb, depth), has_nsfw = self.decode(latents, output_type, return_nsfw=True)
        if not return_dict:
            return ((rgb, depth), has_nsfw)
        return LDM3DPipelineOutput(rgb=rgb, depth=depth, nsfw_content_detected=has_nsfw)

    def check_decoder_channels(self) -> None:
        """Refuse a VAE decoder that does not give RGB + depth (a plain SD model), before any model runs."""
        channels = self.vae_decoder.config.get("out_channels")
        if channels is None:
            shape = self.vae_decoder.outputs["sample"].shape if "sample" in self.vae_decoder.outputs else ()
            channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
        if channels is not None and channels not in DEPTH_FORMATS:
            raise ValueError(f"'vae_decoder': this model's VAE decodes {channels} channels; "
                             f"StableDiffusionLDM3DPipeline needs an LDM3D VAE (4: RGB + depth, or 6)")

    def checker_pil_images(self, image: np.ndarray) -> list:
        """The safety checker looks at the RGB images only, as diffusers' LDM3D `run_safety_checker`."""
        return self.image_processor.postprocess(image, output_type="pil")[0]
