"""What the three SDXL pipelines share: two text encoders, pooled embeddings, the size/crop (or
aesthetic-score) micro-conditioning, and the split of one schedule between base and refiner.

Every SDXL task runs on the shared denoising loop of `base.py`: the pooled text embeddings and the
time ids reach the UNet as its `text_embeds` and `time_ids` inputs (`denoise(added_inputs=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .adapters import AdapterMixin
from .base import OnnxDiffusionPipeline, retrieve_timesteps
from .checks import check_common_inputs, check_finite
from .prompts import XLPromptEncoder


@dataclass
class StableDiffusionXLPipelineOutput:
    """As diffusers': `images` (PIL list, NHWC float32 array, or latents)."""

    images: object


def valid_fraction(value) -> bool:
    """diffusers' `denoising_value_valid`: a float strictly between 0 and 1 (anything else is ignored)."""
    return isinstance(value, float) and 0 < value < 1


def timestep_cutoff(scheduler, fraction: float) -> int:
    """The training timestep where `fraction` of the denoising is done (diffusers' `discrete_timestep_cutoff`)."""
    train_steps = scheduler.config.get("num_train_timesteps", 1000)
    return int(round(train_steps - fraction * train_steps))


def end_timesteps(scheduler, timesteps, denoising_end):
    """The timesteps before `denoising_end` (the base's share of a base → refiner run), as diffusers."""
    if denoising_end is None or not valid_fraction(denoising_end):
        return timesteps
    cutoff = timestep_cutoff(scheduler, denoising_end)
    count = int(np.sum(np.asarray(timesteps) >= cutoff))
    if count == 0:
        raise ValueError(f"denoising_end: {denoising_end} leaves no step to run")
    return timesteps[:count]


def start_timesteps(scheduler, denoising_start: float):
    """The timesteps from `denoising_start` on (the refiner's share), setting the scheduler's begin
    index; a second-order scheduler is never cut between its two evaluations (diffusers' `get_timesteps`)."""
    cutoff = timestep_cutoff(scheduler, denoising_start)
    count = int(np.sum(np.asarray(scheduler.timesteps) < cutoff))
    if scheduler.order == 2 and count % 2 == 0:
        count += 1
    start = len(scheduler.timesteps) - count
    scheduler.set_begin_index(start)
    timesteps = scheduler.timesteps[start:]
    if len(timesteps) == 0:
        raise ValueError(f"denoising_start: {denoising_start} leaves no step to run")
    return timesteps


