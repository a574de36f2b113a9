"""Safe Latent Diffusion: diffusers' `StableDiffusionPipelineSafe` on ONNX Runtime.

Text-to-image whose guidance also steers away from a safety concept (Schramowski et al. 2023,
"Safe Latent Diffusion"): the UNet batch holds a third copy of the latents conditioned on the
concept's text embeddings (the loop's `extra_embeds`), and `SafeLatentGuidance` combines the three
predictions with the paper's equations 3-8, momentum kept across steps. After decoding, the
safety checker (when the model has one) blacks out flagged images and keeps them in
`unsafe_images`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .base import TextConditionedPipeline, retrieve_timesteps
from .checks import check_common_inputs, check_finite
from .safety_checker import SafetyCheckedPipeline, check_images, logger
from .step_callbacks import check_callback_steps, legacy_callback

# diffusers' default safety concept (`StableDiffusionPipelineSafe.__init__`).
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)


class SafetyConfig:
    """diffusers' `SafetyConfig` presets of the `sld_*` arguments: `pipe(prompt, **SafetyConfig.STRONG)`."""

    WEAK = {"sld_warmup_steps": 15, "sld_guidance_scale": 20, "sld_threshold": 0.0, "sld_momentum_scale": 0.0,
            "sld_mom_beta": 0.0}
    MEDIUM = {"sld_warmup_steps": 10, "sld_guidance_scale": 1000, "sld_threshold": 0.01, "sld_momentum_scale": 0.3,
              "sld_mom_beta": 0.4}
    STRONG = {"sld_warmup_steps": 7, "sld_guidance_scale": 2000, "sld_threshold": 0.025, "sld_momentum_scale": 0.5,
              "sld_mom_beta": 0.7}
    MAX = {"sld_warmup_steps": 0, "sld_guidance_scale": 5000, "sld_threshold": 1.0, "sld_momentum_scale": 0.5,
           "sld_mom_beta": 0.7}


@dataclass
class StableDiffusionSafePipelineOutput:
    """As diffusers': `images`; `nsfw_content_detected` (one boolean per image, None without a
    checker); `unsafe_images`, the flagged images as they were before being blacked out (black for
    those not flagged; None without a checker); `applied_safety_concept` (None when safety guidance
    was off)."""

    images: object
    nsfw_content_detected: list | None
    unsafe_images: object
    applied_safety_concept: str | None


class SafeLatentGuidance:
    """Classifier-free guidance plus safety guidance over an [uncond; text; concept] UNet batch, as
    diffusers' `StableDiffusionPipelineSafe` computes it in float32; the momentum is this object's
    state, so one object serves one call."""

    copies = 3

    def __init__(self, guidance_scale, sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale,
                 sld_mom_beta):
        # Python scalars meet float32 tensors in diffusers: each is rounded to float32 first.
        self.guidance_scale = np.float32(guidance_scale)
        self.sld_guidance_scale = np.float32(sld_guidance_scale)
        self.sld_warmup_steps = sld_warmup_steps
        self.sld_threshold = np.float32(sld_threshold)
        self.sld_momentum_scale = np.float32(sld_momentum_scale)
        self.sld_mom_beta = np.float32(sld_mom_beta)
        self.kept_fraction = np.float32(1 - sld_mom_beta)  # computed in double, as Python does there
        self.momentum = None

    def combine(self, i: int, t, noise_pred: np.ndarray) -> np.ndarray:
        uncond, text, concept = np.split(noise_pred, 3)
        guidance = text - uncond
        if self.momentum is None:
            self.momentum = np.zeros_like(guidance)
        # Eq. 6: a per-element scale, 0 where the prediction is already far enough from the concept
        distance = text - concept
        scale = np.minimum(np.abs(distance) * self.sld_guidance_scale, np.float32(1.0))
        concept_scale = np.where(distance >= self.sld_threshold, np.float32(0.0), scale)
        # Eq. 4 and 7: the safety guidance, plus the momentum so far
        safety = (concept - uncond) * concept_scale
        safety = safety + self.sld_momentum_scale * self.momentum
        # Eq. 8: the momentum builds up during the warm-up steps too
        self.momentum = self.sld_mom_beta * self.momentum + self.kept_fraction * safety
        if i >= self.sld_warmup_steps:  # Eq. 3, after the warm-up
            guidance = guidance - safety
        return uncond + self.guidance_scale * guidance


def check_sld_inputs(sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale, sld_mom_beta,
                     callback_steps) -> None:
    for name, value in (("sld_guidance_scale", sld_guidance_scale), ("sld_threshold", sld_threshold),
                        ("sld_momentum_scale", sld_momentum_scale), ("sld_mom_beta", sld_mom_beta)):
        check_finite(name, value)
    if isinstance(sld_warmup_steps, bool) or not isinstance(sld_warmup_steps, (int, np.integer)) \
            or sld_warmup_steps < 0:
        raise ValueError(f"sld_warmup_steps must be an integer >= 0; got {sld_warmup_steps!r}")
    check_callback_steps(callback_steps)


