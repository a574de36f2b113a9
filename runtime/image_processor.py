"""Image pre- and postprocessing for sdort, in numpy and Pillow only.

Three processors live here, each reproducing the number-for-number behaviour of its reference:

* `VaeImageProcessor` -- diffusers.image_processor.VaeImageProcessor: turns PIL images or numpy
  arrays into the NCHW arrays the VAE encoder takes, and VAE output back into numpy/PIL images.
  Configured as diffusers' inpainting pipelines configure their mask processor
  (`VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
  do_convert_grayscale=True)`) it is also the mask processor.  It carries the inpainting helpers
  `get_crop_region` and `apply_overlay` used by `padding_mask_crop`.
* `CLIPImageProcessor` -- transformers' CLIPImageProcessor in its Pillow backend
  (`CLIPImageProcessorPil`, what transformers uses without torchvision): the feature extractor of
  the image-variation pipeline and of the safety checker.
* `DPTImageProcessor` -- transformers' DPTImageProcessor in its Pillow backend: the feature
  extractor of the depth-to-image pipeline's depth estimator.

Where diffusers hands back torch tensors, sdort hands back numpy arrays (NCHW float32).  The
differences that remain are listed in each class's docstring.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# Resampling filters by the names diffusers' configs use (diffusers.utils.PIL_INTERPOLATION).
PIL_INTERPOLATION = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}

__all__ = [
    "PIL_INTERPOLATION",
    "CLIPImageProcessor",
    "DPTImageProcessor",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VaeImageProcessor",
    "is_valid_image",
    "is_valid_image_imagelist",
]


# ----------------------------------------------------------------------------------------------
# diffusers: VaeImageProcessor
# ----------------------------------------------------------------------------------------------


def is_valid_image(image) -> bool:
    """A PIL image, or a 2-D (grayscale) or 3-D numpy array."""
    return isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim in (2, 3))


def is_valid_image_imagelist(images) -> bool:
    """A 4-D numpy batch, a single valid image, or a list of valid images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return True
    if is_valid_image(images):
        return True
    if isinstance(images, list):
        return all(is_valid_image(image) for image in images)
    return False


