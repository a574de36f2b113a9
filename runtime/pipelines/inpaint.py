"""Inpainting: diffusers' `StableDiffusionInpaintPipeline` on ONNX Runtime.

What it adds to the shared loop:

* the first latents: pure noise at `strength=1.0`, otherwise the encoded image noised to where
  the shortened schedule starts (as image-to-image);
* a mask (white = repaint) and the latents of the masked image. A 9-channel inpainting UNet
  reads them as 5 extra input channels (`conditioning`); an ordinary 4-channel UNet does not,
  and the known region is put back after every step instead (`after_step`): the encoded image,
  noised to the next timestep with the same noise the latents started from;
* `padding_mask_crop`: only the masked area (with that margin) is generated, at full resolution,
  and pasted back over the untouched original.

Random numbers are drawn in diffusers' order and shapes, so a seeded call gives diffusers' image:
the VAE sample of the image (when it is needed), then the initial noise, then the VAE sample of
the masked image, then whatever the scheduler draws.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..image_processor import VaeImageProcessor
from ..randomness import randn_tensor
from .base import TextConditionedPipeline, StableDiffusionPipelineOutput, retrieve_timesteps, tile_to_batch
from .checks import check_strength
from .guidance_embedding import guidance_inputs
from .safety_checker import SafetyCheckedPipeline

# The tensors this task adds to what callbacks may read and replace.
MASK_TENSOR_INPUTS = ("mask", "masked_image_latents")


def _first(generator, count: int):
    """The generators for `count` encoded images: diffusers encodes image i with generator i."""
    return generator[:count] if isinstance(generator, list) else generator


class InpaintStages:
    """The stages inpainting adds to a pipeline (SD's and SDXL's): mask and image preparation, the
    first latents, and the loop's masked-region handling; mixed into a pipeline class."""

    conditioning_channels = (0, 5)  # 4-channel UNet, or 9: + mask + masked image latents

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    # ---- inputs ----------------------------------------------------------------------------

    @staticmethod
    def check_inpaint_inputs(image, mask_image, padding_mask_crop, output_type):
        if image is None:
            raise ValueError("image: an input image is required")
        if mask_image is None:
            raise ValueError("mask_image: a mask is required (white = repaint, black = keep)")
        if padding_mask_crop is not None:
            if isinstance(padding_mask_crop, bool) or not isinstance(padding_mask_crop, (int, np.integer)) \
                    or padding_mask_crop < 0:
                raise ValueError(f"padding_mask_crop must be an integer >= 0 (pixels); got {padding_mask_crop!r}")
            if not isinstance(image, Image.Image):
                raise ValueError(f"image: padding_mask_crop needs a PIL image; got {type(image).__name__}")
            if not isinstance(mask_image, Image.Image):
                raise ValueError(f"mask_image: padding_mask_crop needs a PIL image; got {type(mask_image).__name__}")
            if output_type != "pil":
                raise ValueError(f"output_type must be 'pil' with padding_mask_crop; got {output_type!r}")

    @staticmethod
    def check_mask(mask: np.ndarray) -> None:
        """Every mask must keep something and repaint something (binarized NCHW masks)."""
        for i, item in enumerate(mask):
            if not item.any():
                raise ValueError(f"mask_image: mask {i} is all black: nothing would be repainted "
                                 f"(white pixels are repainted, black ones kept)")
            if item.all():
                raise ValueError(f"mask_image: mask {i} is all white: nothing of the image would be kept; "
                                 f"use StableDiffusionPipeline (text-to-image) to generate a whole image")

    # ---- stages of the call -----------------------------------------------------------------

    def prepare_mask_and_image(self, image, mask_image, height, width, padding_mask_crop, total):
        """The binarized mask and the image in [-1, 1] at (height, width), NCHW, and the crop box.

        The mask first: a bad one fails before any model runs (and before the crop region, which
        has no meaning for a mask without any white pixel). Counts that cannot be spread over the
        batch fail here too."""
        if padding_mask_crop is not None:
            self.check_mask(self.preprocess_image(mask_image, "mask_image", self.mask_processor))
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        else:
            crops_coords, resize_mode = None, "default"
        mask_condition = self.preprocess_image(mask_image, "mask_image", self.mask_processor, height=height,
                                               width=width, resize_mode=resize_mode, crops_coords=crops_coords)
        self.check_mask(mask_condition)
        init_image = self.preprocess_image(image, "image", height=height, width=width,
                                           resize_mode=resize_mode, crops_coords=crops_coords)
        # Image and mask of different sizes are both resized to (height, width), as in diffusers.
        if init_image.shape[0] != mask_condition.shape[0] and 1 not in (init_image.shape[0], mask_condition.shape[0]):
            raise ValueError(f"mask_image: {mask_condition.shape[0]} masks for {init_image.shape[0]} images; "
                             f"pass one mask, or one per image")
        tile_to_batch(mask_condition, total, "mask_image")
        tile_to_batch(init_image, total, "image")
        return mask_condition, init_image, crops_coords

    @staticmethod
    def check_masked_image_latents(masked_image_latents, latent_shape, total):
        if masked_image_latents is None:
            return None
        masked_image_latents = np.asarray(masked_image_latents, dtype=np.float32)
        channels, hw = latent_shape[1], tuple(latent_shape[2:])
        if masked_image_latents.ndim != 4 or masked_image_latents.shape[1:] != (channels, *hw):
            raise ValueError(f"masked_image_latents: expected shape (k, {channels}, {hw[0]}, {hw[1]}) with k "
                             f"dividing the batch of {total}; got {masked_image_latents.shape}")
        tile_to_batch(masked_image_latents, total, "masked_image_latents")
        return masked_image_latents

    def initial_latents(self, init_image, latents, latent_shape, generator, scheduler, timesteps, strength,
                        needs_image_latents, add_noise: bool = True):
        """The first latents, the noise they were made with, and the image latents (or None).

        Random draws in diffusers' order: the image's VAE sample when the image latents are needed
        (image i with generator i, then tiled to the batch), then the noise — or the given
        `latents`, which diffusers then uses as the noise at any strength. Without `add_noise`
        (SDXL's `denoising_start`: a refiner continuing) the noise is drawn and the image latents
        are the first latents."""
        total = latent_shape[0]
        image_latents = None
        if needs_image_latents or not add_noise:
            image_latents = tile_to_batch(self.encode_image(init_image, _first(generator, init_image.shape[0])),
                                          total, "image")
        if latents is not None and add_noise:
            noise = np.asarray(latents, dtype=np.float32)
            return noise * np.float32(scheduler.init_noise_sigma), noise, image_latents
        noise = randn_tensor(latent_shape, generator=generator, dtype=self.unet.inputs["sample"].dtype)
        noise = noise.astype(np.float32)
        if not add_noise:
            return image_latents, noise, image_latents
        if strength == 1.0:
            return noise * np.float32(scheduler.init_noise_sigma), noise, image_latents
        noised = scheduler.add_noise(image_latents, noise, np.repeat(timesteps[:1], total))
        return np.asarray(noised, dtype=np.float32), noise, image_latents

    def mask_latents(self, mask_condition, init_image, masked_image_latents, latent_shape, generator):
        """The mask at latent resolution (torch's nearest-neighbour interpolation) and the masked
        image's latents (its VAE sample, the third draw, unless they were given), tiled to the batch."""
        total, hw = latent_shape[0], tuple(latent_shape[2:])
        if masked_image_latents is None:
            masked_image = init_image * (mask_condition < 0.5)
            masked_image_latents = self.encode_image(masked_image, _first(generator, masked_image.shape[0]))
        masked_image_latents = tile_to_batch(masked_image_latents.astype(np.float32), total, "masked_image_latents")
        mask = self.mask_processor.resize(mask_condition.transpose(0, 2, 3, 1), *hw).transpose(0, 3, 1, 2)
        mask = tile_to_batch(np.ascontiguousarray(mask, dtype=np.float32), total, "mask_image")
        return mask, masked_image_latents

    def denoise_masked(self, latents, noise, image_latents, mask, masked_image_latents, timesteps, scheduler,
                       nine_channels: bool, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale=0.0,
                       added_inputs=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                       **loop_kwargs):
        """The shared loop with the mask: as conditioning channels of a 9-channel UNet, or, with a
        4-channel one, the known region put back after every step; callbacks may read and replace
        `mask` and `masked_image_latents`."""
        do_cfg = negative_prompt_embeds is not None
        region = _MaskedRegion(mask, masked_image_latents, do_cfg, nine_channels)
        known = None if nine_channels else _KnownRegion(region, image_latents, noise, timesteps, scheduler)
        callback = None
        loop_inputs = tuple(callback_on_step_end_tensor_inputs)
        if callback_on_step_end is not None:
            callback = _MaskCallback(region, callback_on_step_end, loop_inputs)
            loop_inputs = tuple(k for k in loop_inputs if k not in MASK_TENSOR_INPUTS)
        return self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale,
            conditioning=np.concatenate([mask, masked_image_latents], axis=1) if nine_channels else None,
            added_inputs=added_inputs, after_step=known, callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=loop_inputs, **loop_kwargs,
        )

    def check_nine_channels(self, latent_shape, mask, masked_image_latents) -> None:
        total = latent_shape[1] + mask.shape[1] + masked_image_latents.shape[1]
        if total != 9:
            raise ValueError(f"unet: takes 9 input channels, but latents ({latent_shape[1]}) + mask ({mask.shape[1]}) "
                             f"+ masked_image_latents ({masked_image_latents.shape[1]}) make {total}")

    def unet_kind(self) -> bool:
        """Whether the UNet is a 9-channel inpainting one (else an ordinary 4-channel one)."""
        self.check_unet_kind()
        if self.unet_in_channels is None:
            raise ValueError("unet: cannot tell its number of input channels (no config.json, dynamic 'sample' shape)")
        return self.unet_in_channels == 9


