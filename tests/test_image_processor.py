"""sdort's image processors against their references, on the same inputs:

* `VaeImageProcessor` (and its mask configuration) against diffusers' VaeImageProcessor;
* `CLIPImageProcessor` / `DPTImageProcessor` against transformers' Pillow backends
  (`CLIPImageProcessorPil`, `DPTImageProcessorPil`, what transformers uses without torchvision).

Every comparison is exact (`np.testing.assert_array_equal`, PIL images pixel for pixel): sdort
makes the same Pillow calls and the same float32/float64 arithmetic, and reproduces torch's
nearest-neighbour index rule for numpy inputs exactly, so no tolerance is needed anywhere.
Sizes are odd on purpose (67x53, 130x95, ...): they are not multiples of 8 and have no common
scale factor with the targets.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers_ip = pytest.importorskip("diffusers.image_processor")
clip_pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
dpt_pil = pytest.importorskip("transformers.models.dpt.image_processing_pil_dpt")

from sdort.runtime.feature_extractors import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPImageProcessor,
    DPTImageProcessor,
)
from sdort.runtime.image_processor import VaeImageProcessor  # noqa: E402
from sdort.runtime.resampling import torch_nearest_indices  # noqa: E402

RefVae = diffusers_ip.VaeImageProcessor
RefClip = clip_pil.CLIPImageProcessorPil
RefDpt = dpt_pil.DPTImageProcessorPil

SIZES = [(67, 53), (130, 95)]  # (width, height)
MODES = ["RGB", "RGBA", "L"]


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    # Smooth-ish content (gradients + noise) so that resampling filters matter.
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 / max(width - 1, 1) + y * 128 / max(height - 1, 1))[..., None]
    data = (base + rng.integers(0, 90, (height, width, channels))) % 256
    data = data.astype(np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode=mode)


def random_mask(size: tuple[int, int], box: tuple[int, int, int, int], seed: int = 0) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = rng.integers(1, 256, (y2 - y1, x2 - x1))
    return Image.fromarray(mask, mode="L")


def to_numpy(tensor) -> np.ndarray:
    return tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)


def assert_same_pil(ours, ref):
    ours = ours if isinstance(ours, list) else [ours]
    ref = ref if isinstance(ref, list) else [ref]
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.mode == b.mode and a.size == b.size
        np.testing.assert_array_equal(np.array(a), np.array(b))


# ----------------------------------------------------------------------------------------------
# torch's nearest-neighbour rule
# ----------------------------------------------------------------------------------------------


def test_nearest_indices_match_torch_interpolate():
    for in_size in (1, 2, 3, 5, 7, 53, 64, 67, 95, 130, 1023):
        row = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, 1, in_size)
        for out_size in (1, 2, 3, 8, 48, 53, 64, 66, 67, 95, 96, 128, 134, 190, 260, 1025, 2046):
            ref = torch.nn.functional.interpolate(row, size=(1, out_size)).reshape(-1).numpy().astype(np.int64)
            got = torch_nearest_indices(in_size, out_size)
            np.testing.assert_array_equal(got, ref, err_msg=f"{in_size}->{out_size}")


# ----------------------------------------------------------------------------------------------
# VaeImageProcessor: preprocess
# ----------------------------------------------------------------------------------------------

VAE_CONFIGS = [
    {},
    {"do_convert_rgb": True},
    {"do_convert_grayscale": True},
    {"resample": "bicubic", "do_normalize": False},
    {"resample": "nearest", "vae_scale_factor": 16},
    {"resample": "bilinear", "reducing_gap": 2},
    {"do_resize": False},
]


@pytest.mark.parametrize("config", VAE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("mode", MODES)
def test_preprocess_pil_default_mode(config, mode):
    ours, ref = VaeImageProcessor(**config), RefVae(**config)
    for size in SIZES:
        image = random_image(mode, size)
        expected = to_numpy(ref.preprocess(image))
        got = ours.preprocess(image)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        if config.get("do_resize", True):
            # Explicit, odd target sizes (rounded down to the scale factor) and upscaling.
            for height, width in [(40, 72), (101, 203)]:
                np.testing.assert_array_equal(
                    ours.preprocess(image, height=height, width=width),
                    to_numpy(ref.preprocess(image, height=height, width=width)),
                )


@pytest.mark.parametrize("resize_mode", ["fill", "crop"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", [{}, {"do_convert_grayscale": True, "do_normalize": False}])
def test_preprocess_pil_fill_and_crop(resize_mode, mode, config):
    ours, ref = VaeImageProcessor(**config), RefVae(**config)
    for size in SIZES:
        image = random_image(mode, size, seed=1)
        # Wider, taller and same-aspect targets exercise both branches and the no-band case.
        for height, width in [(64, 128), (128, 64), (56, 72), (48, 64)]:
            np.testing.assert_array_equal(
                ours.preprocess(image, height=height, width=width, resize_mode=resize_mode),
                to_numpy(ref.preprocess(image, height=height, width=width, resize_mode=resize_mode)),
            )
            assert_same_pil(
                ours.resize(image, height, width, resize_mode=resize_mode),
                ref.resize(image, height, width, resize_mode=resize_mode),
            )


def test_preprocess_pil_lists_and_crops_coords():
    ours, ref = VaeImageProcessor(), RefVae()
    images = [random_image("RGB", (130, 95), seed=s) for s in range(3)]
    np.testing.assert_array_equal(ours.preprocess(images), to_numpy(ref.preprocess(images)))
    # Images of different sizes are all resized to the first one's rounded size.
    mixed = [random_image("RGB", (130, 95)), random_image("RGB", (67, 53))]
    np.testing.assert_array_equal(ours.preprocess(mixed), to_numpy(ref.preprocess(mixed)))
    box = (7, 5, 120, 90)
    np.testing.assert_array_equal(
        ours.preprocess(images, crops_coords=box, height=64, width=96),
        to_numpy(ref.preprocess(images, crops_coords=box, height=64, width=96)),
    )
    np.testing.assert_array_equal(
        ours.preprocess(images[0], crops_coords=box, resize_mode="fill", height=64, width=64),
        to_numpy(ref.preprocess(images[0], crops_coords=box, resize_mode="fill", height=64, width=64)),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_preprocess_numpy(dtype):
    ours, ref = VaeImageProcessor(), RefVae()
    rng = np.random.default_rng(3)
    for width, height in SIZES:
        hwc = rng.random((height, width, 3)).astype(dtype)
        nhwc = rng.random((2, height, width, 3)).astype(dtype)
        cases = [hwc, nhwc, [hwc, hwc[::-1].copy()], hwc[..., :1].copy()]
        for image in cases:
            for kwargs in [{}, {"height": 40, "width": 72}, {"height": 2 * height, "width": 2 * width},
                           {"height": 200, "width": 96}]:
                expected = to_numpy(ref.preprocess(image, **kwargs)).astype(np.float32)
                got = ours.preprocess(image, **kwargs)
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, expected)


def test_preprocess_numpy_without_resize_and_public_resize():
    rng = np.random.default_rng(4)
    image = rng.random((2, 53, 67, 3)).astype(np.float32)
    ours, ref = VaeImageProcessor(do_resize=False), RefVae(do_resize=False)
    np.testing.assert_array_equal(ours.preprocess(image), to_numpy(ref.preprocess(image)))
    ours, ref = VaeImageProcessor(), RefVae()
    for height, width in [(48, 64), (53, 67), (106, 134), (31, 200)]:
        np.testing.assert_array_equal(ours.resize(image, height, width), ref.resize(image, height, width))
    assert ours.get_default_height_width(image) == ref.get_default_height_width(image)
    assert ours.get_default_height_width(image, 99, None) == ref.get_default_height_width(image, 99, None)
    pil = random_image("RGB", (130, 95))
    assert ours.get_default_height_width(pil) == ref.get_default_height_width(pil) == (88, 128)


def test_preprocess_negative_values_skip_normalisation_with_warning():
    image = np.linspace(-1, 1, 2 * 16 * 24 * 3, dtype=np.float32).reshape(2, 16, 24, 3)
    with pytest.warns(FutureWarning):
        got = VaeImageProcessor().preprocess(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = to_numpy(RefVae().preprocess(image))
    np.testing.assert_array_equal(got, expected)


def test_preprocess_rejects_bad_inputs():
    with pytest.raises(ValueError):
        VaeImageProcessor().preprocess("not an image")
    with pytest.raises(ValueError):
        VaeImageProcessor().preprocess(np.zeros((1, 1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        VaeImageProcessor(do_convert_rgb=True, do_convert_grayscale=True)
    with pytest.raises(ValueError):
        VaeImageProcessor().resize(np.zeros((1, 8, 8, 3), np.float32), 8, 8, resize_mode="fill")


# ----------------------------------------------------------------------------------------------
# VaeImageProcessor: the mask configuration of the inpainting pipelines
# ----------------------------------------------------------------------------------------------

MASK_CONFIG = {"vae_scale_factor": 8, "do_normalize": False, "do_binarize": True, "do_convert_grayscale": True}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("resize_mode", ["default", "fill", "crop"])
def test_mask_processor_pil(mode, resize_mode):
    ours, ref = VaeImageProcessor(**MASK_CONFIG), RefVae(**MASK_CONFIG)
    for size in SIZES:
        mask = random_image(mode, size, seed=5)
        for kwargs in [{}, {"height": 64, "width": 96}]:
            got = ours.preprocess(mask, resize_mode=resize_mode, **kwargs)
            np.testing.assert_array_equal(got, to_numpy(ref.preprocess(mask, resize_mode=resize_mode, **kwargs)))
            assert got.shape[1] == 1 and set(np.unique(got)) <= {0.0, 1.0}


def test_mask_processor_numpy():
    ours, ref = VaeImageProcessor(**MASK_CONFIG), RefVae(**MASK_CONFIG)
    rng = np.random.default_rng(6)
    for width, height in SIZES:
        hw = rng.random((height, width)).astype(np.float32)
        # HW, HW1, NHW, a list of HW, NHW1.
        cases = [hw, hw[..., None].copy(), np.stack([hw, hw[::-1]]), [hw, hw[::-1].copy()], hw[None, ..., None].copy()]
        for mask in cases:
            for kwargs in [{}, {"height": 64, "width": 96}]:
                got = ours.preprocess(mask, **kwargs)
                np.testing.assert_array_equal(got, to_numpy(ref.preprocess(mask, **kwargs)))
                assert got.shape[1] == 1


def test_binarize_threshold():
    values = np.array([0.0, 0.2, 0.4999, 0.5, 0.7, 1.0], np.float32)
    np.testing.assert_array_equal(VaeImageProcessor().binarize(values), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(
        VaeImageProcessor().binarize(values), RefVae().binarize(torch.from_numpy(values.copy())).numpy()
    )


# ----------------------------------------------------------------------------------------------
# VaeImageProcessor: postprocess and conversions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, {"do_normalize": False}])
def test_postprocess_matches_diffusers(config):
    ours, ref = VaeImageProcessor(**config), RefVae(**config)
    rng = np.random.default_rng(7)
    for channels in (3, 1):
        image = (rng.standard_normal((2, channels, 53, 67)) * 0.7).astype(np.float32)
        tensor = torch.from_numpy(image.copy())
        for output_type in ("np", "pil"):
            for do_denormalize in (None, [True, False]):
                got = ours.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
                expected = ref.postprocess(tensor, output_type=output_type, do_denormalize=do_denormalize)
                if output_type == "np":
                    assert got.dtype == np.float32 and got.shape == (2, 53, 67, channels)
                    np.testing.assert_array_equal(got, expected)
                else:
                    assert_same_pil(got, expected)
        np.testing.assert_array_equal(ours.postprocess(image, output_type="pt"), ref.postprocess(tensor, "pt").numpy())
        assert ours.postprocess(image, output_type="latent") is image
        with pytest.warns(FutureWarning):
            np.testing.assert_array_equal(ours.postprocess(image, output_type="numpy"), ref.postprocess(tensor, "np"))
    with pytest.raises(ValueError):
        ours.postprocess([image])


def test_postprocess_keeps_the_text_to_image_api():
    processor = VaeImageProcessor(vae_scale_factor=8)
    image = np.random.default_rng(8).uniform(-1.5, 1.5, (1, 3, 16, 24)).astype(np.float32)
    out = processor.postprocess(image, output_type="np")
    np.testing.assert_array_equal(out, np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    pils = processor.postprocess(image, output_type="pil")
    assert len(pils) == 1 and pils[0].size == (24, 16) and pils[0].mode == "RGB"
    assert processor.vae_scale_factor == 8 and processor.do_normalize is True
    assert processor.config.vae_scale_factor == 8
    with pytest.raises(TypeError):
        processor.config["vae_scale_factor"] = 4
    clone = copy.deepcopy(processor)
    assert clone.config == processor.config and pickle.loads(pickle.dumps(processor)).config == processor.config
    mask_processor = VaeImageProcessor.from_config({"_class_name": "VaeImageProcessor", **MASK_CONFIG})
    reference = {k: v for k, v in RefVae(**MASK_CONFIG).config.items() if not k.startswith("_")}
    assert mask_processor.config == reference


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_round_trip_pil_preprocess_postprocess(mode):
    processor = VaeImageProcessor()
    image = random_image(mode, (72, 48), seed=9)  # multiples of 8: no resampling
    encoded = processor.preprocess(image)
    if mode == "RGBA":
        # postprocess writes 4-channel arrays as RGBA too.
        assert encoded.shape == (1, 4, 48, 72)
    restored = processor.postprocess(encoded, output_type="pil")[0]
    assert_same_pil(restored, image)
    assert_same_pil(restored, RefVae().postprocess(RefVae().preprocess(image), output_type="pil")[0])
    # Mask round trip: binarised to 0/255.
    mask_processor = VaeImageProcessor(**MASK_CONFIG)
    mask = mask_processor.postprocess(mask_processor.preprocess(image), output_type="pil")[0]
    assert mask.mode == "L" and set(np.unique(np.array(mask))) <= {0, 255}


def test_pil_numpy_conversions():
    images = [random_image("RGB", (67, 53), seed=s) for s in range(2)]
    arrays = VaeImageProcessor.pil_to_numpy(images)
    np.testing.assert_array_equal(arrays, RefVae.pil_to_numpy(images))
    np.testing.assert_array_equal(VaeImageProcessor.pil_to_numpy(images[0]), RefVae.pil_to_numpy(images[0]))
    assert_same_pil(VaeImageProcessor.numpy_to_pil(arrays), RefVae.numpy_to_pil(arrays))
    assert_same_pil(VaeImageProcessor.numpy_to_pil(arrays[0]), RefVae.numpy_to_pil(arrays[0]))
    gray = arrays[..., :1]
    assert_same_pil(VaeImageProcessor.numpy_to_pil(gray), RefVae.numpy_to_pil(gray))
    np.testing.assert_array_equal(VaeImageProcessor.normalize(arrays), RefVae.normalize(arrays))
    x = np.linspace(-2, 2, 101, dtype=np.float32)
    np.testing.assert_array_equal(VaeImageProcessor.denormalize(x), RefVae.denormalize(torch.from_numpy(x)).numpy())
    assert_same_pil(VaeImageProcessor.blur(images[0], 3), RefVae.blur(images[0], 3))


# ----------------------------------------------------------------------------------------------
# VaeImageProcessor: inpainting helpers (padding_mask_crop)
# ----------------------------------------------------------------------------------------------

CROP_CASES = [
    ((130, 95), (40, 30, 60, 50)),   # small square region in the middle
    ((130, 95), (0, 10, 129, 20)),   # wide strip
    ((130, 95), (100, 0, 110, 95)),  # tall strip at the right edge
    ((67, 53), (60, 45, 67, 53)),    # bottom-right corner
    ((67, 53), (0, 0, 3, 2)),        # top-left corner
]


@pytest.mark.parametrize("size,box", CROP_CASES)
def test_get_crop_region(size, box):
    mask = random_mask(size, box, seed=10)
    for width, height in [(512, 512), (64, 32), (32, 96), (67, 53)]:
        for pad in (0, 3, 32):
            got = VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)
            assert got == RefVae.get_crop_region(mask, width, height, pad=pad), (width, height, pad)
            assert all(isinstance(v, int) for v in got)
    rgb_mask = mask.convert("RGB")
    assert VaeImageProcessor.get_crop_region(rgb_mask, 64, 64, 4) == RefVae.get_crop_region(rgb_mask, 64, 64, 4)


@pytest.mark.parametrize("size,box", CROP_CASES[:3])
def test_apply_overlay(size, box):
    ours, ref = VaeImageProcessor(), RefVae()
    init_image = random_image("RGB", size, seed=11)
    mask = random_mask(size, box, seed=12)
    generated = random_image("RGB", size, seed=13)
    assert_same_pil(ours.apply_overlay(mask, init_image, generated), ref.apply_overlay(mask, init_image, generated))
    # padding_mask_crop: the generated image covers only the crop region, at processing size.
    crop = RefVae.get_crop_region(mask, 64, 64, pad=6)
    small = random_image("RGB", (64, 64), seed=14)
    assert_same_pil(
        ours.apply_overlay(mask, init_image, small, crop), ref.apply_overlay(mask, init_image, small, crop)
    )
    rgba_init = random_image("RGBA", size, seed=15)
    assert_same_pil(
        ours.apply_overlay(mask.convert("RGB"), rgba_init, generated),
        ref.apply_overlay(mask.convert("RGB"), rgba_init, generated),
    )


# ----------------------------------------------------------------------------------------------
# CLIPImageProcessor
# ----------------------------------------------------------------------------------------------

# lambdalabs/sd-image-variations-diffusers feature_extractor/preprocessor_config.json (old-style keys).
SD_VARIATIONS_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
    "size": 224,
}


def clip_reference(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RefClip(**kwargs)


def ref_pixels(processor, images, **kwargs):
    return processor(images, return_tensors="np", **kwargs)["pixel_values"]


def palette_with_transparency(size):
    image = random_image("RGB", size, seed=16).convert("P")
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("size", SIZES + [(300, 200), (20, 31), (224, 224)])
def test_clip_matches_transformers_pil_inputs(size):
    ours, ref = CLIPImageProcessor(), clip_reference()
    images = [random_image(mode, size, seed=17) for mode in MODES] + [palette_with_transparency(size)]
    for image in images:
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == (1, 3, 224, 224)
        np.testing.assert_array_equal(got, ref_pixels(ref, image))
    np.testing.assert_array_equal(ours(images), ref_pixels(ref, images))


def test_clip_matches_transformers_numpy_inputs():
    ours, ref = CLIPImageProcessor(), clip_reference()
    rng = np.random.default_rng(18)
    hwc = rng.integers(0, 256, (95, 130, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (53, 67, 4), dtype=np.uint8)
    floats = rng.random((53, 67, 3)).astype(np.float32)
    cases = [
        hwc,
        np.ascontiguousarray(hwc.transpose(2, 0, 1)),  # CHW
        np.stack([hwc, hwc[::-1]]),                     # NHWC batch
        [hwc, hwc[:, ::-1]],                            # list
        rgba,
        rgba[..., :1],                                  # one channel
        floats,                                         # floats in [0, 1]
        rgba.astype(np.float32) / 255,                  # float RGBA
    ]
    for image in cases:
        np.testing.assert_array_equal(ours(image), ref_pixels(ref, image))
    np.testing.assert_array_equal(
        ours(hwc, input_data_format="channels_last"), ref_pixels(ref, hwc, input_data_format="channels_last")
    )


def test_clip_from_pretrained(tmp_path):
    folder = tmp_path / "feature_extractor"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        CLIPImageProcessor.from_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(SD_VARIATIONS_CONFIG))
    ours = CLIPImageProcessor.from_pretrained(tmp_path, subfolder="feature_extractor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefClip.from_pretrained(folder)
    assert ours.size == {"shortest_edge": 224} and ours.crop_size == {"height": 224, "width": 224}
    image = random_image("RGBA", (130, 95), seed=19)
    np.testing.assert_array_equal(ours(image), ref_pixels(ref, image))
    np.testing.assert_array_equal(ours(image), CLIPImageProcessor()(image))


@pytest.mark.parametrize(
    "config",
    [
        {"size": {"height": 100, "width": 150}, "do_center_crop": False, "resample": 2},
        {"size": 64, "crop_size": {"height": 48, "width": 80}, "resample": 1, "do_convert_rgb": False},
        {"size": {"shortest_edge": 64, "longest_edge": 80}, "crop_size": 60},
        {"do_normalize": False, "do_rescale": True, "size": 100, "crop_size": 300},  # crop larger: zero pad
        {"use_square_size": True},
    ],
)
def test_clip_other_configs(config, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = CLIPImageProcessor.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefClip.from_pretrained(tmp_path)
    for size in SIZES:
        image = random_image("RGB", size, seed=20)
        np.testing.assert_array_equal(ours(image), ref_pixels(ref, image))
    # Keyword arguments override the configuration for one call, as in transformers.
    image = random_image("RGB", SIZES[1], seed=21)
    np.testing.assert_array_equal(ours(image, do_center_crop=False), ref_pixels(ref, image, do_center_crop=False))


# ----------------------------------------------------------------------------------------------
# DPTImageProcessor
# ----------------------------------------------------------------------------------------------


def dpt_reference(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RefDpt(**kwargs)


def test_dpt_defaults_match_transformers():
    ours, ref = DPTImageProcessor(), dpt_reference()
    assert ours.size == {"height": 384, "width": 384} and ours.keep_aspect_ratio is False
    assert ours.resample == Image.Resampling.BICUBIC and ours.image_mean == (0.5, 0.5, 0.5)
    images = [random_image("RGB", size, seed=22) for size in SIZES]
    for image in images:
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == (1, 3, 384, 384)
        np.testing.assert_array_equal(got, ref_pixels(ref, image))
    np.testing.assert_array_equal(ours(images), ref_pixels(ref, images))
    array = np.array(images[1])
    np.testing.assert_array_equal(ours(array), ref_pixels(ref, array))
    np.testing.assert_array_equal(ours([array, array]), ref_pixels(ref, [array, array]))


@pytest.mark.parametrize(
    "config",
    [
        # The old-style configuration of DPT-hybrid feature extractors: int size, bilinear.
        {"feature_extractor_type": "DPTFeatureExtractor", "size": 384, "resample": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_normalize": True, "do_resize": True},
        {"size": {"height": 96, "width": 128}, "keep_aspect_ratio": True, "ensure_multiple_of": 32},
        {"size": 100, "keep_aspect_ratio": True, "ensure_multiple_of": 14, "resample": 3},
        {"size": 64, "do_convert_rgb": True},
    ],
)
def test_dpt_configs(config, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = DPTImageProcessor.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefDpt.from_pretrained(tmp_path)
    for size in SIZES:
        image = random_image("RGB", size, seed=23)
        np.testing.assert_array_equal(ours(image), ref_pixels(ref, image))
    if config.get("do_convert_rgb"):
        image = random_image("RGBA", SIZES[0], seed=24)
        np.testing.assert_array_equal(ours(image), ref_pixels(ref, image))


def test_dpt_without_rgb_conversion_rejects_rgba_like_transformers():
    image = random_image("RGBA", SIZES[0])
    with pytest.raises(ValueError):
        dpt_reference()(image, return_tensors="np")
    with pytest.raises(ValueError):
        DPTImageProcessor()(image)


def test_dpt_padding_follows_transformers():
    image = random_image("RGB", SIZES[1], seed=25)
    # Each image zero-padded, centred, to multiples of size_divisor (90x70 -> 96x96).
    kwargs = {"size": {"height": 90, "width": 70}, "do_pad": True, "size_divisor": 32}
    got = DPTImageProcessor(**kwargs)(image)
    assert got.shape == (1, 3, 96, 96)
    np.testing.assert_array_equal(got, ref_pixels(dpt_reference(**kwargs), image))
    # Without size_divisor, DPT does not pad.
    kwargs.pop("size_divisor")
    np.testing.assert_array_equal(DPTImageProcessor(**kwargs)(image), ref_pixels(dpt_reference(**kwargs), image))


def test_clip_batch_padding_follows_transformers():
    images = [random_image("RGB", (130, 95), seed=26), random_image("RGB", (67, 53), seed=27)]
    kwargs = {"do_center_crop": False, "size": 60, "do_pad": True}
    got = CLIPImageProcessor(**kwargs)(images)
    np.testing.assert_array_equal(got, ref_pixels(clip_reference(**kwargs), images))
    kwargs["pad_size"] = {"height": 100, "width": 120}
    np.testing.assert_array_equal(CLIPImageProcessor(**kwargs)(images), ref_pixels(clip_reference(**kwargs), images))
