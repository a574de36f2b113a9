"""x2 upscaling in latent space: diffusers' `StableDiffusionLatentUpscalePipeline` on ONNX Runtime.

The input is an image, or the latents of another SD pipeline's `output_type="latent"` (the chained
use diffusers documents). What it adds to the shared loop, in the loop's own hooks:

- conditioning: the image latents upsampled x2 (nearest) beside the latents (4 + 4 UNet channels);
- `timestep_cond` (an added UNet input): a noise-level embedding (64 ones, 64 zeros: noise level 0,
  as diffusers fixes it) and the prompt's pooled text embedding;
- `unet_timestep`: k-diffusion's c_noise = log(sigma) / 4 instead of the scheduler's timestep;
- `model_output`: Karras et al.'s preconditioning of the UNet's output (its last, variance,
  channel dropped), c_skip x + c_out F(x), giving the denoised sample the Euler scheduler takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...schedulers.euler import continuous_timesteps
from ..image_processor import VaeImageProcessor
from .base import TextConditionedPipeline, retrieve_timesteps
from .prompts import as_list
from .step_callbacks import check_callback_steps, legacy_callback
from .upscale import check_image_batch

# The noise-level embedding's width in `timestep_cond` (diffusers' 64 ones then 64 zeros).
NOISE_LEVEL_EMBED = 64


@dataclass
class ImagePipelineOutput:
    """As diffusers' `ImagePipelineOutput`: `images` only (PIL list, NHWC float32 array, or latents)."""

    images: object