class StableDiffusionInpaintPipeline(SafetyCheckedPipeline, InpaintStages, TextConditionedPipeline):
    """Inpainting with diffusers' parameters, defaults and output; 9-channel inpainting UNets and
    ordinary 4-channel ones."""

    required_parts = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    optional_parts = ()
    callback_tensor_inputs = (*TextConditionedPipeline.callback_tensor_inputs, *MASK_TENSOR_INPUTS)

    # ---- the call --------------------------------------------------------------------------

    def __call__(
        self,
        prompt=None,
        image=None,
        mask_image=None,
        masked_image_latents=None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
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
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        # 1. Check the inputs (the size defaults to the UNet's, not the image's, as in diffusers).
        height, width = self.default_size(height, width)
        self.check_inpaint_inputs(image, mask_image, padding_mask_crop, output_type)
        check_strength(strength)
        total, generator = self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        nine_channels = self.unet_kind()
        latent_shape = self.latent_shape(total, height, width)
        if latents is not None and np.shape(latents) != tuple(latent_shape):
            raise ValueError(f"latents: expected shape {tuple(latent_shape)}, got {np.shape(latents)}")
        mask_condition, init_image, crops_coords = self.prepare_mask_and_image(
            image, mask_image, height, width, padding_mask_crop, total)
        masked_image_latents = self.check_masked_image_latents(masked_image_latents, latent_shape, total)

        # 2. Encode the prompt.
        do_cfg = self.uses_classifier_free_guidance(guidance_scale)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)

        # 3. The schedule, shortened by strength.
        scheduler = self.fresh_scheduler(self.scheduler)
        num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
        if min(int(num_inference_steps * strength), num_inference_steps) < 1:
            raise ValueError(f"strength: {strength} with {num_inference_steps} steps leaves no step to run")
        timesteps = self.strength_timesteps(scheduler, num_inference_steps, strength)

        # 4. Latents, mask and masked image latents, drawing random numbers in diffusers' order.
        needs_image_latents = not nine_channels or (latents is None and strength != 1.0)
        latents, noise, image_latents = self.initial_latents(
            init_image, latents, latent_shape, generator, scheduler, timesteps, strength, needs_image_latents)
        mask, masked_image_latents = self.mask_latents(
            mask_condition, init_image, masked_image_latents, latent_shape, generator)
        if nine_channels:
            self.check_nine_channels(latent_shape, mask, masked_image_latents)

        # 5. Denoise: a 9-channel UNet reads mask and masked image as extra channels; with a
        # 4-channel one the known region is put back after every step.
        latents = self.denoise_masked(
            latents, noise, image_latents, mask, masked_image_latents, timesteps, scheduler, nine_channels,
            prompt_embeds, negative_prompt_embeds if do_cfg else None, guidance_scale, generator=generator, eta=eta,
            added_inputs=guidance_inputs(self.unet, guidance_scale, total), callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)

        # 6. Decode, and paste a padding_mask_crop region back over the original.
        images, has_nsfw = self.decode(latents, output_type, return_nsfw=True)
        if padding_mask_crop is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, generated, crops_coords)
                      for generated in images]
        if not return_dict:
            return (images, has_nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)


