"""Text-to-image: diffusers' `StableDiffusionPipeline` on ONNX Runtime."""

from __future__ import annotations

import numpy as np

from .pipeline import OUTPUT_TYPES, DiffusionPipeline, StableDiffusionPipelineOutput, retrieve_timesteps


def check_common_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                        negative_prompt, prompt_embeds, negative_prompt_embeds, output_type):
    """The checks every Stable Diffusion task makes (diffusers' `check_inputs` and a few more);
    each error names the parameter. Returns the prompt batch size."""
    if height is not None and width is not None and (height % 8 != 0 or width % 8 != 0):
        raise ValueError(f"height and width must be multiples of 8; got height={height}, width={width}")
    if height is not None and width is not None and (height <= 0 or width <= 0):
        raise ValueError(f"height and width must be positive; got height={height}, width={width}")
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must not be negative; got {guidance_scale}")
    if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1; got {num_images_per_prompt!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("prompt and prompt_embeds: pass one of them, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("prompt: pass a prompt (or prompt_embeds)")
    if prompt is not None and not (isinstance(prompt, str) or
                                   (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt))):
        raise ValueError(f"prompt must be a str or a list of str; got {type(prompt).__name__}")
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError("prompt: the list of prompts is empty")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("negative_prompt and negative_prompt_embeds: pass one of them, not both")
    batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else np.shape(prompt_embeds)[0]
    if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != batch:
        raise ValueError(f"negative_prompt: a list of {len(negative_prompt)} for {batch} prompt(s); the lengths must match")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if np.shape(prompt_embeds) != np.shape(negative_prompt_embeds):
            raise ValueError(f"negative_prompt_embeds: shape {np.shape(negative_prompt_embeds)} differs from "
                             f"prompt_embeds {np.shape(prompt_embeds)}")
    return batch


class StableDiffusionPipeline(DiffusionPipeline):
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
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        default = self.unet.config.get("sample_size", 64) * self.vae_scale_factor
        height = height or default
        width = width or default
        batch = check_common_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                                    negative_prompt, prompt_embeds, negative_prompt_embeds, output_type)
        total = batch * num_images_per_prompt
        generator = self.check_generator(generator, total)
        # diffusers: no classifier-free guidance at guidance_scale <= 1
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds)

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
        images = self.decode(latents, output_type)
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images)
