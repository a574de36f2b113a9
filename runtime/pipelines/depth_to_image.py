"""Depth-to-image: diffusers' `StableDiffusionDepth2ImgPipeline` on ONNX Runtime.

Image-to-image whose UNet reads one more input channel: a depth map of the picture, either given
by the caller or estimated by the exported DPT depth estimator. The depth map is resized to the
latent size with torch's bicubic interpolation (reproduced here in numpy), scaled to [-1, 1] per
image, and handed to the shared loop as `conditioning`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..feature_extractors import DPTImageProcessor
from ..resampling import resize_bicubic
from .base import TextConditionedPipeline, StableDiffusionPipelineOutput, retrieve_timesteps, tile_to_batch
from .checks import check_strength

logger = logging.getLogger("sdort")

# Tensors a `callback_on_step_end` may ask for (diffusers also offers "depth_mask").

def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """Each map of an N1HW batch scaled to [-1, 1] by its own minimum and maximum (diffusers'
    `2 * (d - min) / (max - min) - 1`; a constant map divides by zero there too)."""
    low = depth.min(axis=(1, 2, 3), keepdims=True)
    high = depth.max(axis=(1, 2, 3), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.float32(2.0) * (depth - low) / (high - low) - np.float32(1.0)


def _depth_from_pil(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(image).astype(np.float32)  # 16/32-bit depth images keep their precision
    return np.asarray(image.convert("L")).astype(np.float32)


def load_depth_map(depth_map) -> np.ndarray:
    """A user's depth map as a float32 [B, H, W] array (diffusers takes a [B, H, W] tensor).

    Accepted: a numpy array [H, W], [B, H, W] or [B, 1, H, W]; a PIL image (16-bit and float
    images keep their values, others are read as grayscale) or a list of them; the path of a
    .npy file holding such an array. Larger values mean farther or nearer as the model was
    trained (MiDaS/DPT: nearer is larger); only the relative values matter.
    """
    if isinstance(depth_map, (str, os.PathLike)):
        path = Path(depth_map)
        if path.suffix.lower() != ".npy":
            raise ValueError(f"depth_map: a path must name a .npy file; got {path}")
        if not path.is_file():
            raise ValueError(f"depth_map: {path}: no such file")
        depth_map = np.load(path, allow_pickle=False)
    if isinstance(depth_map, Image.Image):
        depth_map = [depth_map]
    if isinstance(depth_map, (list, tuple)):
        if not depth_map or not all(isinstance(d, (Image.Image, np.ndarray)) for d in depth_map):
            raise ValueError("depth_map: a list must hold PIL images or numpy arrays")
        maps = [_depth_from_pil(d) if isinstance(d, Image.Image) else np.asarray(d, np.float32) for d in depth_map]
        if len({m.shape for m in maps}) > 1:
            raise ValueError(f"depth_map: the maps differ in size: {sorted({m.shape for m in maps})}")
        depth_map = np.stack(maps)
    if not isinstance(depth_map, np.ndarray):
        raise ValueError(
            f"depth_map: expected a numpy array, a PIL image or a .npy path; got {type(depth_map).__name__}"
        )
    if not (np.issubdtype(depth_map.dtype, np.floating) or np.issubdtype(depth_map.dtype, np.integer)):
        raise ValueError(f"depth_map: expected numbers; got dtype {depth_map.dtype}")
    if depth_map.ndim == 4 and depth_map.shape[1] == 1:
        depth_map = depth_map[:, 0]
    elif depth_map.ndim == 2:
        depth_map = depth_map[None]
    if depth_map.ndim != 3 or 0 in depth_map.shape:
        raise ValueError(f"depth_map: expected shape [H, W], [B, H, W] or [B, 1, H, W]; got {list(depth_map.shape)}")
    # diffusers casts to the model's dtype before interpolating.
    return depth_map.astype(np.float32)


class StableDiffusionDepth2ImgPipeline(TextConditionedPipeline):
    """Depth-guided image-to-image with diffusers' parameters, defaults and output.

    Needs a UNet with one channel more than the latents (the depth map). Without a `depth_map`
    argument the depth is estimated by the model's `depth_estimator` part, on the input image
    preprocessed by its `feature_extractor` (transformers' DPTImageProcessor, in numpy).
    """

    required_parts = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    optional_parts = ("depth_estimator",)
    # diffusers' depth-to-image pipeline leaves the scheduler config as it is.
    legacy_scheduler_fix = False
    conditioning_channels = (1,)  # the depth map

    def __init__(self, text_encoder, tokenizer, unet, vae_decoder, scheduler, vae_encoder=None,
                 depth_estimator=None, feature_extractor=None, **extra_parts):
        super().__init__(text_encoder, tokenizer, unet, vae_decoder, scheduler, vae_encoder,
                         depth_estimator=depth_estimator, feature_extractor=feature_extractor, **extra_parts)
        self.check_unet_kind()  # a depth pipeline is never useful without a depth UNet

    @classmethod
    def from_pretrained(cls, path, provider: str = "auto", session_options=None, precision: str = "fp32",
                        **overrides):
        """Load an exported depth model; `feature_extractor/preprocessor_config.json` configures the
        depth estimator's preprocessing (transformers' defaults when the folder has none)."""
        if "feature_extractor" not in overrides:
            config = Path(path) / "feature_extractor" / "preprocessor_config.json"
            overrides["feature_extractor"] = DPTImageProcessor.from_pretrained(config) if config.is_file() else None
        return super().from_pretrained(path, provider=provider, session_options=session_options, precision=precision,
                                       **overrides)

    def estimate_depth(self, images: list) -> np.ndarray:
        """Depth maps [B, h, w] of the input images from the depth estimator (diffusers: DPT's
        `predicted_depth` on the feature extractor's `pixel_values`)."""
        if getattr(self, "depth_estimator", None) is None:
            raise ValueError(
                f"{type(self).__name__}: no depth_map was given and the model has no 'depth_estimator' part "
                "to estimate one; pass depth_map= or export a model with a depth estimator"
            )
        extractor = getattr(self, "feature_extractor", None)
        if extractor is None:
            extractor = DPTImageProcessor()
            logger.warning("sdort: the model has no feature_extractor config; using DPTImageProcessor's defaults")
        pixel_values = extractor(images)
        return self.depth_estimator(pixel_values=pixel_values)["predicted_depth"].astype(np.float32)

    def prepare_depth_map(self, image, depth_map, batch: int, latent_size: tuple[int, int]) -> np.ndarray:
        """The UNet's depth channel [batch, 1, h, w]: given or estimated, resized bicubically to the
        latent size, scaled to [-1, 1] per map, repeated to the batch (diffusers' prepare_depth_map)."""
        if depth_map is None:
            single = isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim < 4)
            images = [image] if single else list(image)
            depth = self.estimate_depth(images)
        else:
            depth = load_depth_map(depth_map)
        depth = resize_bicubic(depth[:, None], *latent_size)
        depth = normalize_depth(depth)
        return tile_to_batch(depth, batch, "depth_map")

    def __call__(
        self,
        prompt=None,
        image=None,
        depth_map=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        """As diffusers: `image` is the starting picture (PIL, numpy HWC/NHWC in [0, 1], or lists);
        `depth_map` an optional depth map (see `load_depth_map`), estimated when None."""
        if image is None:
            raise ValueError("image: an input image is required")
        check_strength(strength)
        total, generator = self.check_inputs(
            prompt, None, None, num_inference_steps, guidance_scale, num_images_per_prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, output_type, generator, callback_on_step_end_tensor_inputs)
        do_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)

        pixels = self.preprocess_image(image)
        # diffusers sizes the depth map from the input image: its size // vae_scale_factor, which is
        # the latent size of the preprocessed image (rounded down to multiples of the factor).
        latent_size = (pixels.shape[2] // self.vae_scale_factor, pixels.shape[3] // self.vae_scale_factor)
        depth = self.prepare_depth_map(image, depth_map, total, latent_size)

        scheduler = self.fresh_scheduler(self.scheduler)
        retrieve_timesteps(scheduler, num_inference_steps)
        timesteps = self.strength_timesteps(scheduler, num_inference_steps, strength)
        latents = self.noised_image_latents(pixels, total, generator, timesteps[:1], scheduler)
        latents = self.denoise(
            latents, timesteps, scheduler, prompt_embeds, negative_prompt_embeds if do_cfg else None, guidance_scale,
            generator=generator, eta=eta, conditioning=depth, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images = self.decode(latents, output_type)
        # diffusers returns ImagePipelineOutput here: images only, no safety flags.
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images,)
