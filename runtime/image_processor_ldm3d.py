"""LDM3D's image postprocessing: diffusers' `VaeImageProcessorLDM3D` in numpy and Pillow.

An LDM3D VAE decodes RGB and depth together. Two layouts exist, told apart by the channel count:

* 4 channels (Intel/ldm3d-4c): RGB, then depth as one float channel;
* 6 channels: RGB, then depth spread over three "RGB-like" 8-bit channels (high byte in the
  second, low byte in the third).

`postprocess` splits the decoded batch into the RGB images and the depth maps.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from .image_processor import VaeImageProcessor

__all__ = ["VaeImageProcessorLDM3D", "DEPTH_FORMATS"]

# decoded channels -> how depth is stored in channels 3.. (see the module docstring)
DEPTH_FORMATS = {4: "float", 6: "rgb-like"}


class VaeImageProcessorLDM3D(VaeImageProcessor):
    """diffusers' `VaeImageProcessorLDM3D`: postprocessing of a 4- or 6-channel VAE decode into RGB
    images and depth maps.

    Args (diffusers' names, order and defaults): `do_resize`, `vae_scale_factor`, `resample`,
    `do_normalize`, as `VaeImageProcessor`.

    `postprocess(image, output_type)` returns `(rgb, depth)`:

    * "np": RGB as NHWC float32 in [0, 1] (channels 0-2), depth NHW1 float32 in [0, 1] (4 channels);
    * "pil": RGB PIL images, and depth as 16-bit single-channel PIL images (mode "I;16"):
      `uint16(depth * 65535)`, truncated as diffusers does (not rounded).

    Where sdort differs from diffusers 0.42.1, on purpose:

    * the 6-channel ("rgb-like") depth: diffusers casts `G * 256 + B` back to uint8 (which keeps B
      alone) and, for "np", computes it from the [0, 1] floats (which truncate to 0 or 1). sdort
      returns what the format holds: `G * 256 + B` of the 8-bit channels, as a 16-bit image for
      "pil" and divided by 65535 for "np".
    * Pillow 11.3+ no longer builds an "I;16" image from an HxWx1 array, so diffusers' "pil"
      output fails there; sdort builds it from the HxW array, the image older Pillow made.
    * "latent" and "pt" raise a ValueError naming `output_type` (diffusers raises a bare Exception
      after denormalising).
    * `preprocess` (RGB + depth inputs, used by no diffusers pipeline) is not implemented.
    """

    def __init__(self, do_resize: bool = True, vae_scale_factor: int = 8, resample: str = "lanczos",
                 do_normalize: bool = True):
        super().__init__(do_resize=do_resize, vae_scale_factor=vae_scale_factor, resample=resample,
                         do_normalize=do_normalize)

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
        """NHWC floats in [0, 1] to PIL images of their first three channels (one channel: "L")."""
        if images.ndim == 3:
            images = images[None, ...]
        images = (images * 255).round().astype(np.uint8)
        if images.shape[-1] == 1:
            return [Image.fromarray(image[..., 0], mode="L") for image in images]
        return [Image.fromarray(np.ascontiguousarray(image[..., :3])) for image in images]

    @staticmethod
    def depth_pil_to_numpy(images) -> np.ndarray:
        """16-bit depth PIL image(s) to an NHW float32 array in [0, 1] (value / 65535)."""
        if not isinstance(images, list):
            images = [images]
        return np.stack([np.array(image).astype(np.float32) / (2 ** 16 - 1) for image in images], axis=0)

    @staticmethod
    def rgblike_to_depthmap(image: np.ndarray) -> np.ndarray:
        """An "RGB-like" depth image (HxWx3 integers, high byte in channel 1, low byte in channel 2)
        to the 16-bit depth `G * 256 + B`, as uint16 (see the class docstring for diffusers' cast)."""
        image = np.asarray(image)
        if not np.issubdtype(image.dtype, np.integer):
            raise TypeError(f"an RGB-like depth image holds 8-bit integers; got {image.dtype}")
        wide = image.astype(np.int32)
        return (wide[..., 1] * 256 + wide[..., 2]).astype(np.uint16)

    @staticmethod
    def depth_format(images: np.ndarray) -> str:
        """How an NHWC decode stores depth: "float" (4 channels) or "rgb-like" (6); else a ValueError."""
        channels = images.shape[-1]
        if channels not in DEPTH_FORMATS:
            raise ValueError(f"an LDM3D decode has 4 channels (RGB + depth) or 6 (RGB + RGB-like depth); "
                             f"this one has {channels}")
        return DEPTH_FORMATS[channels]

    def _depth_uint16(self, images: np.ndarray) -> np.ndarray:
        """NHW uint16 depth of an NHWC decode in [0, 1]."""
        if self.depth_format(images) == "float":
            return (images[..., 3] * 65535.0).astype(np.uint16)  # truncation, as diffusers
        rgb_like = (images[..., 3:] * 255).round().astype(np.uint8)
        return np.stack([self.rgblike_to_depthmap(image) for image in rgb_like])

    def numpy_to_depth(self, images: np.ndarray) -> list[Image.Image]:
        """NHWC decodes in [0, 1] to 16-bit single-channel PIL depth images (mode "I;16")."""
        if images.ndim == 3:
            images = images[None, ...]
        return [Image.fromarray(np.ascontiguousarray(depth)) for depth in self._depth_uint16(images)]

    def postprocess(self, image: np.ndarray, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        """An NCHW decode (about [-1, 1]) to `(rgb, depth)` as "np" or "pil" (see the class docstring).

        `do_denormalize` (one bool per image) overrides `do_normalize` image by image, as in diffusers.
        Other output types than "pil", "np", "latent" and "pt" warn and give "np", as in diffusers.
        """
        if not isinstance(image, np.ndarray):
            raise ValueError(
                f"Input for postprocessing is in incorrect format: {type(image)}. We only support numpy arrays")
        if output_type not in ("latent", "pt", "np", "pil"):
            warnings.warn(
                f"the output_type {output_type} is outdated and has been set to `np`. Please make sure to set it to "
                "one of these instead: `pil`, `np`", FutureWarning, stacklevel=2)
            output_type = "np"
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type: LDM3D gives 'pil' or 'np' images (RGB and depth); got {output_type!r}")
        image = self.nchw_to_numpy(self._denormalize_conditionally(image, do_denormalize))
        if output_type == "np":
            if self.depth_format(image) == "float":
                depth = np.ascontiguousarray(image[..., 3:])
            else:
                depth = self._depth_uint16(image)[..., None].astype(np.float32) / np.float32(65535)
            return np.ascontiguousarray(image[..., :3]), depth
        return self.numpy_to_pil(image), self.numpy_to_depth(image)