class _FrozenConfig(dict):
    """A read-only dict whose keys are also attributes, like diffusers' FrozenDict config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _immutable(self, *args, **kwargs):
        raise TypeError("the config of an image processor is read-only; build a new processor instead")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _immutable  # type: ignore[assignment]

    def __reduce__(self):
        # Copy and pickle through the constructor, not item assignment.
        return type(self), (dict(self),)


def _torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output index for torch's legacy `mode="nearest"` interpolation.

    torch (ATen `nearest_idx`): an equal size copies, a doubled size takes `i >> 1`, any other
    size takes `min(floor(i * s), in - 1)` with `s = float(in) / out` and the product computed in
    float32.  Reproducing the float32 arithmetic makes the indices, hence the arrays, identical.
    """
    if out_size <= 0 or in_size <= 0:
        raise ValueError(f"Input and output sizes should be greater than 0, got input {in_size}, output {out_size}")
    positions = np.arange(out_size, dtype=np.int64)
    if out_size == in_size:
        return positions
    if out_size == 2 * in_size:
        return positions >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(positions.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def _resize_nearest_nchw(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """`torch.nn.functional.interpolate(images, size=(height, width))` (mode "nearest") on NCHW numpy."""
    rows = _torch_nearest_indices(images.shape[2], height)
    cols = _torch_nearest_indices(images.shape[3], width)
    return np.ascontiguousarray(images[:, :, rows][:, :, :, cols])


class VaeImageProcessor:
    """Pre- and postprocessing of the images a VAE encodes and decodes; diffusers' VaeImageProcessor.

    Args (diffusers' names, order and defaults):
        do_resize: round the height and width down to multiples of `vae_scale_factor` (or resize to
            the `height`/`width` given to `preprocess`).
        vae_scale_factor: the VAE's downsampling factor.
        vae_latent_channels: kept for config compatibility; diffusers only uses it to pass torch
            latents through `preprocess`, which has no numpy counterpart.
        resample: Pillow filter for PIL inputs: "lanczos", "bicubic", "bilinear"/"linear", "nearest".
        reducing_gap: Pillow's `reducing_gap` for the default PIL resize.
        do_normalize: map [0, 1] to [-1, 1] in `preprocess` (and back in `postprocess`).
        do_binarize: threshold at 0.5 to {0, 1} (masks).
        do_convert_rgb / do_convert_grayscale: convert PIL inputs to "RGB" / "L".

    `preprocess` returns a numpy NCHW float32 array where diffusers returns a torch tensor, and
    `postprocess` takes a numpy NCHW array where diffusers takes a tensor.  Otherwise the values
    are diffusers' own, bit for bit:

    * PIL inputs go through the same Pillow calls (resize with the configured filter,
      "fill"/"crop" modes, crops, RGB/L conversion), then `float32(uint8) / 255`.
    * numpy inputs (HWC, NHWC or HW, NHW for masks, values in [0, 1]) are resized as diffusers
      resizes them: with torch's default `interpolate(mode="nearest")`, which is not a smoothing
      filter but picks source pixel `floor(i * in/out)` computed in float32.  That index rule is
      reproduced exactly (see `_torch_nearest_indices`), so the results are identical (tested
      for exact equality).  Float inputs are processed in their own dtype, like diffusers, and
      the result is cast to float32 at the end (diffusers would return a float64 tensor for a
      float64 array).
    """

    config_name = "config.json"

    def __init__(
        self,
        do_resize: bool = True,
        vae_scale_factor: int = 8,
        vae_latent_channels: int = 4,
        resample: str = "lanczos",
        reducing_gap: int | None = None,
        do_normalize: bool = True,
        do_binarize: bool = False,
        do_convert_rgb: bool = False,
        do_convert_grayscale: bool = False,
    ):
        if do_convert_rgb and do_convert_grayscale:
            raise ValueError(
                "`do_convert_rgb` and `do_convert_grayscale` can not both be set to `True`: set "
                "`do_convert_grayscale=False` to convert images to RGB, or `do_convert_rgb=False` to convert them "
                "to grayscale."
            )
        if resample not in PIL_INTERPOLATION:
            raise ValueError(f"resample must be one of {sorted(PIL_INTERPOLATION)}, got {resample!r}")
        self.config = _FrozenConfig(
            do_resize=do_resize,
            vae_scale_factor=vae_scale_factor,
            vae_latent_channels=vae_latent_channels,
            resample=resample,
            reducing_gap=reducing_gap,
            do_normalize=do_normalize,
            do_binarize=do_binarize,
            do_convert_rgb=do_convert_rgb,
            do_convert_grayscale=do_convert_grayscale,
        )

    @classmethod
    def from_config(cls, config: Mapping, **overrides) -> "VaeImageProcessor":
        """Build from a config mapping (unknown keys such as `_class_name` are ignored)."""
        names = cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount]
        values = {key: value for key, value in dict(config).items() if key in names}
        values.update(overrides)
        return cls(**values)

    def __getattr__(self, name):
        # Configuration values read as attributes (processor.vae_scale_factor), as diffusers allows.
        config = self.__dict__.get("config")
        if config is not None and name in config:
            return config[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    # -- conversions -------------------------------------------------------------------------

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
        """HWC or NHWC floats in [0, 1] to PIL images: `uint8(round(x * 255))`, one channel as "L"."""
        if images.ndim == 3:
            images = images[None, ...]
        images = (images * 255).round().astype(np.uint8)
        if images.shape[-1] == 1:
            return [Image.fromarray(image[..., 0], mode="L") for image in images]
        return [Image.fromarray(image) for image in images]

    @staticmethod
    def pil_to_numpy(images: list[Image.Image] | Image.Image) -> np.ndarray:
        """PIL image(s) to an NHWC (NHW for one-band images) float32 array in [0, 1]."""
        if not isinstance(images, list):
            images = [images]
        return np.stack([np.array(image).astype(np.float32) / 255.0 for image in images], axis=0)

    @staticmethod
    def numpy_to_nchw(images: np.ndarray) -> np.ndarray:
        """NHWC (or NHW) to NCHW: diffusers' `numpy_to_pt` without torch."""
        if images.ndim == 3:
            images = images[..., None]
        return images.transpose(0, 3, 1, 2)

    @staticmethod
    def nchw_to_numpy(images: np.ndarray) -> np.ndarray:
        """NCHW to NHWC float32: diffusers' `pt_to_numpy` without torch."""
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1)).astype(np.float32, copy=False)

    # diffusers' names, for ported code (the "pt" side is a numpy NCHW array here).
    numpy_to_pt = numpy_to_nchw
    pt_to_numpy = nchw_to_numpy

    @staticmethod
    def normalize(images: np.ndarray) -> np.ndarray:
        """[0, 1] to [-1, 1]."""
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images: np.ndarray) -> np.ndarray:
        """[-1, 1] to [0, 1], clipped."""
        return np.clip(images * 0.5 + 0.5, 0, 1)

    @staticmethod
    def convert_to_rgb(image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    @staticmethod
    def convert_to_grayscale(image: Image.Image) -> Image.Image:
        return image.convert("L")

    @staticmethod
    def blur(image: Image.Image, blur_factor: int = 4) -> Image.Image:
        """Gaussian blur of radius `blur_factor` (diffusers uses it to soften inpainting masks)."""
        return image.filter(ImageFilter.GaussianBlur(blur_factor))

    def binarize(self, image: np.ndarray) -> np.ndarray:
        """Values below 0.5 become 0, the others 1 (NaN stays NaN, as in diffusers)."""
        image = np.array(image, copy=True)
        image[image < 0.5] = 0
        image[image >= 0.5] = 1
        return image

    # -- inpainting helpers ------------------------------------------------------------------

    @staticmethod
    def get_crop_region(mask_image: Image.Image, width: int, height: int, pad: int = 0):
        """The box (x1, y1, x2, y2) around every masked (non-zero) pixel, grown by `pad` and then
        widened or heightened to the aspect ratio `width / height`, kept inside the image.

        Same arithmetic as diffusers, including its edge cases (a mask without any masked pixel
        and `pad=0` divides by zero there too).
        """
        mask_image = mask_image.convert("L")
        mask = np.array(mask_image)
        h, w = mask.shape
        columns = np.flatnonzero((mask != 0).any(axis=0))
        rows = np.flatnonzero((mask != 0).any(axis=1))
        # Number of all-zero columns/rows on each side (the whole size when nothing is masked).
        crop_left = int(columns[0]) if columns.size else w
        crop_right = int(w - 1 - columns[-1]) if columns.size else w
        crop_top = int(rows[0]) if rows.size else h
        crop_bottom = int(h - 1 - rows[-1]) if rows.size else h

        x1 = int(max(crop_left - pad, 0))
        y1 = int(max(crop_top - pad, 0))
        x2 = int(min(w - crop_right + pad, w))
        y2 = int(min(h - crop_bottom + pad, h))

        ratio_crop_region = (x2 - x1) / (y2 - y1)
        ratio_processing = width / height
        if ratio_crop_region > ratio_processing:
            # Too wide: grow the height, centred, then shift back inside the image.
            grow = int((x2 - x1) / ratio_processing - (y2 - y1))
            y1 -= grow // 2
            y2 += grow - grow // 2
            if y2 >= mask_image.height:
                overflow = y2 - mask_image.height
                y2 -= overflow
                y1 -= overflow
            if y1 < 0:
                y2 -= y1
                y1 = 0
            if y2 >= mask_image.height:
                y2 = mask_image.height
        else:
            grow = int((y2 - y1) * ratio_processing - (x2 - x1))
            x1 -= grow // 2
            x2 += grow - grow // 2
            if x2 >= mask_image.width:
                overflow = x2 - mask_image.width
                x2 -= overflow
                x1 -= overflow
            if x1 < 0:
                x2 -= x1
                x1 = 0
            if x2 >= mask_image.width:
                x2 = mask_image.width
        return x1, y1, x2, y2

    def apply_overlay(
        self,
        mask: Image.Image,
        init_image: Image.Image,
        image: Image.Image,
        crop_coords: tuple[int, int, int, int] | None = None,
    ) -> Image.Image:
        """Paste the unmasked part of `init_image` over the generated `image` (RGB result).

        With `crop_coords` (from `get_crop_region`), `image` is the generated crop: it is first
        resized ("crop" mode) into that box of an image the size of `init_image`.
        """
        width, height = init_image.width, init_image.height
        # Premultiplied-alpha copy of the original, visible only where the mask is 0.
        kept = Image.new("RGBa", (width, height))
        kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
        kept = kept.convert("RGBA")

        if crop_coords is not None:
            x, y, x2, y2 = crop_coords
            canvas = Image.new("RGBA", (width, height))
            image = self.resize(image, height=y2 - y, width=x2 - x, resize_mode="crop")
            canvas.paste(image, (x, y))
            image = canvas.convert("RGB")

        image = image.convert("RGBA")
        image.alpha_composite(kept)
        return image.convert("RGB")

    # -- resizing ----------------------------------------------------------------------------

    def _filter(self):
        return PIL_INTERPOLATION[self.config.resample]

    def _resize_and_fill(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """Fit inside (width, height) keeping the aspect ratio, centre, and fill the two empty
        bands by stretching the resized image's outermost rows (or columns)."""
        ratio = width / height
        src_ratio = image.width / image.height
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width

        resized = image.resize((src_w, src_h), resample=self._filter())
        result = Image.new("RGB", (width, height))
        result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))

        if ratio < src_ratio:
            band = height // 2 - src_h // 2
            if band > 0:
                top_row = resized.resize((width, band), box=(0, 0, width, 0))
                bottom_row = resized.resize((width, band), box=(0, resized.height, width, resized.height))
                result.paste(top_row, box=(0, 0))
                result.paste(bottom_row, box=(0, band + src_h))
        elif ratio > src_ratio:
            band = width // 2 - src_w // 2
            if band > 0:
                left_col = resized.resize((band, height), box=(0, 0, 0, height))
                right_col = resized.resize((band, height), box=(resized.width, 0, resized.width, height))
                result.paste(left_col, box=(0, 0))
                result.paste(right_col, box=(band + src_w, 0))
        return result

    def _resize_and_crop(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """Cover (width, height) keeping the aspect ratio, centre, and cut what sticks out."""
        ratio = width / height
        src_ratio = image.width / image.height
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width

        resized = image.resize((src_w, src_h), resample=self._filter())
        result = Image.new("RGB", (width, height))
        result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return result

    def resize(self, image, height: int, width: int, resize_mode: str = "default"):
        """Resize a PIL image (any `resize_mode`: "default", "fill", "crop") or an NHWC numpy array
        ("default" only; torch-style nearest-neighbour, returned as float32 NHWC like diffusers).

        Note that "fill" and "crop" return RGB images whatever the input mode (as in diffusers).
        """
        if resize_mode != "default" and not isinstance(image, Image.Image):
            raise ValueError(f"Only PIL image input is supported for resize_mode {resize_mode}")
        if isinstance(image, Image.Image):
            if resize_mode == "default":
                return image.resize((width, height), resample=self._filter(), reducing_gap=self.config.reducing_gap)
            if resize_mode == "fill":
                return self._resize_and_fill(image, width, height)
            if resize_mode == "crop":
                return self._resize_and_crop(image, width, height)
            raise ValueError(f"resize_mode {resize_mode} is not supported")
        if isinstance(image, np.ndarray):
            resized = _resize_nearest_nchw(self.numpy_to_nchw(image), height, width)
            return self.nchw_to_numpy(resized)
        raise TypeError(f"Cannot resize an object of type {type(image).__name__}")

    def get_default_height_width(self, image, height: int | None = None, width: int | None = None):
        """(height, width) of `image` -- a PIL image or an NHWC/NHW array -- unless given, rounded
        down to multiples of `vae_scale_factor`."""
        if height is None:
            height = image.height if isinstance(image, Image.Image) else image.shape[1]
        if width is None:
            width = image.width if isinstance(image, Image.Image) else image.shape[2]
        factor = self.config.vae_scale_factor
        return height - height % factor, width - width % factor

    # -- the two directions ------------------------------------------------------------------

    def preprocess(
        self,
        image,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str = "default",
        crops_coords: tuple[int, int, int, int] | None = None,
    ) -> np.ndarray:
        """PIL image(s) or numpy array(s) to an NCHW float32 array (in [-1, 1] with `do_normalize`).

        Accepts a PIL image, a list of PIL images, an HWC (or, for masks, HW) array, an NHWC
        array, or a list of HWC/HW arrays; values of arrays in [0, 1].  `height`/`width` default to
        the (first) image's size; with `do_resize` they are rounded down to multiples of
        `vae_scale_factor`.  `resize_mode` ("default", "fill", "crop") and `crops_coords` (a box
        cropped out first) apply to PIL inputs only, as in diffusers.
        """
        config = self.config
        # A 3-D array to a grayscale processor is either NHW (a batch of masks) or HW1.
        if config.do_convert_grayscale and isinstance(image, np.ndarray) and image.ndim == 3:
            image = image[None] if image.shape[-1] == 1 else image[..., None]

        if isinstance(image, list) and image and isinstance(image[0], np.ndarray) and image[0].ndim == 4:
            warnings.warn(
                "Passing `image` as a list of 4d np.ndarray is deprecated. Please concatenate the list along the "
                "batch dimension and pass it as a single 4d np.ndarray",
                FutureWarning,
                stacklevel=2,
            )
            image = np.concatenate(image, axis=0)

        if not is_valid_image_imagelist(image):
            raise ValueError(
                "Input is in incorrect format. Currently, we only support PIL.Image.Image and np.ndarray images "
                f"(or lists of them), got {type(image).__name__}"
            )
        if not isinstance(image, list):
            image = [image]

        if isinstance(image[0], Image.Image):
            if crops_coords is not None:
                image = [img.crop(crops_coords) for img in image]
            if config.do_resize:
                height, width = self.get_default_height_width(image[0], height, width)
                image = [self.resize(img, height, width, resize_mode=resize_mode) for img in image]
            if config.do_convert_rgb:
                image = [self.convert_to_rgb(img) for img in image]
            elif config.do_convert_grayscale:
                image = [self.convert_to_grayscale(img) for img in image]
            batch = self.numpy_to_nchw(self.pil_to_numpy(image))
        else:
            batch = np.concatenate(image, axis=0) if image[0].ndim == 4 else np.stack(image, axis=0)
            batch = self.numpy_to_nchw(batch)
            if height is None:
                height = batch.shape[2]
            if width is None:
                width = batch.shape[3]
            factor = config.vae_scale_factor
            height, width = height - height % factor, width - width % factor
            if config.do_resize:
                batch = _resize_nearest_nchw(batch, height, width)

        do_normalize = config.do_normalize
        if do_normalize and batch.min() < 0:
            warnings.warn(
                "Passing `image` with value range in [-1,1] is deprecated. The expected value range for image "
                f"arrays is [0,1]. You passed `image` with value range [{batch.min()},{batch.max()}]",
                FutureWarning,
                stacklevel=2,
            )
            do_normalize = False
        if do_normalize:
            batch = self.normalize(batch)
        if config.do_binarize:
            batch = self.binarize(batch)
        return np.ascontiguousarray(batch, dtype=np.float32)

    def _denormalize_conditionally(self, images: np.ndarray, do_denormalize: list[bool] | None = None):
        if do_denormalize is None:
            return self.denormalize(images) if self.config.do_normalize else images
        return np.stack(
            [self.denormalize(images[i]) if do_denormalize[i] else images[i] for i in range(images.shape[0])]
        )

    def postprocess(self, image: np.ndarray, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        """VAE output (NCHW numpy, about [-1, 1]) to `output_type`:

        "np": NHWC float32 in [0, 1]; "pil": a list of PIL images; "latent": the input unchanged;
        "pt": the denormalised NCHW array (torch's layout, still numpy -- sdort has no torch).
        Other values warn and give "np", as in diffusers.  `do_denormalize` (one bool per image)
        overrides `do_normalize` image by image.
        """
        if not isinstance(image, np.ndarray):
            raise ValueError(
                f"Input for postprocessing is in incorrect format: {type(image)}. We only support numpy arrays"
            )
        if output_type not in ("latent", "pt", "np", "pil"):
            warnings.warn(
                f"the output_type {output_type} is outdated and has been set to `np`. Please make sure to set it to "
                "one of these instead: `pil`, `np`, `pt`, `latent`",
                FutureWarning,
                stacklevel=2,
            )
            output_type = "np"
        if output_type == "latent":
            return image
        image = self._denormalize_conditionally(image, do_denormalize)
        if output_type == "pt":
            return image
        image = self.nchw_to_numpy(image)
        if output_type == "np":
            return image
        return self.numpy_to_pil(image)


# ----------------------------------------------------------------------------------------------
# transformers: CLIPImageProcessor and DPTImageProcessor (Pillow backend)
# ----------------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

PREPROCESSOR_CONFIG = "preprocessor_config.json"

_VALID_SIZE_KEYS = (
    {"height", "width"},
    {"shortest_edge"},
    {"shortest_edge", "longest_edge"},
    {"longest_edge"},
    {"max_height", "max_width"},
    {"min_pixels", "max_pixels"},
)

_FIRST, _LAST = "channels_first", "channels_last"


def _size_dict(size, default_to_square: bool = True, name: str = "size") -> dict:
    """A `size` config value (int, (h, w), or dict) as transformers' size dict."""
    if isinstance(size, Mapping):
        size = {key: value for key, value in size.items() if value is not None}
    elif isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (tuple, list)) and len(size) >= 2:
        size = {"height": size[0], "width": size[1]}
    else:
        raise ValueError(f"Could not convert {name} input to size dict: {size}")
    if set(size) not in _VALID_SIZE_KEYS:
        raise ValueError(f"{name} must have one of the following set of keys: {_VALID_SIZE_KEYS}, got {set(size)}")
    return size


def _channel_format(image: np.ndarray, num_channels=(1, 3)) -> str:
    """transformers' `infer_channel_dimension_format`: channels first wins when ambiguous."""
    if image.ndim not in (3, 4, 5):
        raise ValueError(f"Unsupported number of image dimensions: {image.ndim}")
    first, last = image.ndim - 3, image.ndim - 1
    if image.shape[first] in num_channels:
        return _FIRST
    if image.shape[last] in num_channels:
        return _LAST
    raise ValueError("Unable to infer channel dimension format")


def _as_format(value) -> str | None:
    if value is None:
        return None
    value = getattr(value, "value", value)
    if value not in (_FIRST, _LAST):
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {value!r}")
    return value


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """transformers' `rescale`: multiply in float64, store float32."""
    return (image.astype(np.float64) * scale).astype(np.float32)


def _needs_rescale_for_pil(image: np.ndarray) -> bool:
    """Whether a CHW array must be scaled by 255 before Pillow sees it (floats in [0, 1])."""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(
            "The image to be converted to a PIL image contains values outside the range [0, 255], "
            f"got [{image.min()}, {image.max()}] which cannot be converted to uint8."
        )
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(
        "The image to be converted to a PIL image contains values outside the range [0, 1], "
        f"got [{image.min()}, {image.max()}] which cannot be converted to uint8."
    )


def _pil_resize_chw(image: np.ndarray, height: int, width: int, resample, reducing_gap=None) -> np.ndarray:
    """Resize a CHW array with Pillow, as transformers' `image_transforms.resize` does: floats in
    [0, 1] are scaled to [0, 255] and truncated to uint8 first, and scaled back by 1/255 after."""
    rescaled = _needs_rescale_for_pil(image)
    hwc = np.moveaxis(image, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if rescaled:
        hwc = _rescale(hwc, 255)
    pil = Image.fromarray(hwc.astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=resample, reducing_gap=reducing_gap))
    if out.ndim == 2:
        out = out[..., None]
    out = np.moveaxis(out, -1, 0)
    return _rescale(out, 1 / 255) if rescaled else out


def _resample_filter(resample):
    if resample is None:
        return Image.Resampling.BILINEAR
    if isinstance(resample, str):
        return PIL_INTERPOLATION[resample.lower()]
    return Image.Resampling(int(resample))


class _PilBackendProcessor:
    """What transformers' `PilBackend` (the torchvision-free image processor) does for the
    settings diffusers' feature extractors use: per image, RGB conversion, Pillow resize, centre
    crop, rescale, normalisation (per-model hooks below); the batch stacked as NCHW float32."""

    # Class-level defaults; `None` means "off"/"unset", as in transformers.
    do_convert_rgb = None
    do_resize = None
    size = None
    default_to_square = True
    resample = None
    do_center_crop = None
    crop_size = None
    do_rescale = None
    rescale_factor = 1 / 255
    do_normalize = None
    image_mean = None
    image_std = None
    do_pad = None
    pad_size = None

    _option_names = (
        "do_convert_rgb", "do_resize", "size", "default_to_square", "resample", "do_center_crop", "crop_size",
        "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad", "pad_size",
    )
    _ignored_keys = ("feature_extractor_type", "processor_class", "image_processor_type")

    def __init__(self, **kwargs):
        for key in self._ignored_keys:
            kwargs.pop(key, None)
        options = {}
        for name in self._option_names:
            value = kwargs.pop(name, None)
            options[name] = value if value is not None else getattr(type(self), name, None)
        self.__dict__.update(self._standardize(options))
        # Keys this processor does not use (kept, like transformers keeps them as attributes).
        self.extra_config = kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Read `preprocessor_config.json` from a folder (or `folder/subfolder`, or the file itself);
        keyword arguments override its values."""
        path = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            path = os.path.join(path, PREPROCESSOR_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{PREPROCESSOR_CONFIG} not found: {path}")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        config.update(kwargs)
        return cls(**config)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self._option_names if getattr(self, name) is not None}
        out["image_processor_type"] = type(self).__name__
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)}"

    def _standardize(self, options: dict) -> dict:
        default_to_square = options.get("default_to_square")
        if options.get("size") is not None:
            options["size"] = _size_dict(options["size"], default_to_square=default_to_square)
        if options.get("crop_size") is not None:
            options["crop_size"] = _size_dict(options["crop_size"], name="crop_size")
        if options.get("pad_size") is not None:
            options["pad_size"] = _size_dict(options["pad_size"], name="pad_size")
        for name in ("image_mean", "image_std"):
            if isinstance(options.get(name), list):
                options[name] = tuple(options[name])
        return options

    @staticmethod
    def _validate(options: dict) -> None:
        if options.get("do_rescale") and options.get("rescale_factor") is None:
            raise ValueError("`rescale_factor` must be specified if `do_rescale` is `True`.")
        if options.get("do_normalize") and (options.get("image_mean") is None or options.get("image_std") is None):
            raise ValueError("`image_mean` and `image_std` must both be specified if `do_normalize` is `True`.")
        if options.get("do_center_crop") and options.get("crop_size") is None:
            raise ValueError("`crop_size` must be specified if `do_center_crop` is `True`.")
        if options.get("do_resize") and not (options.get("size") is not None and options.get("resample") is not None):
            raise ValueError("`size` and `resample` must be specified if `do_resize` is `True`.")

    # -- input handling ----------------------------------------------------------------------

    @staticmethod
    def _flat_list(images) -> list:
        """transformers' `make_flat_list_of_images` for PIL images and numpy arrays."""

        def valid(image):
            return isinstance(image, (Image.Image, np.ndarray))

        if isinstance(images, (list, tuple)) and all(isinstance(item, (list, tuple)) for item in images):
            if all((len(item) > 0 and all(valid(i) for i in item)) or not item for item in images):
                return [image for item in images for image in item]
        if isinstance(images, (list, tuple)) and images and all(valid(image) for image in images):
            first = images[0]
            if isinstance(first, Image.Image) or first.ndim == 3:
                return list(images)
            if first.ndim == 4:
                return [image for batch in images for image in batch]
        if valid(images):
            if isinstance(images, Image.Image) or images.ndim == 3:
                return [images]
            if images.ndim == 4:
                return list(images)
        raise ValueError(f"Could not make a flat list of images from {type(images).__name__}")

    @staticmethod
    def _to_rgb(image, input_data_format: str | None) -> np.ndarray:
        """RGB array (HWC for PIL inputs, the input layout for arrays); transparency composited on white."""
        if isinstance(image, Image.Image):
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
            return np.array(image.convert("RGB"))
        if input_data_format is None:
            input_data_format = _channel_format(image, num_channels=(1, 3, 4))
        axis = -1 if input_data_format == _LAST else 0
        hwc = np.moveaxis(image, axis, -1)
        channels = hwc.shape[-1]
        if channels == 1:
            rgb = np.repeat(hwc, 3, axis=-1)
        elif channels == 4:
            if np.issubdtype(hwc.dtype, np.floating) and (hwc.min() < 0.0 or hwc.max() > 1.0):
                raise ValueError(
                    f"The image to be converted to RGB contains values outside the range [0, 1], got "
                    f"[{hwc.min()}, {hwc.max()}]."
                )
            white = 255 if np.issubdtype(hwc.dtype, np.integer) else 1.0
            alpha = hwc[..., 3:4] / white
            blended = alpha * hwc[..., :3] + (1 - alpha) * white
            rgb = np.round(blended).astype(hwc.dtype) if white == 255 else blended.astype(hwc.dtype)
        else:
            rgb = hwc
        return np.moveaxis(rgb, -1, axis)

    def _to_chw(self, image, do_convert_rgb, input_data_format) -> np.ndarray:
        """One input image as a CHW array (uint8 for PIL inputs, the array's dtype otherwise)."""
        if not isinstance(image, (Image.Image, np.ndarray)):
            raise ValueError(f"Unsupported input image type {type(image).__name__}")
        is_pil = isinstance(image, Image.Image)
        if do_convert_rgb:
            image = self._to_rgb(image, input_data_format)
        elif is_pil:
            image = np.array(image)
        if image.ndim == 2:
            return image[None]
        if is_pil:
            return np.moveaxis(image, -1, 0)
        if input_data_format is None:
            input_data_format = _channel_format(image, num_channels=(1, 3, 4))
        return np.moveaxis(image, -1, 0) if input_data_format == _LAST else image

    # -- per-image operations (CHW) -----------------------------------------------------------

    def _output_size(self, image: np.ndarray, size: dict, options: dict) -> tuple[int, int]:
        height, width = image.shape[-2:]
        if size.get("shortest_edge") and size.get("longest_edge"):
            return _size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"])
        if size.get("shortest_edge"):
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if size.get("max_height") and size.get("max_width"):
            scale = min(size["max_height"] / height, size["max_width"] / width)
            return int(height * scale), int(width * scale)
        if size.get("height") and size.get("width"):
            return size["height"], size["width"]
        raise ValueError(
            "Size must contain 'height' and 'width' keys, or 'max_height' and 'max_width', or 'shortest_edge' key. "
            f"Got {size}."
        )

    def _resize(self, image: np.ndarray, options: dict) -> np.ndarray:
        height, width = self._output_size(image, options["size"], options)
        return _pil_resize_chw(image, height, width, _resample_filter(options.get("resample")))

    @staticmethod
    def _center_crop(image: np.ndarray, size: dict) -> np.ndarray:
        """Centre crop to size["height"] x size["width"], zero-padding images that are too small."""
        if size.get("height") is None or size.get("width") is None:
            raise ValueError(f"The size dictionary must have keys 'height' and 'width'. Got {set(size)}")
        in_h, in_w = image.shape[-2:]
        crop_h, crop_w = int(size["height"]), int(size["width"])
        top, left = (in_h - crop_h) // 2, (in_w - crop_w) // 2
        bottom, right = top + crop_h, left + crop_w
        if top >= 0 and bottom <= in_h and left >= 0 and right <= in_w:
            return image[..., top:bottom, left:right]
        new_h, new_w = max(crop_h, in_h), max(crop_w, in_w)
        padded = np.zeros_like(image, shape=image.shape[:-2] + (new_h, new_w))
        pad_top, pad_left = math.ceil((new_h - in_h) / 2), math.ceil((new_w - in_w) / 2)
        padded[..., pad_top : pad_top + in_h, pad_left : pad_left + in_w] = image
        top, bottom, left, right = top + pad_top, bottom + pad_top, left + pad_left, right + pad_left
        return padded[..., max(0, top) : min(new_h, bottom), max(0, left) : min(new_w, right)]

    @staticmethod
    def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
        """(image - mean) / std per channel, in the image's float dtype (float32 for integers)."""
        channels = image.shape[0]
        if not np.issubdtype(image.dtype, np.floating):
            image = image.astype(np.float32)
        if isinstance(mean, Iterable):
            mean = list(mean)
            if len(mean) != channels:
                raise ValueError(f"mean must have {channels} elements if it is an iterable, got {len(mean)}")
        else:
            mean = [mean] * channels
        if isinstance(std, Iterable):
            std = list(std)
            if len(std) != channels:
                raise ValueError(f"std must have {channels} elements if it is an iterable, got {len(std)}")
        else:
            std = [std] * channels
        mean = np.array(mean, dtype=image.dtype)[:, None, None]
        std = np.array(std, dtype=image.dtype)[:, None, None]
        return (image - mean) / std

    def _process_one(self, image: np.ndarray, options: dict) -> np.ndarray:
        if options.get("do_resize"):
            image = self._resize(image, options)
        if options.get("do_center_crop"):
            image = self._center_crop(image, options["crop_size"])
        if options.get("do_rescale"):
            image = _rescale(image, options["rescale_factor"])
        if options.get("do_normalize"):
            image = self._normalize(image, options["image_mean"], options["image_std"])
        return image

    def _pad_batch(self, images: list[np.ndarray], options: dict) -> list[np.ndarray]:
        """Zero-pad every image at the bottom/right to `pad_size` (or the batch's largest size)."""
        pad_size = options.get("pad_size")
        if pad_size is not None:
            target_h, target_w = pad_size["height"], pad_size["width"]
        else:
            target_h = max(image.shape[-2] for image in images)
            target_w = max(image.shape[-1] for image in images)
        padded = []
        for image in images:
            dh, dw = target_h - image.shape[-2], target_w - image.shape[-1]
            if dh < 0 or dw < 0:
                raise ValueError(
                    f"Padding dimensions are negative: pad size ({target_h}, {target_w}), image {image.shape}"
                )
            padded.append(np.pad(image, ((0, 0), (0, dh), (0, dw))) if dh or dw else image)
        return padded

    def _process_batch(self, images: list[np.ndarray], options: dict) -> list[np.ndarray]:
        images = [self._process_one(image, options) for image in images]
        if options.get("do_pad"):
            images = self._pad_batch(images, options)
        return images

    # -- public ------------------------------------------------------------------------------

    def preprocess(self, images, input_data_format=None, return_tensors: str | None = "np", **overrides) -> np.ndarray:
        """Image(s) -- PIL, HWC/CHW arrays (uint8, or floats in [0, 1]), 4-D batches, lists -- to
        the model's `pixel_values`: an NCHW float32 array.  Keyword arguments override the
        processor's settings for this call (e.g. `do_center_crop=False`), as in transformers."""
        if return_tensors not in (None, "np"):
            raise ValueError(f"sdort image processors return numpy arrays; return_tensors={return_tensors!r}")
        unknown = set(overrides) - set(self._option_names)
        if unknown:
            raise TypeError(f"Unexpected keyword arguments for {type(self).__name__}: {sorted(unknown)}")
        options = {name: overrides.get(name, getattr(self, name)) for name in self._option_names}
        options = self._standardize(options)
        self._validate(options)
        input_data_format = _as_format(input_data_format)
        do_convert_rgb = options.get("do_convert_rgb")
        chw = [self._to_chw(image, do_convert_rgb, input_data_format) for image in self._flat_list(images)]
        processed = self._process_batch(chw, options)
        if len({image.shape for image in processed}) > 1:
            raise ValueError(
                "Unable to create a batch from images of different sizes: "
                f"{sorted({image.shape for image in processed})}"
            )
        return np.stack(processed).astype(np.float32, copy=False)

    def __call__(self, images, *args, **kwargs) -> np.ndarray:
        return self.preprocess(images, *args, **kwargs)


def _size_with_aspect_ratio(image_size, size, max_size=None) -> tuple[int, int]:
    """transformers' `get_size_with_aspect_ratio`: shortest edge to `size`, longest at most `max_size`."""
    height, width = image_size
    raw_size = None
    if max_size is not None:
        min_original, max_original = float(min(height, width)), float(max(height, width))
        if max_original / min_original * size > max_size:
            raw_size = max_size * min_original / max_original
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        long = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
        return long, size
    long = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return size, long


class CLIPImageProcessor(_PilBackendProcessor):
    """transformers' CLIPImageProcessor (Pillow backend, `CLIPImageProcessorPil`) in numpy and Pillow.

    Defaults (also those of lambdalabs/sd-image-variations-diffusers' feature_extractor and of the
    safety checker's): convert to RGB (transparency composited on white), resize the shortest
    edge to 224 with bicubic, centre crop 224x224, rescale by 1/255, normalise with
    OPENAI_CLIP_MEAN/STD.  `CLIPImageProcessor.from_pretrained(folder)` reads
    `preprocessor_config.json` (an int `size` means the shortest edge, an int `crop_size` a
    square).  Calling it returns `pixel_values`, an NCHW float32 numpy array, equal to
    transformers' bit for bit.  Like transformers, float arrays in [0, 1] are converted to uint8
    by truncation for Pillow's resize and are rescaled by `rescale_factor` once more afterwards.
    """

    do_convert_rgb = True
    do_resize = True
    size = {"shortest_edge": 224}
    default_to_square = False
    resample = Image.Resampling.BICUBIC
    do_center_crop = True
    crop_size = {"height": 224, "width": 224}
    do_rescale = True
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD

    def __init__(self, **kwargs):
        # transformers keeps this for KOSMOS-2: a square resize of side `shortest_edge`.
        if kwargs.pop("use_square_size", False):
            edge = type(self).size["shortest_edge"]
            kwargs["size"] = {"height": edge, "width": edge}
        super().__init__(**kwargs)


class DPTImageProcessor(_PilBackendProcessor):
    """transformers' DPTImageProcessor (Pillow backend, `DPTImageProcessorPil`) in numpy and Pillow.

    Defaults (transformers' class defaults; stabilityai/stable-diffusion-2-depth's
    feature_extractor/preprocessor_config.json is read by `from_pretrained` and may override
    them): resize to 384x384 ignoring the aspect ratio (`keep_aspect_ratio=False`,
    `ensure_multiple_of=1`), bicubic; rescale by 1/255; normalise with mean 0.5, std 0.5; no
    centre crop, no RGB conversion (so RGBA or grayscale inputs fail on the 3-channel mean,
    as in transformers), no padding.  With `keep_aspect_ratio=True` the scale closest to 1 is
    used for both sides; sizes are rounded to multiples of `ensure_multiple_of`.
    """

    do_resize = True
    size = {"height": 384, "width": 384}
    default_to_square = True
    resample = Image.Resampling.BICUBIC
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_pad = False
    ensure_multiple_of = 1
    keep_aspect_ratio = False
    size_divisor = None
    do_reduce_labels = None

    _option_names = _PilBackendProcessor._option_names + (
        "ensure_multiple_of", "keep_aspect_ratio", "size_divisor", "do_reduce_labels",
    )

    def _resize(self, image: np.ndarray, options: dict) -> np.ndarray:
        size = options["size"]
        if size.get("height") is None or size.get("width") is None:
            raise ValueError(f"Size must contain 'height' and 'width' keys. Got {set(size)}")
        multiple = options.get("ensure_multiple_of") or 1  # transformers passes it straight on

        def constrain(value, min_value=0, max_value=None):
            result = round(value / multiple) * multiple
            if max_value is not None and result > max_value:
                result = math.floor(value / multiple) * multiple
            if result < min_value:
                result = math.ceil(value / multiple) * multiple
            return result

        in_h, in_w = image.shape[-2:]
        scale_h, scale_w = size["height"] / in_h, size["width"] / in_w
        if options.get("keep_aspect_ratio"):
            # Scale as little as possible: the factor closer to 1 is used for both sides.
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        height, width = constrain(scale_h * in_h), constrain(scale_w * in_w)
        return _pil_resize_chw(image, height, width, _resample_filter(options.get("resample")))

    def _process_one(self, image: np.ndarray, options: dict) -> np.ndarray:
        if options.get("do_resize"):
            image = self._resize(image, options)
        if options.get("do_rescale"):
            image = _rescale(image, options["rescale_factor"])
        if options.get("do_normalize"):
            image = self._normalize(image, options["image_mean"], options["image_std"])
        if options.get("do_pad") and options.get("size_divisor") is not None:
            image = self._pad_to_multiple(image, options["size_divisor"])
        return image

    @staticmethod
    def _pad_to_multiple(image: np.ndarray, divisor: int) -> np.ndarray:
        """Zero-pad height and width, centred, up to multiples of `divisor`."""

        def split(length):
            extra = math.ceil(length / divisor) * divisor - length
            return extra // 2, extra - extra // 2

        height, width = image.shape[-2:]
        return np.pad(image, ((0, 0), split(height), split(width)))

    def _process_batch(self, images: list[np.ndarray], options: dict) -> list[np.ndarray]:
        # DPT pads each image to a multiple of size_divisor; there is no batch padding.
        return [self._process_one(image, options) for image in images]