def check_pair(name: str, value) -> tuple | None:
    """A (height, width) or (top, left) pair of numbers, or None."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of integers (height, width) or (top, left); got {value!r}")
    for item in value:
        check_finite(name, item)
    return tuple(value)


class XLConditionedPipeline(AdapterMixin, OnnxDiffusionPipeline):
    """Base of the SDXL pipelines: `text_encoder` (optional: the refiner has none) and `text_encoder_2`,
    their tokenizers, and the micro-conditioning of SDXL's UNet."""

    required_parts = ("text_encoder_2", "unet", "vae_decoder")
    optional_parts = ("text_encoder", "vae_encoder")
    callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")
    config_names = ("force_zeros_for_empty_prompt",)
    # diffusers' SDXL pipelines do not rewrite old scheduler configs.
    legacy_scheduler_fix = False

    def __init__(self, text_encoder_2, tokenizer_2, unet, vae_decoder, scheduler, vae_encoder=None, text_encoder=None,
                 tokenizer=None, force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False,
                 **extra_parts):
        super().__init__(unet, vae_decoder, scheduler, vae_encoder, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, **extra_parts)
        if text_encoder is not None and tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs the 'tokenizer' of its 'text_encoder'")
        pairs = [(tokenizer, text_encoder)] if text_encoder is not None else []
        self.prompt_encoder = XLPromptEncoder([*pairs, (tokenizer_2, text_encoder_2)], force_zeros_for_empty_prompt)
        self.config = {"force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
                       "requires_aesthetics_score": requires_aesthetics_score}
        # diffusers applies an invisible watermark when the `invisible-watermark` package is present;
        # sdort never does (as diffusers without that package).

    # ---- inputs ----------------------------------------------------------------------------

    def check_inputs(self, prompt, prompt_2, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                     negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                     negative_pooled_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs):
        """diffusers' SDXL `check_inputs`, with sdort's messages; returns (batch, generator)."""
        batch = check_common_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                                    negative_prompt, prompt_embeds, negative_prompt_embeds, output_type)
        for name, value, embeds in (("prompt_2", prompt_2, prompt_embeds),
                                    ("negative_prompt_2", negative_prompt_2, negative_prompt_embeds)):
            if value is not None and embeds is not None:
                raise ValueError(f"{name} and {name.replace('prompt_2', 'prompt_embeds')}: pass one of them, not both")
            if value is not None and not (isinstance(value, str) or (
                    isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value))):
                raise ValueError(f"{name} must be a str or a list of str; got {type(value).__name__}")
            if isinstance(value, (list, tuple)) and len(value) != batch:
                raise ValueError(f"{name}: a list of {len(value)} for {batch} prompt(s); the lengths must match")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("pooled_prompt_embeds: needed with prompt_embeds (the second text encoder's "
                             "text_embeds for the same prompts)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds: needed with negative_prompt_embeds")
        self.check_callback_tensor_inputs(callback_on_step_end_tensor_inputs)
        total = batch * num_images_per_prompt
        return total, self.check_generator(generator, total)

    @staticmethod
    def check_denoising_fractions(denoising_start, denoising_end) -> None:
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None:
                check_finite(name, value)
        if valid_fraction(denoising_start) and valid_fraction(denoising_end) and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start: {denoising_start} must be below denoising_end: {denoising_end}")

    def encode_prompt(self, prompt, prompt_2, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      negative_prompt_2=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, clip_skip=None):
        """diffusers' SDXL `encode_prompt`: see `XLPromptEncoder.__call__`."""
        return self.prompt_encoder(prompt, prompt_2, num_images_per_prompt, do_classifier_free_guidance,
                                   negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                                   pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)

    # ---- micro-conditioning ----------------------------------------------------------------

    def text_embeds_dim(self, pooled: np.ndarray) -> int:
        """diffusers' `text_encoder_projection_dim`: text_encoder_2's projection_dim, else the pooled width."""
        return int(self.text_encoder_2.config.get("projection_dim", pooled.shape[-1]))

    def check_time_ids(self, count: int, text_embeds_dim: int) -> None:
        """The UNet's added embedding must take `count` time ids and the pooled embeddings, as
        diffusers checks against `add_embedding.linear_1.in_features`."""
        config = self.unet.config
        expected = config.get("projection_class_embeddings_input_dim")
        per_id = config.get("addition_time_embed_dim")
        if expected is None or per_id is None:
            return
        passed = per_id * count + text_embeds_dim
        if passed == expected:
            return
        # One id too many: the UNet takes 5 (crop + aesthetic score), not 6 (sizes + crop); one too
        # few: the reverse. (diffusers 0.42's messages for these two cases are swapped.)
        if passed - expected == per_id:
            hint = "this UNet takes an aesthetic score: load it with requires_aesthetics_score=True (a refiner)"
        elif expected - passed == per_id:
            hint = "this UNet takes no aesthetic score: load it with requires_aesthetics_score=False"
        else:
            hint = "check the UNet's addition_time_embed_dim and text_encoder_2's projection_dim"
        raise ValueError(f"unet: expects an added embedding of {expected} values, the time ids and pooled "
                         f"embeddings make {passed}; {hint}")

    def time_ids(self, size: tuple, crop: tuple, last: tuple) -> np.ndarray:
        """One row of `add_time_ids`: original size, crop top-left, then target size (or aesthetic score)."""
        return np.asarray([[*size, *crop, *last]], dtype=np.float32)

    def added_inputs(self, pooled, negative_pooled, add_time_ids, negative_add_time_ids, total: int,
                     interleaved: bool = False) -> dict:
        """SDXL's added UNet inputs for the whole UNet batch (negative half first with guidance).

        diffusers' text-to-image repeats `cat([negative, positive])` row by row (`interleaved`), so
        with guidance its time ids alternate negative, positive across the batch; its image-to-image
        and inpainting repeat each half first. The same rows are fed here, quirk included."""
        if negative_pooled is None:
            return {"text_embeds": pooled, "time_ids": np.repeat(add_time_ids, total, axis=0)}
        if interleaved:
            time_ids = np.tile(np.concatenate([negative_add_time_ids, add_time_ids]), (total, 1))
        else:
            time_ids = np.concatenate([np.repeat(negative_add_time_ids, total, 0), np.repeat(add_time_ids, total, 0)])
        return {"text_embeds": np.concatenate([negative_pooled, pooled]), "time_ids": time_ids}

    # ---- latents -----------------------------------------------------------------------------

    def check_latents(self, latents, total: int) -> np.ndarray:
        """Given first latents: NCHW with the VAE's latent channels, one per image."""
        latents = np.asarray(latents, dtype=np.float32)
        channels = self.vae_decoder.config.get("latent_channels", 4)
        if latents.ndim != 4 or latents.shape[:2] != (total, channels):
            raise ValueError(f"latents: expected shape ({total}, {channels}, height / {self.vae_scale_factor}, "
                             f"width / {self.vae_scale_factor}); got {latents.shape}")
        return latents

    def _latents_stats(self):
        config = self.vae_decoder.config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return np.asarray(mean, np.float32).reshape(shape), np.asarray(std, np.float32).reshape(shape)

    def scale_latents(self, sample: np.ndarray) -> np.ndarray:
        """Encoded latents: (sample - latents_mean) * scaling_factor / latents_std where the VAE's config
        has them, as diffusers' SDXL; else sample * scaling_factor."""
        stats = self._latents_stats()
        if stats is None:
            return super().scale_latents(sample)
        scaling = np.float32(self.vae_decoder.config.get("scaling_factor", 0.13025))
        return (sample - stats[0]) * scaling / stats[1]

    def unscale_latents(self, latents: np.ndarray) -> np.ndarray:
        """The VAE decoder's input: latents * latents_std / scaling_factor + latents_mean where the
        VAE's config has them, else latents / scaling_factor.

        The SDXL VAE overflows in float16 (its `force_upcast`): sd-export keeps the VAE float32 in
        every export, so the decoder never runs in float16 here."""
        stats = self._latents_stats()
        if stats is None:
            return super().unscale_latents(latents)
        scaling = np.float32(self.vae_decoder.config.get("scaling_factor", 0.13025))
        return latents * stats[1] / scaling + stats[0]


