"""Text-to-image: diffusers' `StableDiffusionPipeline` on ONNX Runtime."""

from __future__ import annotations

from .base import TextConditionedPipeline, StableDiffusionPipelineOutput, retrieve_timesteps
from .guidance_embedding import guidance_inputs
from .safety_checker import SafetyCheckedPipeline


class StableDiffusionPipeline(SafetyCheckedPipeline, TextConditionedPipeline):
    """Text-to-image, with diffusers' `StableDiffusionPipeline.__call__` parameters, defaults and output."""

    def __call__(
        self,
        prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        guidance_scale: float = 7.5,
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
        height, width = self.default_size(height, width)
        total, generator = self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        do_cfg = self.uses_classifier_free_guidance(guidance_scale)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)

        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
        scheduler.set_begin_index(0)
        latents = self.prepare_latents(self.latent_shape(total, height, width), generator, latents, scheduler)
        latents = self.denoise(
            latents, scheduler.timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None,
            guidance_scale, guidance_rescale, generator=generator, eta=eta,
            added_inputs=guidance_inputs(self.unet, guidance_scale, total),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images, has_nsfw = self.decode(latents, output_type, return_nsfw=True)
        if not return_dict:
            return (images, has_nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)
