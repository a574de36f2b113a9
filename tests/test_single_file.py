"""Single-file checkpoints (original CompVis / Stability / A1111 key names) in `sd-export`.

Claims:
- the test's writer of original-format files is right: diffusers' `from_single_file` of the file
  gives back the tiny model's weights exactly (SD 1.x, SD 2.x with OpenCLIP, SDXL base and refiner);
- `sd-export FILE OUT --config DIR` gives the folder whose images equal those of diffusers'
  `from_single_file(FILE, config=DIR)` pipeline within 1e-3 max abs on [0, 1] (fp32, same seeds:
  the bound every parity test of the project holds, ONNX Runtime's kernels against torch's), for SD 1.x
  and SDXL; an inpainting file gives the inpainting pipeline's source;
- pickles are refused without --allow-pickle and read with it; offline without --config the error
  says to pass --config; unreadable or foreign files are named in the error, and nothing is written.

The config folders hold the saved pipelines' configs without their weights, so every weight that
diffusers and sdort use comes from the single file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import tiny_components, tiny_xl_components
from single_file_support import write_single_file

TOLERANCE = 1e-3


def _configs_only(pipe, folder: Path) -> Path:
    """`save_pretrained` with the weight files removed: a diffusers config folder."""
    pipe.save_pretrained(folder)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return folder


def _build(tmp: Path, cls_name: str, components: dict, suffix=".safetensors", open_clip=False, **options):
    """A tiny diffusers pipeline written as a single file, with its config folder; returns
    (original pipeline, file, config folder)."""
    import diffusers

    pipe = getattr(diffusers, cls_name)(**components, **options)
    config = _configs_only(pipe, tmp / "config")
    return pipe, write_single_file(pipe.components, tmp / f"model{suffix}", open_clip=open_clip), config


def _export(file: Path, out: Path, *flags) -> Path:
    """`sd-export FILE OUT`: the graphs as traced (--no-optimize), as what is proven here is the weights
    and configs a single file gives; the optimised graphs' parity is tests/test_optimize.py's, and
    optimising would add a third to this file's time."""
    from sdort.export.cli import main

    assert main([str(file), str(out), "--no-optimize", *flags]) == 0
    return out