class StableDiffusionLatentUpscalePipeline(TextConditionedPipeline):
    """Latent x2 upscaling with diffusers' `StableDiffusionLatentUpscalePipeline` parameters, defaults
    and output. Parts: `text_encoder` (with `hidden_states.N` and `pooler_output` outputs), `unet`
    (`timestep_cond` input), `vae_decoder`, and `vae_encoder` for image (not latent) inputs."""

    legacy_scheduler_fix = False
    conditioning_channels = (4,)
    callback_tensor_inputs = ("latents",)

    def __init__(self, text_encoder, tokenizer, unet, vae_decoder, scheduler, vae_encoder=None, **extra_parts):
        super().__init__(text_encoder, tokenizer, unet, vae_decoder, scheduler, vae_encoder, **extra_parts)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        if "timestep_cond" not in self.unet.inputs:
            raise ValueError("'unet': this UNet has no 'timestep_cond' input; export the latent upscaler with "
                             "sd-export, whose UNet config sets time_cond_proj_dim")
        blocks = self.unet.config.get("down_block_types") or ()
        # k-diffusion blocks pad by reflection around each resampling: the latents must halve to at
        # least 2 at the deepest level (diffusers fails inside the UNet otherwise)
        self.latent_multiple = 2 ** (len(blocks) - 1) if any(b.startswith("K") for b in blocks) else 1

    def encode_prompt(self, prompt, do_classifier_free_guidance: bool, negative_prompt=None, prompt_embeds=None,
                      negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None):
        """diffusers' `encode_prompt` of this pipeline: the text encoder's last hidden state before its
        final layer norm (`hidden_states[-1]`) and its pooled output; the same for the negative
        prompts (empty ones when none given) with guidance. Returns the four arrays."""
        if prompt_embeds is None or pooled_prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self._embed(as_list(prompt, 1), warn=True)
        prompt_embeds = np.asarray(prompt_embeds, np.float32)
        pooled_prompt_embeds = np.asarray(pooled_prompt_embeds, np.float32)
        if do_classifier_free_guidance and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
            negatives = as_list("" if negative_prompt is None else negative_prompt, prompt_embeds.shape[0])
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed(negatives, warn=False)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = np.asarray(negative_prompt_embeds, np.float32)
            negative_pooled_prompt_embeds = np.asarray(negative_pooled_prompt_embeds, np.float32)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    def _embed(self, prompts: list[str], warn: bool):
        outputs = self.text_encoder(input_ids=self.tokenizer(prompts, warn=warn))
        layers = [k for k in outputs if k.startswith("hidden_states.")]
        if not layers or "pooler_output" not in outputs:
            raise ValueError("text_encoder: the latent upscaler reads the last hidden_states.N and pooler_output "
                             "outputs, which this export lacks; export the model again with sd-export")
        last = max(layers, key=lambda k: int(k.rpartition(".")[2]))
        return outputs[last].astype(np.float32), outputs["pooler_output"].astype(np.float32)

    def image_latents(self, image, batch: int, generator) -> np.ndarray:
        """The latents of the input: used as they are when given as latents, else the VAE encoder's
        sample times scaling_factor (diffusers' `retrieve_latents(vae.encode(image), generator)`)."""
        image = self.preprocess_image(image)
        if image.ndim == 3:
            image = image[None]
        if image.shape[1] == 3:
            self.check_fits_in_memory(batch, *image.shape[2:])
            return self.encode_image(image, generator)
        if image.shape[1] != self.vae_decoder.config.get("latent_channels", 4):
            raise ValueError(f"image: {image.shape[1]} channels; give an RGB image or the VAE's latents")
        return image

    def __call__(
        self,
        prompt=None,
        image=None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        negative_prompt=None,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
    ):
        """Upscale `image` x2: a PIL image, numpy images, a list (one per prompt), or NCHW latents
        from another pipeline's `output_type="latent"`. `callback(step, timestep, latents)` every
        `callback_steps` steps, as diffusers."""
        # 1. check inputs
        if image is None:
            raise ValueError("image: an input image (or latents) is required")
        check_callback_steps(callback_steps)
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("pooled_prompt_embeds: required with prompt_embeds (from the same text encoder)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds: required with negative_prompt_embeds")
        batch, generator = self.check_inputs(
            prompt, None, None, num_inference_steps, guidance_scale, 1, negative_prompt, prompt_embeds,
            negative_prompt_embeds, output_type, generator, ("latents",))
        check_image_batch(image, batch)
        if guidance_scale == 0:  # diffusers: guidance 0 conditions on empty prompts
            prompt = [""] * batch

        # 2. encode the prompt: [negative; prompt] with guidance
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds)
        if do_cfg:
            pooled = np.concatenate([negative_pooled, pooled])

        # 3. the image's latents (encoded when given as an image)
        image = self.image_latents(image, batch, generator)
        height, width = 2 * image.shape[2], 2 * image.shape[3]
        multiple = self.latent_multiple
        if multiple > 1 and (height % multiple or width % multiple or min(height, width) < 2 * multiple):
            raise ValueError(f"image: latents of {image.shape[2]}x{image.shape[3]} upscale to {height}x{width}, which "
                             f"this UNet cannot take (multiples of {multiple}, at least {2 * multiple}); give an "
                             f"image whose sides are multiples of {multiple * self.vae_scale_factor // 2} px, at "
                             f"least {multiple * self.vae_scale_factor} px")
        if self.vae_tiling is None:
            self.check_fits_in_memory(batch, height * self.vae_scale_factor, width * self.vae_scale_factor)

        # 4. the schedule
        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps

        # 5. the conditioning: the latents upsampled x2 (nearest), scaled by (noise_level^2 + 1)^-1/2
        # for the noise level 0 diffusers fixes (a factor of 1), one copy per guidance half
        copies = 2 if do_cfg else 1
        image_cond = np.repeat(np.repeat(np.concatenate([image] * copies), 2, axis=2), 2, axis=3)
        noise_level_embed = np.concatenate([np.ones((pooled.shape[0], NOISE_LEVEL_EMBED), np.float32),
                                            np.zeros((pooled.shape[0], NOISE_LEVEL_EMBED), np.float32)], axis=1)
        timestep_cond = np.concatenate([noise_level_embed, pooled], axis=1)

        # 6. the latents, at twice the size
        channels = self.vae_decoder.config.get("latent_channels", 4)
        latents = self.prepare_latents((batch, channels, height, width), generator, latents, scheduler)

        # 7. the denoising loop, with the k-diffusion timestep and preconditioning
        sigmas = np.asarray(scheduler.sigmas, dtype=np.float32)

        def unet_timestep(i, t):
            return continuous_timesteps(sigmas[i:i + 1])[0]  # log(sigma) / 4

        def model_output(i, t, noise_pred, step_latents):
            # Karras et al. (2022), table 1: D(x) = x / (sigma^2 + 1) + sigma / sqrt(sigma^2 + 1) F(x),
            # the variance channel of the original model's output dropped
            sigma = sigmas[i]
            inv_sigma = np.float32(1) / (sigma * sigma + np.float32(1))
            c_out = scheduler.scale_model_input(sigma, t)
            model_input = np.concatenate([step_latents] * copies)
            return inv_sigma * model_input + c_out * noise_pred[:, :-1]

        after_step = legacy_callback(callback, callback_steps, timesteps, num_inference_steps,
                                     getattr(scheduler, "order", 1), warmup=0)
        # diffusers steps the scheduler without the generator
        latents = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None, guidance_scale,
            generator=None, conditioning=image_cond, added_inputs={"timestep_cond": timestep_cond},
            unet_timestep=unet_timestep, model_output=model_output, after_step=after_step,
        )

        # 8. decode
        images = self.decode(latents, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
