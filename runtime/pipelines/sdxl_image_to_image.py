"""Image-to-image with SDXL, and the refiner's half of a base → refiner run: diffusers'
`StableDiffusionXLImg2ImgPipeline` on ONNX Runtime.

With `denoising_start`, the schedule starts where the base stopped (`denoising_end` of
`StableDiffusionXLPipeline`) and `image` is the base's latents, taken as they are: no noise is
added, as in diffusers.
"""

from __future__ import annotations

from .checks import check_strength
from .sdxl import StableDiffusionXLPipelineOutput, XLImagePipeline


class StableDiffusionXLImg2ImgPipeline(XLImagePipeline):
    """SDXL image-to-image (and refiner) with diffusers' parameters, defaults and output."""

    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        image=None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        denoising_start: float | None = None,
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
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        # 1. Check the inputs.
        if image is None:
            raise ValueError("image: an input image (or the base's latents) is required")
        check_strength(strength)
        self.check_denoising_fractions(denoising_start, denoising_end)
        total, generator = self.check_inputs(
            prompt, prompt_2, None, None, num_inference_steps, guidance_scale, num_images_per_prompt,
            negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)

        # 2. Encode the prompts and the image.
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)
        image = self.preprocess_image(image)

        # 3. The schedule: from denoising_start, or shortened by strength; cut at denoising_end.
        scheduler = self.fresh_scheduler(self.scheduler)
        timesteps = self.schedule(scheduler, num_inference_steps, timesteps, sigmas, strength, denoising_start,
                                  denoising_end)

        # 4. The first latents: the image's, noised to the first timestep unless the schedule starts
        # part-way (a refiner continues the base's latents as they are); given `latents` win.
        if latents is None:
            if denoising_start is None:
                latents = self.noised_image_latents(image, total, generator, timesteps[:1], scheduler)
            else:
                latents = self.image_latents(image, total, generator)
        latents = self.check_latents(latents, total)
        height, width = (side * self.vae_scale_factor for side in latents.shape[2:])
        add_time_ids, negative_add_time_ids = self.prepare_micro_conditioning(
            height, width, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size, aesthetic_score, negative_aesthetic_score, pooled)
        added = self.added_inputs(pooled, negative_pooled, add_time_ids, negative_add_time_ids, total)

        # 5. Denoise.
        latents = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale,
            generator=generator, eta=eta, added_inputs=added, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 6. Decode.
        images = self.decode(latents, output_type)
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