class XLImagePipeline(XLConditionedPipeline):
    """Base of the SDXL pipelines that start from an image (image-to-image, the refiner, inpainting):
    the schedule may start part-way, and the micro-conditioning may take an aesthetic score."""

    required_parts = ("text_encoder_2", "unet", "vae_decoder", "vae_encoder")
    optional_parts = ("text_encoder",)
    config_names = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")

    def prepare_micro_conditioning(self, height, width, original_size, crops_coords_top_left, target_size,
                                   negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                   aesthetic_score, negative_aesthetic_score, pooled):
        """(add_time_ids, negative add_time_ids) as diffusers' image-to-image `_get_add_time_ids`: the
        aesthetic-score form for a refiner (`requires_aesthetics_score`), else sizes and crop."""
        original_size = check_pair("original_size", original_size) or (height, width)
        target_size = check_pair("target_size", target_size) or (height, width)
        crop = check_pair("crops_coords_top_left", crops_coords_top_left)
        negative_original_size = check_pair("negative_original_size", negative_original_size) or original_size
        negative_target_size = check_pair("negative_target_size", negative_target_size) or target_size
        negative_crop = check_pair("negative_crops_coords_top_left", negative_crops_coords_top_left)
        check_finite("aesthetic_score", aesthetic_score)
        check_finite("negative_aesthetic_score", negative_aesthetic_score)
        if self.config["requires_aesthetics_score"]:
            positive = self.time_ids(original_size, crop, (aesthetic_score,))
            negative = self.time_ids(negative_original_size, negative_crop, (negative_aesthetic_score,))
        else:
            # diffusers pairs the negative sizes with the positive crop here
            positive = self.time_ids(original_size, crop, target_size)
            negative = self.time_ids(negative_original_size, crop, negative_target_size)
        self.check_time_ids(positive.shape[1], self.text_embeds_dim(pooled))
        return positive, negative

    def schedule(self, scheduler, num_inference_steps, timesteps, sigmas, strength, denoising_start, denoising_end):
        """The timesteps to run: from `denoising_start` (strength is then ignored) or shortened by
        `strength`, and cut at `denoising_end`."""
        num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
        if valid_fraction(denoising_start):
            timesteps = start_timesteps(scheduler, denoising_start)
        else:
            timesteps = self.strength_timesteps(scheduler, num_inference_steps, strength)
        return end_timesteps(scheduler, timesteps, denoising_end)
