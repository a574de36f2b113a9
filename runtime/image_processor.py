"""Image pre- and postprocessing for sdort, in numpy and Pillow only.

`VaeImageProcessor` reproduces diffusers.image_processor.VaeImageProcessor number for number: it
turns PIL images or numpy arrays into the NCHW arrays the VAE encoder takes, and VAE output back
into numpy/PIL images. Configured as diffusers' inpainting pipelines configure their mask processor
(`VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
do_convert_grayscale=True)`) it is also the mask processor. It carries the inpainting helpers
`get_crop_region` and `apply_overlay` used by `padding_mask_crop`.

The feature extractors of the CLIP image encoder and the DPT depth estimator are in
`feature_extractors.py`.

Where diffusers hands back torch tensors, sdort hands back numpy arrays (NCHW float32).  The
differences that remain are listed in each class's docstring.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .resampling import PIL_INTERPOLATION, resize_nearest_nchw

__all__ = [
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
      reproduced exactly (see `torch_nearest_indices`), so the results are identical (tested
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
            resized = resize_nearest_nchw(self.numpy_to_nchw(image), height, width)
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
                batch = resize_nearest_nchw(batch, height, width)

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