def _reference(cls_name: str, file: Path, config: Path, **options):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_single_file(str(file), config=str(config), **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_same_weights(original, loaded, names):
    import torch

    for name in names:
        ours, theirs = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{name}: {different[:3]}"


def _compare(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= TOLERANCE


def _generator(seed):
    import torch

    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single_sd1")
    return _build(tmp, "StableDiffusionPipeline", tiny_components())


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single_sdxl")
    return _build(tmp, "StableDiffusionXLPipeline", tiny_xl_components(), add_watermarker=False)


def test_sd1_matches_from_single_file(sd1_file, tmp_path):
    from sdort.runtime import StableDiffusionPipeline

    original, file, config = sd1_file
    reference = _reference("StableDiffusionPipeline", file, config)
    _assert_same_weights(original, reference, ("unet", "vae", "text_encoder"))
    out = _export(file, tmp_path / "onnx", "--config", str(config))
    ours = StableDiffusionPipeline.from_pretrained(out, provider="cpu")
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red fox in the snow", negative_prompt="blurry", num_inference_steps=2,
                  height=64, width=64, output_type="np")
    _compare(ours(generator=3, **kwargs).images, reference(generator=_generator(3), **kwargs).images)


def test_sdxl_matches_from_single_file(sdxl_file, tmp_path):
    from sdort.runtime import StableDiffusionXLPipeline

    original, file, config = sdxl_file
    reference = _reference("StableDiffusionXLPipeline", file, config, add_watermarker=False)
    _assert_same_weights(original, reference, ("unet", "vae", "text_encoder", "text_encoder_2"))
    out = _export(file, tmp_path / "onnx", "--config", str(config))
    ours = StableDiffusionXLPipeline.from_pretrained(out, provider="cpu")
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a lighthouse at dusk", num_inference_steps=2, height=64, width=64, output_type="np")
    _compare(ours(generator=4, **kwargs).images, reference(generator=_generator(4), **kwargs).images)


def test_sd2_and_sdxl_refiner_files_read_back_exactly(tmp_path):
    """The OpenCLIP layouts (SD 2.x's `cond_stage_model.model.`, the refiner's lone
    `conditioner.embedders.0.model.`) come back weight for weight, in diffusers and in sdort's Source."""
    from sdort.export.sources import load_source

    sd2 = _build(tmp_path / "sd2", "StableDiffusionPipeline", tiny_components(v_prediction=True), open_clip=True)
    refiner = _build(tmp_path / "refiner", "StableDiffusionXLImg2ImgPipeline", tiny_xl_components("refiner"),
                     add_watermarker=False)
    for (original, file, config), cls_name, names in [
        (sd2, "StableDiffusionPipeline", ("unet", "vae", "text_encoder")),
        (refiner, "StableDiffusionXLImg2ImgPipeline", ("unet", "vae", "text_encoder_2")),
    ]:
        options = {"add_watermarker": False} if "XL" in cls_name else {}
        _assert_same_weights(original, _reference(cls_name, file, config, **options), names)
        source = load_source(str(file), config=str(config))
        assert source.pipeline_class == cls_name and set(source.modules) == set(names)
        _assert_same_weights(original, SimpleNamespace(**source.modules), names)


def test_inpainting_file_gives_the_inpaint_source(tmp_path):
    """A 9-channel (inpainting) file becomes the inpainting pipeline's Source, its UNet's weights those of
    diffusers' `from_single_file`. (The export of such a Source, and its parity with diffusers'
    inpainting, is tests/test_inpaint.py's; a second export here would double this file's time.)"""
    import diffusers
    import torch

    from sdort.export.sources import load_source

    components = tiny_components()
    torch.manual_seed(5)  # the tiny UNet with the inpainting input: latents, mask, masked-image latents
    components["unet"] = diffusers.UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    original, file, config = _build(tmp_path, "StableDiffusionInpaintPipeline", components)
    _assert_same_weights(original, _reference("StableDiffusionInpaintPipeline", file, config), ("unet",))
    source = load_source(str(file), config=str(config))
    assert source.pipeline_class == "StableDiffusionInpaintPipeline"
    _assert_same_weights(original, SimpleNamespace(**source.modules), ("unet", "vae", "text_encoder"))


def test_pickle_refused_without_allow_pickle(sd1_file, tmp_path, capsys):
    from sdort.export.cli import main
    from sdort.export.sources import load_source

    original, _, config = sd1_file
    ckpt = write_single_file(original.components, tmp_path / "model.ckpt")
    out = tmp_path / "onnx"
    assert main([str(ckpt), str(out), "--config", str(config)]) == 2
    message = capsys.readouterr().err
    assert str(ckpt) in message and "pickle" in message and "--allow-pickle" in message
    assert not out.exists() and list(tmp_path.iterdir()) == [ckpt]
    # With it, the .ckpt ({"state_dict": ...} as CompVis saved them) reads as the safetensors file does.
    source = load_source(str(ckpt), config=str(config), allow_pickle=True)
    _assert_same_weights(original, SimpleNamespace(**source.modules), ("unet", "vae", "text_encoder"))


def test_offline_without_config_says_to_pass_config(sd1_file, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    from sdort.export.cli import main

    # An empty Hub cache and HF_HUB_OFFLINE (conftest): the configs diffusers infers cannot be had.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, file, _ = sd1_file
    out = tmp_path / "onnx"
    assert main([str(file), str(out)]) == 2
    message = capsys.readouterr().err
    assert str(file) in message and "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "--config" in message
    assert not out.exists()


def test_unreadable_and_foreign_files_are_named(sd1_file, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from sdort.export.cli import main

    original, file, config = sd1_file
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(file.read_bytes()[:1000])  # a truncated download
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.ones(())}, str(lora))
    unknown = tmp_path / "model.gguf"
    unknown.write_bytes(b"GGUF")
    inpaint_config = tmp_path / "inpaint_config"  # a 4-channel file against a 9-channel config
    shutil.copytree(config, inpaint_config)
    unet_config = inpaint_config / "unet" / "config.json"
    unet_config.write_text(unet_config.read_text().replace('"in_channels": 4', '"in_channels": 9'))
    cases = [
        ([corrupt, "--config", config], "cannot be read as a checkpoint"),
        ([lora, "--config", config], "not a Stable Diffusion checkpoint"),
        ([unknown], "must end in .safetensors"),
        ([file, "--config", inpaint_config], "takes 4 input channels"),
        ([file, "--config", tmp_path / "missing"], "--config must be a local diffusers folder"),
        ([config, "--config", config], "--config applies to a single-file checkpoint"),
    ]
    for args, expected in cases:
        out = tmp_path / "onnx"
        assert main([str(a) for a in (args[0], out, *args[1:])]) == 2
        message = capsys.readouterr().err
        named = args[-1] if expected.startswith("--config must") else args[0]  # the parameter at fault
        assert expected in message and str(named) in message, message
        assert not out.exists()
