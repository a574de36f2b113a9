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
