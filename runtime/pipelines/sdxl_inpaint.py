"""Inpainting with SDXL: diffusers' `StableDiffusionXLInpaintPipeline` on ONNX Runtime.

SD's inpainting stages (`InpaintStages`: mask, masked image, the known region of a 4-channel UNet,
`padding_mask_crop`) on SDXL's conditioning, with `denoising_start` / `denoising_end` as in
image-to-image.
"""

from __future__ import annotations

import numpy as np

from .checks import check_strength
from .inpaint import MASK_TENSOR_INPUTS, InpaintStages
from .sdxl import StableDiffusionXLPipelineOutput, XLImagePipeline, end_timesteps


class StableDiffusionXLInpaintPipeline(InpaintStages, XLImagePipeline):
    """SDXL inpainting with diffusers' parameters, defaults and output; 9-channel and 4-channel UNets."""

    callback_tensor_inputs = (*XLImagePipeline.callback_tensor_inputs, *MASK_TENSOR_INPUTS)

    def scale_latents(self, sample: np.ndarray) -> np.ndarray:
        """diffusers' SDXL inpainting encodes with `scaling_factor` alone, without the VAE's latents
        mean and std that its image-to-image applies."""
        return sample * np.float32(self.vae_decoder.config.get("scaling_factor", 0.13025))

    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        image=None,
        mask_image=None,
        masked_image_latents=None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        # 1. Check the inputs (the size defaults to the UNet's, not the image's, as in diffusers).
        height, width = self.default_size(height, width)
        self.check_inpaint_inputs(image, mask_image, padding_mask_crop, output_type)
        check_strength(strength)
        self.check_denoising_fractions(denoising_start, denoising_end)
        total, generator = self.check_inputs(
            prompt, prompt_2, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
            negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        nine_channels = self.unet_kind()
        latent_shape = self.latent_shape(total, height, width)
        if latents is not None and np.shape(latents) != tuple(latent_shape):
            raise ValueError(f"latents: expected shape {tuple(latent_shape)}, got {np.shape(latents)}")
        mask_condition, init_image, crops_coords = self.prepare_mask_and_image(
            image, mask_image, height, width, padding_mask_crop, total)
        masked_image_latents = self.check_masked_image_latents(masked_image_latents, latent_shape, total)

        # 2. Encode the prompts.
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)

        # 3. The schedule: from denoising_start, or shortened by strength; cut at denoising_end below.
        scheduler = self.fresh_scheduler(self.scheduler)
        timesteps = self.schedule(scheduler, num_inference_steps, timesteps, sigmas, strength, denoising_start, None)

        # 4. Latents, mask and masked image latents, drawing random numbers in diffusers' order.
        add_noise = denoising_start is None
        needs_image_latents = not nine_channels or (latents is None and strength != 1.0)
        latents, noise, image_latents = self.initial_latents(
            init_image, latents, latent_shape, generator, scheduler, timesteps, strength, needs_image_latents,
            add_noise)
        mask, masked_image_latents = self.mask_latents(
            mask_condition, init_image, masked_image_latents, latent_shape, generator)
        if nine_channels:
            self.check_nine_channels(latent_shape, mask, masked_image_latents)
        add_time_ids, negative_add_time_ids = self.prepare_micro_conditioning(
            height, width, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size, aesthetic_score, negative_aesthetic_score, pooled)
        added = self.added_inputs(pooled, negative_pooled, add_time_ids, negative_add_time_ids, total)
        timesteps = end_timesteps(scheduler, timesteps, denoising_end)

        # 5. Denoise with the mask.
        latents = self.denoise_masked(
            latents, noise, image_latents, mask, masked_image_latents, timesteps, scheduler, nine_channels,
            prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale, added_inputs=added,
            generator=generator, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)

        # 6. Decode, and paste a padding_mask_crop region back over the original.
        images = self.decode(latents, output_type)
        if padding_mask_crop is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, generated, crops_coords)
                      for generated in images]
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