class StableDiffusionPipelineSafe(SafetyCheckedPipeline, TextConditionedPipeline):
    """Safe Latent Diffusion with diffusers' `StableDiffusionPipelineSafe.__call__` parameters,
    defaults and output; `safety_concept` is the text steered away from."""

    callback_tensor_inputs = ("latents",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._safety_text_concept = DEFAULT_SAFETY_CONCEPT

    @property
    def safety_concept(self) -> str:
        """The text of the concept safety guidance steers away from (diffusers' default unless set)."""
        return self._safety_text_concept

    @safety_concept.setter
    def safety_concept(self, concept: str) -> None:
        if not isinstance(concept, str):
            raise ValueError(f"safety_concept must be a str; got {type(concept).__name__}")
        self._safety_text_concept = concept

    def run_safety_checker(self, image: np.ndarray):
        """Nothing between the VAE and the post-processing: this pipeline checks the denormalised
        images afterwards (`check_safety`), as diffusers' does."""
        return image, None

    def check_safety(self, images: np.ndarray, enable_safety_guidance: bool):
        """diffusers' Safe `run_safety_checker` on NHWC images in [0, 1]: (images with the flagged
        ones black, flags, the flagged images kept aside); (images, None, None) without a checker."""
        if self.safety_checker is None:
            return images, None, None
        flags = check_images(self.safety_checker, self.feature_extractor, self.image_processor.numpy_to_pil(images),
                             images)
        # diffusers allocates np.zeros((2, ...)) here whatever the batch, which fails for a flagged
        # third image; sdort keeps one slot per image.
        unsafe = np.zeros_like(images)
        if any(flags):
            hint = ("You may look at this images in the `unsafe_images` variable of the output at your own discretion."
                    if enable_safety_guidance else "Try again with a different prompt and/or seed.")
            logger.warning("Potential NSFW content was detected in one or more images. A black image will be "
                           f"returned instead.{hint}")
            flagged = np.asarray(flags)
            unsafe[flagged] = images[flagged]
            images = images.copy()
            images[flagged] = 0.0
        return images, flags, unsafe

    def __call__(
        self,
        prompt,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        ip_adapter_image=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        sld_guidance_scale: float = 1000,
        sld_warmup_steps: int = 10,
        sld_threshold: float = 0.01,
        sld_momentum_scale: float = 0.3,
        sld_mom_beta: float = 0.4,
    ):
        """As diffusers: images for `prompt`, with safety guidance when `sld_guidance_scale > 1` and
        classifier-free guidance is on (`guidance_scale > 1`); `callback(step, timestep, latents)`
        every `callback_steps` steps. Any `output_type` but "pil" gives NHWC float arrays, as diffusers'."""
        if ip_adapter_image is not None:
            raise ValueError("ip_adapter_image: sdort has no IP-Adapter support")
        height, width = self.default_size(height, width)
        batch = check_common_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                                    negative_prompt, None, None, output_type)
        check_sld_inputs(sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale, sld_mom_beta,
                         callback_steps)
        if negative_prompt is not None and isinstance(negative_prompt, str) != isinstance(prompt, str):
            raise ValueError(f"negative_prompt must be of the type of prompt ({type(prompt).__name__}); "
                             f"got {type(negative_prompt).__name__}")
        total = batch * num_images_per_prompt
        generator = self.check_generator(generator, total)
        do_cfg = guidance_scale > 1.0
        enable_safety_guidance = sld_guidance_scale > 1.0 and do_cfg
        if not enable_safety_guidance:
            warnings.warn("Safety checker disabled!")  # diffusers' words: safety *guidance* is off

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, num_images_per_prompt, do_cfg,
                                                                   negative_prompt)
        guidance, extra_embeds = None, ()
        if enable_safety_guidance:
            # the concept's embeddings, truncated silently as diffusers does, once per image
            concept = self.prompt_encoder.embed([self._safety_text_concept], warn=False)
            extra_embeds = (np.repeat(concept, total, axis=0),)
            guidance = SafeLatentGuidance(guidance_scale, sld_guidance_scale, sld_warmup_steps, sld_threshold,
                                          sld_momentum_scale, sld_mom_beta)

        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        latents = self.prepare_latents(self.latent_shape(total, height, width), generator, latents, scheduler)

        after_step = legacy_callback(callback, callback_steps, timesteps, num_inference_steps,
                                     getattr(scheduler, "order", 1))

        latents = self.denoise(latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None,
                               guidance_scale, generator=generator, eta=eta, guidance=guidance,
                               extra_embeds=extra_embeds, after_step=after_step)
        images = self.decode(latents, "np")
        images, has_nsfw, unsafe = self.check_safety(images, enable_safety_guidance)
        if output_type == "pil":
            images = self.image_processor.numpy_to_pil(images)
            if unsafe is not None:
                unsafe = self.image_processor.numpy_to_pil(unsafe)
        concept = self._safety_text_concept if enable_safety_guidance else None
        if not return_dict:
            return (images, has_nsfw, concept, unsafe)
        return StableDiffusionSafePipelineOutput(images=images, nsfw_content_detected=has_nsfw,
                                                 unsafe_images=unsafe, applied_safety_concept=concept)
