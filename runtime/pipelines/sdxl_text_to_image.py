"""Text-to-image with SDXL: diffusers' `StableDiffusionXLPipeline` on ONNX Runtime."""

from __future__ import annotations

from .base import retrieve_timesteps
from .sdxl import StableDiffusionXLPipelineOutput, XLConditionedPipeline, check_pair, end_timesteps


class StableDiffusionXLPipeline(XLConditionedPipeline):
    """SDXL text-to-image with diffusers' parameters, defaults and output; `denoising_end` stops part-way
    and (with `output_type="latent"`) hands the latents to the refiner."""

    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        negative_prompt_2=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=(0, 0),
        negative_target_size=None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        # 1. Check the inputs.
        height, width = self.default_size(height, width)
        total, generator = self.check_inputs(
            prompt, prompt_2, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
            negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        self.check_denoising_fractions(None, denoising_end)
        original_size = check_pair("original_size", original_size) or (height, width)
        target_size = check_pair("target_size", target_size) or (height, width)
        crop = check_pair("crops_coords_top_left", crops_coords_top_left)
        negative_original_size = check_pair("negative_original_size", negative_original_size)
        negative_target_size = check_pair("negative_target_size", negative_target_size)
        negative_crop = check_pair("negative_crops_coords_top_left", negative_crops_coords_top_left)

        # 2. Encode the prompts.
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)

        # 3. The schedule, cut at denoising_end.
        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
        timesteps = end_timesteps(scheduler, scheduler.timesteps, denoising_end)
        scheduler.set_begin_index(0)

        # 4. Latents and the micro-conditioning.
        latents = self.prepare_latents(self.latent_shape(total, height, width), generator, latents, scheduler)
        add_time_ids = self.time_ids(original_size, crop, target_size)
        self.check_time_ids(add_time_ids.shape[1], self.text_embeds_dim(pooled))
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self.time_ids(negative_original_size, negative_crop, negative_target_size)
        added = self.added_inputs(pooled, negative_pooled, add_time_ids, negative_add_time_ids, total,
                                  interleaved=True)

        # 5. Denoise.
        latents = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale,
            generator=generator, eta=eta, added_inputs=added, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 6. Decode.
        images = self.decode(latents, output_type)
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
