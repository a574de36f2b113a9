"""Image pre- and postprocessing in numpy and Pillow, equal to diffusers' `VaeImageProcessor`."""

from __future__ import annotations

import numpy as np
from PIL import Image


class VaeImageProcessor:
    """Converts between PIL/numpy images and the VAE's NCHW float arrays in [-1, 1].

    Matches diffusers.image_processor.VaeImageProcessor for the settings Stable Diffusion uses.
    """

    def __init__(self, vae_scale_factor: int = 8, do_normalize: bool = True):
        self.vae_scale_factor = vae_scale_factor
        self.do_normalize = do_normalize

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list:
        """NHWC floats in [0, 1] to PIL images: round(x * 255), as diffusers."""
        images = (images * 255).round().astype(np.uint8)
        if images.shape[-1] == 1:
            return [Image.fromarray(image[..., 0], mode="L") for image in images]
        return [Image.fromarray(image) for image in images]

    def postprocess(self, image: np.ndarray, output_type: str = "pil"):
        """VAE output (NCHW, about [-1, 1]) to `np` (NHWC float32 in [0, 1]) or `pil` images."""
        if self.do_normalize:
            image = np.clip(image / 2 + 0.5, 0, 1)
        image = image.transpose(0, 2, 3, 1).astype(np.float32)
        if output_type == "np":
            return image
        return self.numpy_to_pil(image)
