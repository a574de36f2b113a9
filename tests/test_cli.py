"""The `sdort` command: PNGs with their parameters, numbered files, one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def sdort(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdort.runtime.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "TQDM_DISABLE": "1"})


def test_txt2img_writes_png_with_metadata(tiny_export, tmp_path):
    out = tmp_path / "fox.png"
    result = sdort("txt2img", "--model", str(tiny_export), "a red fox", "--negative-prompt", "blurry",
                   "--steps", "3", "--guidance", "6", "--seed", "42", "--height", "64", "--width", "72",
                   "--scheduler", "euler", "-o", str(out))
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (72, 64)
    meta = image.text
    assert meta["prompt"] == "a red fox" and meta["negative_prompt"] == "blurry"
    assert meta["seed"] == "42" and meta["steps"] == "3" and meta["guidance"] == "6.0"
    assert meta["scheduler"] == "EulerDiscreteScheduler" and meta["size"] == "72x64"
    assert meta["model"] == str(tiny_export) and meta["rng"] == "torch-cpu"
    # the same seed gives the same image
    again = tmp_path / "again.png"
    sdort("txt2img", "--model", str(tiny_export), "a red fox", "--negative-prompt", "blurry", "--steps", "3",
          "--guidance", "6", "--seed", "42", "--height", "64", "--width", "72", "--scheduler", "euler", "-o", str(again))
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(image))


def test_several_images_get_numbered_names(tiny_export, tmp_path):
    result = sdort("txt2img", "--model", str(tiny_export), "a boat", "--steps", "2", "--num-images", "2",
                   "--seed", "1", "-o", str(tmp_path / "boat.png"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boat-1.png", "boat-2.png"]
    a, b = (np.asarray(Image.open(tmp_path / f"boat-{i}.png")) for i in (1, 2))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("args, word", [
    (["--height", "60"], "height"),
    (["--steps", "0"], "num_inference_steps"),
    (["--guidance", "-2"], "guidance_scale"),
    (["--scheduler", "nope"], "scheduler"),
    (["--steps", "x"], "--steps"),
])
def test_bad_input_exits_2_with_one_line(tiny_export, tmp_path, args, word):
    result = sdort("txt2img", "--model", str(tiny_export), "a dog", "-o", str(tmp_path / "dog.png"), *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and word in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_folder(tmp_path):
    result = sdort("txt2img", "--model", str(tmp_path), "a dog", "-o", str(tmp_path / "dog.png"))
    assert result.returncode == 2 and "not an exported model" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def start_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "start.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(path.with_name("mask.png"))
    return path


def test_img2img_and_inpaint(tiny_export, tmp_path, start_image):
    result = sdort("img2img", "--model", str(tiny_export), "an oil painting", "--image", str(start_image),
                   "--strength", "0.5", "--steps", "4", "--seed", "3", "-o", str(tmp_path / "oil.png"))
    assert result.returncode == 0, result.stderr
    meta = Image.open(tmp_path / "oil.png").text
    assert meta["task"] == "img2img" and meta["strength"] == "0.5" and meta["image"] == str(start_image)
    result = sdort("inpaint", "--model", str(tiny_export), "a window", "--image", str(start_image),
                   "--mask", str(start_image.with_name("mask.png")), "--steps", "3", "-o", str(tmp_path / "win.png"))
    assert result.returncode == 0, result.stderr
    inpainted = np.asarray(Image.open(tmp_path / "win.png"))
    assert inpainted.shape == (64, 64, 3)


def test_depth2img_and_variation(tmp_path, start_image):
    from sdort.export import export

    depth = export("tiny-depth", tmp_path / "depth", log=lambda *_: None)
    variation = export("tiny-variation", tmp_path / "variation", log=lambda *_: None)
    result = sdort("depth2img", "--model", str(depth), "a street", "--image", str(start_image), "--steps", "3",
                   "-o", str(tmp_path / "street.png"))
    assert result.returncode == 0, result.stderr
    result = sdort("variation", "--model", str(variation), "--image", str(start_image), "--steps", "3",
                   "-o", str(tmp_path / "var.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "var.png").text["task"] == "variation"
    # a depth model cannot do text-to-image: one clear line
    result = sdort("txt2img", "--model", str(depth), "a dog", "--steps", "2", "-o", str(tmp_path / "dog.png"))
    assert result.returncode == 2 and "5 input channels" in result.stderr
    assert not (tmp_path / "dog.png").exists()


def test_missing_input_image(tiny_export, tmp_path):
    result = sdort("img2img", "--model", str(tiny_export), "x", "--image", str(tmp_path / "none.png"),
                   "-o", str(tmp_path / "o.png"))
    assert result.returncode == 2 and "--image" in result.stderr


def test_scheduler_names_resolve_and_are_listed():
    from sdort.schedulers import SCHEDULER_NAMES, scheduler_from_name
    from sdort.schedulers import __all__ as exported

    config = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "steps_offset": 1}
    for short, (class_name, overrides) in SCHEDULER_NAMES.items():
        scheduler = scheduler_from_name(short, config)
        assert type(scheduler).__name__ == class_name
        assert all(scheduler.config[k] == v for k, v in overrides.items())
    for class_name in (n for n in exported if n.endswith("Scheduler")):
        assert type(scheduler_from_name(class_name, config)).__name__ == class_name
    listing = sdort("schedulers").stdout
    assert all(short in listing for short in SCHEDULER_NAMES)


def test_sdxl_folder_runs_the_sdxl_pipelines_and_the_refiner(sdxl, sdxl_refiner, tmp_path):
    """An SDXL folder just works: model_index.json picks the pipeline, the SDXL defaults apply, and
    --refiner runs diffusers' two-stage hand-off with one generator, as the Python API does."""
    from sdort.runtime import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, TorchGenerator

    (_, base_dir), (_, refiner_dir) = sdxl, sdxl_refiner
    out = tmp_path / "fox.png"
    result = sdort("txt2img", "--model", str(base_dir), "a fox", "--prompt-2", "in the snow", "--clip-skip", "1",
                   "--steps", "5", "--seed", "3", "--height", "64", "--width", "64", "--refiner", str(refiner_dir),
                   "--high-noise-frac", "0.7", "-o", str(out))
    assert result.returncode == 0, result.stderr
    meta = Image.open(out).text
    assert meta["pipeline"] == "StableDiffusionXLPipeline" and meta["guidance"] == "5.0"
    assert meta["prompt_2"] == "in the snow" and meta["clip_skip"] == "1"
    assert meta["refiner"] == str(refiner_dir) and meta["high_noise_frac"] == "0.7"
    base = StableDiffusionXLPipeline.from_pretrained(base_dir, provider="cpu")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, provider="cpu")
    generator = TorchGenerator(3)
    latents = base("a fox", prompt_2="in the snow", clip_skip=1, num_inference_steps=5, height=64, width=64,
                   generator=generator, denoising_end=0.7, output_type="latent").images
    expected = refiner("a fox", prompt_2="in the snow", image=latents, num_inference_steps=5, generator=generator,
                       denoising_start=0.7).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))

    result = sdort("img2img", "--model", str(base_dir), "a fox", "--image", str(out), "--steps", "4",
                   "-o", str(tmp_path / "b.png"))
    assert result.returncode == 0, result.stderr
    meta = Image.open(tmp_path / "b.png").text
    assert meta["pipeline"] == "StableDiffusionXLImg2ImgPipeline" and meta["strength"] == "0.3"


def test_sdxl_options_on_an_sd_model_are_refused(tiny_export, tmp_path):
    for args, word in ((["--prompt-2", "x"], "--prompt-2"), (["--refiner", str(tiny_export)], "--refiner")):
        result = sdort("txt2img", "--model", str(tiny_export), "a dog", "-o", str(tmp_path / "dog.png"), *args)
        assert result.returncode == 2 and word in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
