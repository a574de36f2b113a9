"""Depth-to-image and image variations: export and parity with diffusers on tiny models (fp32).

Claim: with the same weights, inputs and seed (TorchGenerator on our side, torch.Generator on
diffusers'), sdort's images equal diffusers' within 1e-3 max abs on the [0, 1] scale, whether the
depth map is given or estimated by the exported DPT model; and the variation pipeline, which has
no text encoder, matches diffusers' too.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_components

TOLERANCE = 1e-3
QUIET = dict(log=lambda *_: None)


def rgb_image(height=64, width=64, seed=0) -> Image.Image:
    """A smooth picture with some structure (random pixels would make every depth map alike)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 0.4 + 0.5
    noisy = base + rng.normal(0, 0.05, base.shape)
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8))


def tiny_unet(in_channels: int, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
    )


def tiny_dpt(seed: int = 3):
    """A non-hybrid DPT small enough for tests; initializer_range 0.1 keeps its depth away from 0."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    return DPTForDepthEstimation(DPTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, backbone_out_indices=(0, 1, 2, 3), is_hybrid=False, neck_hidden_sizes=[16, 16, 32, 32],
        reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, use_auxiliary_head=False, initializer_range=0.1,
    )).eval()


def save_and_export(pipeline, folder, reference_class):
    from sdort.export import export

    source = folder / "diffusers"
    pipeline.save_pretrained(source)
    reference = reference_class.from_pretrained(source)  # as a diffusers user loading the folder
    reference.set_progress_bar_config(disable=True)
    return reference, export(str(source), folder / "onnx", **QUIET), source


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTImageProcessor

    parts = tiny_components()
    pipe = StableDiffusionDepth2ImgPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=tiny_unet(5),
        scheduler=parts["scheduler"], depth_estimator=tiny_dpt(),
        feature_extractor=DPTImageProcessor(size={"height": 32, "width": 32}),
    )
    return save_and_export(pipe, tmp_path_factory.mktemp("depth"), StableDiffusionDepth2ImgPipeline)


@pytest.fixture(scope="module")
def variation_model(tmp_path_factory):
    import torch
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    parts = tiny_components()
    torch.manual_seed(4)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=5, image_size=32, patch_size=4,
    )).eval()
    pipe = StableDiffusionImageVariationPipeline(
        vae=parts["vae"], image_encoder=encoder, unet=parts["unet"], scheduler=parts["scheduler"],
        safety_checker=None, feature_extractor=CLIPImageProcessor(crop_size=32, size=32), requires_safety_checker=False,
    )
    return save_and_export(pipe, tmp_path_factory.mktemp("variation"), StableDiffusionImageVariationPipeline)


@pytest.fixture(scope="module")
def depth_pipe(depth_model):
    """sdort's pipeline on the exported depth model, loaded once (calls do not change it)."""
    from sdort.runtime.pipelines.depth_to_image import StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(depth_model[1], provider="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def variation_pipe(variation_model):
    from sdort.runtime.pipelines.image_variation import StableDiffusionImageVariationPipeline

    pipe = StableDiffusionImageVariationPipeline.from_pretrained(variation_model[1], provider="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(got, expected):
    assert got.shape == expected.shape and got.dtype == np.float32
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= TOLERANCE


# ---- export ------------------------------------------------------------------------------------


def test_depth_export_layout(depth_model):
    _, out, source = depth_model
    for part in ("text_encoder", "unet", "vae_encoder", "vae_decoder", "depth_estimator"):
        assert (out / part / "model.onnx").is_file() and (out / part / "config.json").is_file()
    names = sorted(p.name for p in (out / "tokenizer").iterdir())
    assert names and names == sorted(p.name for p in (source / "tokenizer").iterdir())
    copied = out / "feature_extractor" / "preprocessor_config.json"
    assert copied.read_bytes() == (source / "feature_extractor" / "preprocessor_config.json").read_bytes()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionDepth2ImgPipeline"
    assert index["depth_estimator"] == ["transformers", "DPTForDepthEstimation"]
    assert index["feature_extractor"] == ["transformers", "DPTImageProcessor"] and "image_encoder" not in index
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 5
    manifest = json.loads((out / "sdort.json").read_text())
    assert manifest["parts"]["depth_estimator"]["outputs"] == ["predicted_depth"]


def test_variation_export_layout(variation_model):
    _, out, source = variation_model
    for part in ("unet", "vae_encoder", "vae_decoder", "image_encoder"):
        assert (out / part / "model.onnx").is_file()
    assert not (out / "text_encoder").exists() and not (out / "tokenizer").exists()
    copied = out / "feature_extractor" / "preprocessor_config.json"
    assert copied.read_bytes() == (source / "feature_extractor" / "preprocessor_config.json").read_bytes()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionImageVariationPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert "text_encoder" not in index and "tokenizer" not in index


def test_presets_build_their_task():
    from sdort.export.parts import parts_for
    from sdort.export.sources import PRESETS, build_preset
    from sdort.runtime.feature_extractors import CLIPImageProcessor, DPTImageProcessor

    assert {"tiny-depth", "tiny-variation"} <= set(PRESETS)
    depth = build_preset("tiny-depth")
    assert depth.modules["unet"].config.in_channels == 5
    assert [p.name for p in parts_for(depth.modules)][-1] == "depth_estimator"
    assert json.loads(depth.feature_extractor)["size"] == {"height": 32, "width": 32}
    pixels = DPTImageProcessor(**json.loads(depth.feature_extractor))(rgb_image(40, 48))
    import torch

    with torch.no_grad():
        predicted = depth.modules["depth_estimator"](torch.from_numpy(pixels)).predicted_depth
    assert float(predicted.max() - predicted.min()) > 1e-3  # a depth map worth normalising
    variation = build_preset("tiny-variation")
    assert "text_encoder" not in variation.modules and variation.tokenizers == {}
    assert [p.name for p in parts_for(variation.modules)] == ["unet", "vae_encoder", "vae_decoder", "image_encoder"]
    pixels = CLIPImageProcessor(**json.loads(variation.feature_extractor))(rgb_image())
    assert pixels.shape == (1, 3, 32, 32)
    modules = variation.modules
    assert modules["image_encoder"].config.projection_dim == modules["unet"].config.cross_attention_dim


def test_export_rejects_depth_model_without_depth_channel(tmp_path, depth_model):
    from sdort.export import export

    folder = tmp_path / "four-channel"
    shutil.copytree(depth_model[2], folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    tiny_unet(4).save_pretrained(folder / "unet")
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == 4 != config["in_channels"]
    with pytest.raises(ValueError, match="5 input channels"):
        export(str(folder), tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


# ---- depth-to-image ----------------------------------------------------------------------------


def test_bicubic_resize_equals_torch():
    import torch

    from sdort.runtime.resampling import resize_bicubic

    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(64, 64, 8, 8), (37, 53, 9, 7), (5, 6, 12, 17), (8, 8, 8, 8), (100, 30, 13, 31)]:
        x = rng.standard_normal((2, 1, h, w)).astype(np.float32)
        expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(oh, ow), mode="bicubic",
                                                   align_corners=False).numpy()
        got = resize_bicubic(x, oh, ow)
        assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("estimated", [False, True], ids=["given", "estimated"])
def test_depth_map_equals_diffusers(depth_model, depth_pipe, estimated):
    import torch

    reference = depth_model[0]
    ours = depth_pipe
    image = rgb_image(72, 56, seed=1)  # not square: the depth map follows the image's shape
    depth = None if estimated else np.random.default_rng(2).random((1, 50, 40)).astype(np.float32)
    with torch.no_grad():
        expected = reference.prepare_depth_map(image, None if depth is None else torch.from_numpy(depth), 2, False,
                                               torch.float32, torch.device("cpu")).numpy()
    got = ours.prepare_depth_map(image, depth, 2, (9, 7))
    assert got.shape == expected.shape == (2, 1, 9, 7)
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("strength", [0.3, 1.0])
@pytest.mark.parametrize("estimated", [False, True], ids=["given", "estimated"])
def test_depth_to_image_matches_diffusers(depth_model, depth_pipe, strength, estimated):
    import torch

    from sdort.runtime import TorchGenerator

    reference = depth_model[0]
    ours = depth_pipe
    depth = None if estimated else np.random.default_rng(5).random((1, 64, 64)).astype(np.float32)
    kwargs = dict(prompt="a house by a lake", image=rgb_image(), strength=strength, num_inference_steps=5,
                  num_images_per_prompt=2, negative_prompt="blurry", output_type="np")
    got = ours(depth_map=depth, generator=TorchGenerator(7), **kwargs).images
    expected = reference(depth_map=None if depth is None else torch.from_numpy(depth),
                         generator=torch.Generator().manual_seed(7), **kwargs).images
    assert got.shape == (2, 64, 64, 3)
    compare(got, expected)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # two different samples, not one repeated


def test_depth_map_forms_agree(depth_pipe, tmp_path):
    from sdort.runtime import TorchGenerator

    ours = depth_pipe
    depth16 = (np.random.default_rng(3).random((48, 40)) * 65535).astype(np.uint16)
    np.save(tmp_path / "depth.npy", depth16.astype(np.float32))
    kwargs = dict(prompt="a hill", image=rgb_image(), strength=0.6, num_inference_steps=3, output_type="np")
    runs = [ours(depth_map=form, generator=TorchGenerator(1), **kwargs).images
            for form in (depth16.astype(np.float32)[None], depth16.astype(np.float32),
                         Image.fromarray(depth16), str(tmp_path / "depth.npy"))]
    for images in runs[1:]:
        np.testing.assert_allclose(images, runs[0], atol=1e-6)


def test_depth_without_depth_estimator_needs_a_depth_map(depth_model, tmp_path):
    from sdort.runtime.pipelines.depth_to_image import StableDiffusionDepth2ImgPipeline

    folder = tmp_path / "no-estimator"
    shutil.copytree(depth_model[1], folder)
    shutil.rmtree(folder / "depth_estimator")
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(folder, provider="cpu")
    kwargs = dict(prompt="a hill", image=rgb_image(), num_inference_steps=2, output_type="np")
    with pytest.raises(ValueError, match="depth_estimator"):
        pipe(**kwargs)
    images = pipe(depth_map=np.random.default_rng(0).random((64, 64)), **kwargs).images
    assert images.shape == (1, 64, 64, 3) and np.all(np.isfinite(images))


def test_depth_needs_a_depth_unet(depth_pipe, variation_pipe):
    from sdort.runtime.pipelines.depth_to_image import StableDiffusionDepth2ImgPipeline

    depth, variation = depth_pipe, variation_pipe
    with pytest.raises(ValueError, match="'unet'.* 5 input channels"):
        StableDiffusionDepth2ImgPipeline(**{**depth.components, "unet": variation.unet})
    # Sharing sessions with another task works both ways.
    from sdort.runtime.pipelines.image_to_image import StableDiffusionImg2ImgPipeline

    again = StableDiffusionDepth2ImgPipeline(**StableDiffusionImg2ImgPipeline(**depth.components).components)
    assert again.depth_estimator is depth.depth_estimator


@pytest.mark.parametrize("kwargs, name", [
    (dict(image=None), "image"),
    (dict(strength=1.5), "strength"),
    (dict(depth_map=np.zeros((2, 3, 8, 8))), "depth_map"),
    (dict(depth_map="depth.png"), "depth_map"),
    (dict(depth_map=np.zeros((3, 8, 8)), num_images_per_prompt=2), "depth_map"),
    (dict(depth_map=[1, 2]), "depth_map"),
    (dict(callback_on_step_end_tensor_inputs=["depth_mask"]), "callback_on_step_end_tensor_inputs"),
    (dict(prompt=None), "prompt"),
    (dict(generator=[1, 2, 3]), "generator"),
])
def test_depth_bad_input_names_the_parameter(depth_pipe, kwargs, name):
    pipe = depth_pipe
    kwargs = {"prompt": "a dog", "image": rgb_image(), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


# ---- image variation ---------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_variation_matches_diffusers(variation_model, variation_pipe, guidance_scale):
    import torch

    from sdort.runtime import TorchGenerator

    reference = variation_model[0]
    ours = variation_pipe
    images = [rgb_image(seed=0), rgb_image(48, 80, seed=1)]
    kwargs = dict(num_inference_steps=4, num_images_per_prompt=2, guidance_scale=guidance_scale, output_type="np",
                  height=64, width=64)
    got = ours(images, generator=TorchGenerator(3), **kwargs).images
    expected = reference(images, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert got.shape == (4, 64, 64, 3)
    compare(got, expected)


def test_variation_pixel_values_latents_and_callback(variation_model, variation_pipe):
    import torch

    reference = variation_model[0]
    ours = variation_pipe
    pixels = ours.feature_extractor(rgb_image(seed=2))
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    seen = []
    got = ours(pixels, num_inference_steps=3, latents=latents, output_type="np",
               callback=lambda step, t, x: seen.append((step, int(t), x.shape))).images
    expected_seen = []
    expected = reference(torch.from_numpy(pixels), num_inference_steps=3, latents=torch.from_numpy(latents),
                         output_type="np",
                         callback=lambda step, t, x: expected_seen.append((step, int(t), tuple(x.shape)))).images
    compare(got, expected)
    assert seen == expected_seen and len(seen) == 3


def test_variation_has_no_text_encoder(variation_pipe):
    from sdort.runtime.pipelines.image_variation import StableDiffusionImageVariationPipeline

    pipe = variation_pipe
    # conditioned by an image: no prompt encoder, and no text parts among its components
    assert not hasattr(pipe, "encode_prompt") and not hasattr(pipe, "prompt_encoder")
    assert "text_encoder" not in pipe.components and "tokenizer" not in pipe.components
    embeds, negative = pipe.encode_image_embeddings(rgb_image(), 3, True)
    assert embeds.shape == (3, 1, 32) and not negative.any()
    assert pipe.feature_extractor.crop_size == {"height": 32, "width": 32}
    again = StableDiffusionImageVariationPipeline(**pipe.components)
    assert again.image_encoder is pipe.image_encoder
    with pytest.raises(ValueError, match="image_encoder"):
        StableDiffusionImageVariationPipeline(**{**pipe.components, "image_encoder": None})


@pytest.mark.parametrize("kwargs, name", [
    (dict(image=None), "image"),
    (dict(image="picture.png"), "image"),
    (dict(height=60), "height"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(callback_steps=0), "callback_steps"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents"),
    (dict(generator=[1, 2, 3]), "generator"),
])
def test_variation_bad_input_names_the_parameter(variation_pipe, kwargs, name):
    pipe = variation_pipe
    kwargs = {"image": rgb_image(), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)