class _MaskedRegion:
    """The mask and the masked image's latents as the UNet batch sees them (doubled with guidance,
    as diffusers hands them to callbacks); callbacks may replace them."""

    def __init__(self, mask, masked_image_latents, do_cfg: bool, nine_channels: bool):
        twice = (lambda a: np.concatenate([a, a])) if do_cfg else (lambda a: a)
        self.tensors = {"mask": twice(mask), "masked_image_latents": twice(masked_image_latents)}
        self.nine_channels = nine_channels

    def conditioning(self) -> np.ndarray:
        """The UNet batch's extra channels (doubled with guidance), after a callback replaced them."""
        return np.concatenate([self.tensors["mask"], self.tensors["masked_image_latents"]], axis=1)


class _KnownRegion:
    """After each step with a 4-channel UNet: keep the known region, as diffusers does — the image
    latents at the noise level of the next step outside the mask, the sampler's latents inside."""

    def __init__(self, region: _MaskedRegion, image_latents, noise, timesteps, scheduler):
        self.region, self.image_latents, self.noise = region, image_latents, noise
        self.timesteps, self.scheduler = timesteps, scheduler

    def __call__(self, i, t, current):
        known = self.image_latents
        if i < len(self.timesteps) - 1:
            known = self.scheduler.add_noise(self.image_latents, self.noise, np.asarray([self.timesteps[i + 1]]))
        repaint = self.region.tensors["mask"][: current.shape[0]]  # the first half with guidance
        return (1 - repaint) * known + repaint * current


class _MaskCallback:
    """The user's `callback_on_step_end` with the mask tensors added to what it may read and
    replace; a replaced mask reaches the next UNet calls of a 9-channel model as new conditioning."""

    def __init__(self, region: _MaskedRegion, callback, asked):
        self.region, self.callback, self.asked = region, callback, asked

    def __call__(self, pipe, i, t, tensors):
        tensors = dict(tensors)
        for name in self.region.tensors:
            if name in self.asked:
                tensors[name] = self.region.tensors[name]
        changed = dict(self.callback(pipe, i, t, tensors) or {})
        replaced = [name for name in self.region.tensors if name in changed]
        for name in replaced:
            self.region.tensors[name] = np.asarray(changed.pop(name), dtype=np.float32)
        if replaced and self.region.nine_channels:
            changed["conditioning"] = self.region.conditioning()
        return changed
