"""Latent Consistency Models: diffusers' `LatentConsistencyModelPipeline` and
`LatentConsistencyModelImg2ImgPipeline` on ONNX Runtime.

What LCM adds to the shared loop:

- guidance only through the UNet's `timestep_cond` (the embedding of guidance_scale - 1, see
  `guidance_embedding.py`): no classifier-free batch and no negative prompt, as diffusers (the
  distilled model learnt guidance against the empty prompt);
- the schedule: `original_inference_steps` (the distillation schedule the steps are drawn from) and,
  for img2img, `strength`, both given to the LCM scheduler's `set_timesteps`;
- the result: the LCM scheduler's `denoised` output of the last step (the loop's `return_denoised`),
  which diffusers decodes instead of the latents.
"""

from __future__ import annotations

import inspect

import numpy as np

from .base import StableDiffusionPipelineOutput, TextConditionedPipeline
from .checks import check_strength
from .guidance_embedding import guidance_inputs, time_cond_proj_dim
from .safety_checker import SafetyCheckedPipeline


class _LatentConsistencyPipeline(SafetyCheckedPipeline, TextConditionedPipeline):
    """What both LCM tasks share: the checks, the prompt, the schedule, the loop and the decoding."""

    # diffusers' LCM pipelines leave the scheduler config as it is (no steps_offset correction).
    legacy_scheduler_fix = False
    callback_tensor_inputs = ("latents", "denoised", "prompt_embeds", "w_embedding")

    def check_lcm_inputs(self, prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                         prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs):
        """diffusers' `check_inputs` (and sdort's common checks); the effective batch and its generator(s).

        The UNet is checked here, not when the pipeline is built: as in diffusers, any pipeline may be
        built from another's `components`."""
        if time_cond_proj_dim(self.unet) is None:
            raise ValueError(f"'unet': {type(self).__name__} needs a UNet distilled for consistency (its config sets "
                             f"time_cond_proj_dim and its graph takes 'timestep_cond'), such as LCM-Dreamshaper's")
        return self.check_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                                 None, prompt_embeds, None, output_type, generator, callback_on_step_end_tensor_inputs)

    @staticmethod
    def set_schedule(scheduler, num_inference_steps, original_inference_steps, timesteps, strength=1.0):
        """The LCM scheduler's `set_timesteps` with the LCM pipelines' extra arguments (diffusers'
        `retrieve_timesteps(..., original_inference_steps=..., strength=...)`)."""
        if "original_inference_steps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"scheduler: the LCM pipelines need LCMScheduler; got {type(scheduler).__name__}")
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, original_inference_steps=original_inference_steps,
                                    strength=strength)
        else:
            scheduler.set_timesteps(num_inference_steps, original_inference_steps=original_inference_steps,
                                    strength=strength)
        return scheduler.timesteps

    def run(self, latents, timesteps, scheduler, prompt_embeds, guidance_scale, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs):
        """The loop with the guidance embedding as `timestep_cond`, then decoding of the last `denoised`."""
        added = guidance_inputs(self.unet, guidance_scale, latents.shape[0])
        denoised = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, None, guidance_scale, generator=generator,
            added_inputs=added, return_denoised=True, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images, has_nsfw = self.decode(denoised, output_type, return_nsfw=True)
        if not return_dict:
            return (images, has_nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)


class LatentConsistencyModelPipeline(_LatentConsistencyPipeline):
    """Text-to-image in a few steps with a consistency-distilled UNet, with diffusers'
    `LatentConsistencyModelPipeline.__call__` parameters (less IP-Adapter and cross-attention
    kwargs, which sdort has in no pipeline), defaults and output."""

    def __call__(
        self,
        prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps=None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator=None,
        latents=None,
        prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        height, width = self.default_size(height, width)
        total, generator = self.check_lcm_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
            output_type, generator, callback_on_step_end_tensor_inputs)
        prompt_embeds, _ = self.encode_prompt(prompt, num_images_per_prompt, False, None, prompt_embeds, None,
                                              clip_skip)
        scheduler = self.fresh_scheduler(self.scheduler)
        timesteps = self.set_schedule(scheduler, num_inference_steps, original_inference_steps, timesteps)
        latents = self.prepare_latents(self.latent_shape(total, height, width), generator, latents, scheduler)
        return self.run(latents, timesteps, scheduler, prompt_embeds, guidance_scale, generator, output_type,
                        return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs)


class LatentConsistencyModelImg2ImgPipeline(_LatentConsistencyPipeline):
    """Image-to-image in a few steps with a consistency-distilled UNet, with diffusers'
    `LatentConsistencyModelImg2ImgPipeline.__call__` parameters (less IP-Adapter and cross-attention
    kwargs), defaults and output. `strength` shortens the LCM scheduler's distillation schedule (its
    `set_timesteps(strength=...)`), and the image is noised to the first timestep left."""

    required_parts = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    optional_parts = ()

    def __call__(
        self,
        prompt=None,
        image=None,
        num_inference_steps: int = 4,
        strength: float = 0.8,
        original_inference_steps: int | None = None,
        timesteps=None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator=None,
        latents=None,
        prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        if image is None:
            raise ValueError("image: an input image is required")
        check_strength(strength)
        total, generator = self.check_lcm_inputs(
            prompt, None, None, num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
            output_type, generator, callback_on_step_end_tensor_inputs)
        prompt_embeds, _ = self.encode_prompt(prompt, num_images_per_prompt, False, None, prompt_embeds, None,
                                              clip_skip)
        image = self.preprocess_image(image)
        scheduler = self.fresh_scheduler(self.scheduler)
        timesteps = self.set_schedule(scheduler, num_inference_steps, original_inference_steps, timesteps, strength)
        if latents is None:
            latents = self.noised_image_latents(image, total, generator, timesteps[:1], scheduler)
        else:  # diffusers takes given latents as the loop's start, not noised again
            latents = np.asarray(latents, dtype=np.float32)
        return self.run(latents, timesteps, scheduler, prompt_embeds, guidance_scale, generator, output_type,
                        return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs)
