"""transformers' CLIPImageProcessor and DPTImageProcessor in numpy and Pillow (their Pillow
backends, `CLIPImageProcessorPil`/`DPTImageProcessorPil`, which transformers uses without
torchvision): the feature extractors of the image-variation pipeline (CLIP image encoder) and of
the depth-to-image pipeline (DPT depth estimator). They return `pixel_values` as NCHW float32.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import Image

from .model_files import read_json
from .resampling import pil_resize_chw, resample_filter, rescale

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
        config = read_json(path)
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
        return pil_resize_chw(image, height, width, resample_filter(options.get("resample")))

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
            image = rescale(image, options["rescale_factor"])
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
        return pil_resize_chw(image, height, width, resample_filter(options.get("resample")))

    def _process_one(self, image: np.ndarray, options: dict) -> np.ndarray:
        if options.get("do_resize"):
            image = self._resize(image, options)
        if options.get("do_rescale"):
            image = rescale(image, options["rescale_factor"])
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
