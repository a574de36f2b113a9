"""Image resampling, written once: torch's `interpolate` (nearest, bicubic) in numpy, and Pillow's
resize for channel-first arrays.

diffusers resizes masks and latent-sized maps with torch (`interpolate`, nearest or bicubic) and
images with Pillow; these reproduce each exactly, so the pipelines' inputs equal diffusers' bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Resampling filters by the names diffusers' configs use (diffusers.utils.PIL_INTERPOLATION).
PIL_INTERPOLATION = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}

def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
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


def resize_nearest_nchw(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """`torch.nn.functional.interpolate(images, size=(height, width))` (mode "nearest") on NCHW numpy."""
    rows = torch_nearest_indices(images.shape[2], height)
    cols = torch_nearest_indices(images.shape[3], width)
    return np.ascontiguousarray(images[:, :, rows][:, :, :, cols])


_CUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution constant


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four cubic-convolution weights for fractional offsets `t` ([n] -> [n, 4]), as torch's
    `get_cubic_upsample_coefficients`: taps at -1, 0, 1, 2 around the floor of the source position."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out, 4] and weights [out, 4] along one axis for torch's
    `interpolate(mode="bicubic", align_corners=False)` given an output size.

    torch: scale = in / out; source position = scale * (i + 0.5) - 0.5, not clamped for cubic;
    taps floor(position) - 1 ... + 2, each clamped to the border (replicate padding).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    position = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    floor = np.floor(position)
    weights = _cubic_weights((position - floor).astype(np.float64))
    taps = floor.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(taps, 0, in_size - 1), weights


def resize_bicubic(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """`torch.nn.functional.interpolate(images, size=(height, width), mode="bicubic",
    align_corners=False)` on an NCHW array, without antialiasing (as torch's default).

    Separable: rows then columns, in float64, returned in the input's float dtype.
    """
    images = np.asarray(images)
    rows, row_weights = _bicubic_axis(images.shape[2], height)
    cols, col_weights = _bicubic_axis(images.shape[3], width)
    x = images.astype(np.float64)
    x = np.einsum("nchkw,hk->nchw", x[:, :, rows, :], row_weights)
    x = np.einsum("nchwk,wk->nchw", x[:, :, :, cols], col_weights)
    return x.astype(images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32)


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
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


def pil_resize_chw(image: np.ndarray, height: int, width: int, resample, reducing_gap=None) -> np.ndarray:
    """Resize a CHW array with Pillow, as transformers' `image_transforms.resize` does: floats in
    [0, 1] are scaled to [0, 255] and truncated to uint8 first, and scaled back by 1/255 after."""
    rescaled = _needs_rescale_for_pil(image)
    hwc = np.moveaxis(image, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if rescaled:
        hwc = rescale(hwc, 255)
    pil = Image.fromarray(hwc.astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=resample, reducing_gap=reducing_gap))
    if out.ndim == 2:
        out = out[..., None]
    out = np.moveaxis(out, -1, 0)
    return rescale(out, 1 / 255) if rescaled else out


def resample_filter(resample):
    if resample is None:
        return Image.Resampling.BILINEAR
    if isinstance(resample, str):
        return PIL_INTERPOLATION[resample.lower()]
    return Image.Resampling(int(resample))
