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
from .base import DiffusionPipeline, StableDiffusionPipelineOutput, retrieve_timesteps, tile_to_batch
from .checks import check_common_inputs, check_strength
from ..randomness import randn_tensor

# Those the shared loop itself hands to callbacks; the mask ones are added here.
_LOOP_TENSOR_INPUTS = DiffusionPipeline.callback_tensor_inputs


def _first(generator, count: int):
    """The generators for `count` encoded images: diffusers encodes image i with generator i."""
    return generator[:count] if isinstance(generator, list) else generator


class StableDiffusionInpaintPipeline(DiffusionPipeline):
    """Inpainting with diffusers' parameters, defaults and output; 9-channel inpainting UNets and
    ordinary 4-channel ones."""

    required_parts = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    optional_parts = ()
    conditioning_channels = (0, 5)  # 4-channel UNet, or 9: + mask + masked image latents
    callback_tensor_inputs = (*DiffusionPipeline.callback_tensor_inputs, "mask", "masked_image_latents")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    # ---- inputs ----------------------------------------------------------------------------

    def check_inpaint_inputs(self, image, mask_image, padding_mask_crop, output_type,
                             callback_on_step_end_tensor_inputs):
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
        self.check_callback_tensor_inputs(callback_on_step_end_tensor_inputs)

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
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        # As diffusers, the size defaults to the UNet's, not the image's.
        height, width = self.default_size(height, width)
        self.check_inpaint_inputs(image, mask_image, padding_mask_crop, output_type, callback_on_step_end_tensor_inputs)
        check_strength(strength)
        batch = check_common_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                                    negative_prompt, prompt_embeds, negative_prompt_embeds, output_type)
        self.check_unet_kind()
        in_channels = self.unet_in_channels
        if in_channels is None:
            raise ValueError("unet: cannot tell its number of input channels (no config.json, dynamic 'sample' shape)")
        total = batch * num_images_per_prompt
        generator = self.check_generator(generator, total)
        latent_shape = self.latent_shape(total, height, width)
        if latents is not None and np.shape(latents) != tuple(latent_shape):
            raise ValueError(f"latents: expected shape {tuple(latent_shape)}, got {np.shape(latents)}")

        # The mask first: a bad one fails before any model runs (and before the crop region,
        # which has no meaning for a mask without any white pixel).
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
        # Counts that cannot be spread over the batch fail here, before any model runs.
        tile_to_batch(mask_condition, total, "mask_image")
        tile_to_batch(init_image, total, "image")
        latent_hw = tuple(latent_shape[2:])
        latent_channels = latent_shape[1]
        if masked_image_latents is not None:
            masked_image_latents = np.asarray(masked_image_latents, dtype=np.float32)
            if masked_image_latents.ndim != 4 or masked_image_latents.shape[1:] != (latent_channels, *latent_hw):
                raise ValueError(f"masked_image_latents: expected shape (k, {latent_channels}, {latent_hw[0]}, "
                                 f"{latent_hw[1]}) with k dividing the batch of {total}; "
                                 f"got {masked_image_latents.shape}")
            tile_to_batch(masked_image_latents, total, "masked_image_latents")

        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds)

        scheduler = self.fresh_scheduler(self.scheduler)
        num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
        if min(int(num_inference_steps * strength), num_inference_steps) < 1:
            raise ValueError(f"strength: {strength} with {num_inference_steps} steps leaves no step to run")
        timesteps = self.strength_timesteps(scheduler, num_inference_steps, strength)
        is_strength_max = strength == 1.0

        # Draw 1: the image's VAE sample, when the image latents are needed. As diffusers, image i
        # is sampled with generator i, and the latents are then tiled to the batch.
        noise_dtype = self.unet.inputs["sample"].dtype
        image_latents = None
        if in_channels == 4 or (latents is None and not is_strength_max):
            image_latents = tile_to_batch(self.encode_image(init_image, _first(generator, init_image.shape[0])), total,
                                    "image")
        # Draw 2: the noise (or the given latents, which diffusers then uses as noise at any strength).
        if latents is None:
            noise = randn_tensor(latent_shape, generator=generator, dtype=noise_dtype).astype(np.float32)
            if is_strength_max:
                latents = noise * np.float32(scheduler.init_noise_sigma)
            else:
                latents = scheduler.add_noise(image_latents, noise, np.repeat(timesteps[:1], total))
        else:
            noise = np.asarray(latents, dtype=np.float32)
            latents = noise * np.float32(scheduler.init_noise_sigma)
        latents = np.asarray(latents, dtype=np.float32)

        # Draw 3: the masked image's VAE sample (unless its latents were given).
        if masked_image_latents is None:
            masked_image = init_image * (mask_condition < 0.5)
            masked_image_latents = self.encode_image(masked_image, _first(generator, masked_image.shape[0]))
        masked_image_latents = tile_to_batch(masked_image_latents.astype(np.float32), total, "masked_image_latents")
        # The mask at latent resolution: torch's nearest-neighbour interpolation.
        mask = self.mask_processor.resize(mask_condition.transpose(0, 2, 3, 1), *latent_hw).transpose(0, 3, 1, 2)
        mask = tile_to_batch(np.ascontiguousarray(mask, dtype=np.float32), total, "mask_image")

        if in_channels == 9 and latent_channels + mask.shape[1] + masked_image_latents.shape[1] != 9:
            raise ValueError(f"unet: takes 9 input channels, but latents ({latent_channels}) + mask ({mask.shape[1]}) "
                             f"+ masked_image_latents ({masked_image_latents.shape[1]}) make "
                             f"{latent_channels + mask.shape[1] + masked_image_latents.shape[1]}")

        # What callbacks see of the mask: the UNet's batch (doubled with guidance), as in diffusers.
        state = {
            "mask": np.concatenate([mask, mask]) if do_cfg else mask,
            "masked_image_latents":
                np.concatenate([masked_image_latents] * 2) if do_cfg else masked_image_latents,
        }

        after_step = None
        if in_channels == 4:
            def after_step(i, t, current):
                # Keep the known region: the image latents at the noise level of the next step.
                known = image_latents
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(image_latents, noise, np.asarray([timesteps[i + 1]]))
                repaint = state["mask"][: current.shape[0]]  # the first half with guidance
                return (1 - repaint) * known + repaint * current

        callback = None
        loop_inputs = tuple(callback_on_step_end_tensor_inputs)
        if callback_on_step_end is not None:
            asked = loop_inputs
            loop_inputs = tuple(k for k in asked if k in _LOOP_TENSOR_INPUTS)

            def callback(pipe, i, t, tensors):
                tensors = dict(tensors)
                for name in ("mask", "masked_image_latents"):
                    if name in asked:
                        tensors[name] = state[name]
                changed = dict(callback_on_step_end(pipe, i, t, tensors) or {})
                replaced = False
                for name in ("mask", "masked_image_latents"):
                    if name in changed:
                        state[name] = np.asarray(changed.pop(name), dtype=np.float32)
                        replaced = True
                if replaced and in_channels == 9:  # the next UNet calls read the new channels
                    changed["conditioning"] = np.concatenate([state["mask"], state["masked_image_latents"]], axis=1)
                return changed

        latents = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None, guidance_scale,
            generator=generator, eta=eta,
            conditioning=np.concatenate([mask, masked_image_latents], axis=1) if in_channels == 9 else None,
            after_step=after_step, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=loop_inputs,
        )
        images = self.decode(latents, output_type)
        if padding_mask_crop is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, generated, crops_coords)
                      for generated in images]
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images, None)
