"""Image-to-image: diffusers' `StableDiffusionImg2ImgPipeline` on ONNX Runtime.

What it adds to the shared loop: the schedule starts part-way (`strength`), and the first latents
are the encoded image noised to that point.
"""

from __future__ import annotations

from .base import TextConditionedPipeline, StableDiffusionPipelineOutput, retrieve_timesteps
from .checks import check_strength
from .guidance_embedding import guidance_inputs
from .safety_checker import SafetyCheckedPipeline


class StableDiffusionImg2ImgPipeline(SafetyCheckedPipeline, TextConditionedPipeline):
    """Image-to-image with diffusers' parameters, defaults and output."""

    required_parts = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    optional_parts = ()

    def __call__(
        self,
        prompt=None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        if image is None:
            raise ValueError("image: an input image is required")
        check_strength(strength)
        total, generator = self.check_inputs(
            prompt, None, None, num_inference_steps, guidance_scale, num_images_per_prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        do_cfg = self.uses_classifier_free_guidance(guidance_scale)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        image = self.preprocess_image(image)

        scheduler = self.fresh_scheduler(self.scheduler)
        num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
        timesteps = self.strength_timesteps(scheduler, num_inference_steps, strength)
        latents = self.noised_image_latents(image, total, generator, timesteps[:1], scheduler)
        latents = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None, guidance_scale,
            generator=generator, eta=eta, added_inputs=guidance_inputs(self.unet, guidance_scale, total),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images, has_nsfw = self.decode(latents, output_type, return_nsfw=True)
        if not return_dict:
            return (images, has_nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)
