"""The A1111 `parameters` PNG text: built as A1111's `create_infotext`, read back with A1111's own
regular expression, sdort's schedulers named as A1111's samplers, `sdort info`, and `--from-png`
re-running a PNG's parameters to the same pixels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdort.runtime import cli, png_info
from sdort.schedulers import SCHEDULER_NAMES, get_scheduler_class, scheduler_from_name

# The oracle: A1111's `re_param` and the reading loop of `parse_generation_parameters`, copied from
# AUTOMATIC1111/stable-diffusion-webui modules/infotext_utils.py (commit 036500223de0), left out
# only A1111's UI defaults and style extraction.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(x: str) -> dict:
    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in A1111_RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        res[k] = v
    return res


# The example in A1111's parse_generation_parameters docstring, as A1111 writes a PNG.
A1111_TEXT = ("girl with an artist's beret, determined, blue eyes, desert scene\n"
              "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
              "Steps: 2, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 64x64, Model hash: 45dee52b, "
              "Clip skip: 2, RNG: CPU")


def run(capsys, *args):
    code = cli.main([str(arg) for arg in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_is_written_as_a1111_writes_it():
    fields = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1,
              "Size": "512x512", "Model": "sd15", "Version": "sdort 0.1.0"}
    assert png_info.infotext("a fox, red", "blurry", fields) == (
        "a fox, red\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1, Size: 512x512, "
        "Model: sd15, Version: sdort 0.1.0")
    # no negative prompt: no line for it; a field whose value is its key is written alone, as A1111's
    assert png_info.infotext("a fox", None, {"Steps": 2, "Tiling": "Tiling", "Seed": 3}) == \
        "a fox\nSteps: 2, Tiling, Seed: 3"
    assert png_info.infotext("a fox", "", {"Steps": 2}) == "a fox\nSteps: 2"


def test_values_are_quoted_only_with_comma_colon_or_newline():
    assert png_info.quote("Euler a") == "Euler a" and png_info.quote(7.5) == "7.5"
    assert png_info.quote("a, b") == '"a, b"'
    assert png_info.quote("model: v2") == '"model: v2"'
    assert png_info.quote("one\ntwo") == '"one\\ntwo"'
    assert png_info.quote('say "hi", please') == '"say \\"hi\\", please"'
    assert png_info.quote("café, ß") == '"café, ß"'  # non-ASCII kept, as A1111's ensure_ascii=False
    assert png_info.unquote('"a, b"') == "a, b" and png_info.unquote('"broken') == '"broken'


def test_chunk_parses_back_with_a1111_regex():
    fields = {"Steps": 4, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": 6.5, "Seed": 42,
              "Size": "64x72", "Model": "my, model: v2", "Denoising strength": 0.6, "Clip skip": 2,
              "Refiner": "line one\nline two", "Refiner switch at": 0.8, "Version": 'sdort "x", 1'}
    text = png_info.infotext("a fox, in snow\nsecond line", "blurry, dark\nugly", fields)
    parsed = a1111_parse(text)
    assert parsed == {"Prompt": "a fox, in snow\nsecond line", "Negative prompt": "blurry, dark\nugly",
                      **{key: str(value) for key, value in fields.items()}}
    assert png_info.parse_infotext(text) == parsed
    assert png_info.parse_infotext(A1111_TEXT) == a1111_parse(A1111_TEXT)
    # fewer than three pairs on the last line: prompt text, as A1111 reads it
    assert png_info.parse_infotext("a fox\nSteps: 2") == a1111_parse("a fox\nSteps: 2") == \
        {"Prompt": "a fox\nSteps: 2", "Negative prompt": ""}


# What each short name runs, named as A1111 names its samplers (modules/sd_samplers_kdiffusion.py,
# sd_samplers_timesteps.py, sd_samplers_lcm.py) and schedule types (modules/sd_schedulers.py).
EXPECTED_SAMPLERS = {
    "ddim": ("DDIM", "Automatic"), "ddpm": (None, None), "pndm": ("PLMS", "Automatic"),
    "lms": ("LMS", "Automatic"), "lms-karras": ("LMS", "Karras"), "euler": ("Euler", "Automatic"),
    "euler-karras": ("Euler", "Karras"), "euler_a": ("Euler a", "Automatic"), "heun": ("Heun", "Automatic"),
    "heun-karras": ("Heun", "Karras"), "dpm2": ("DPM2", "Automatic"), "dpm2-karras": ("DPM2", "Karras"),
    "dpm2_a": ("DPM2 a", "Automatic"), "dpm2_a-karras": ("DPM2 a", "Karras"),
    "dpm++2m": ("DPM++ 2M", "Automatic"), "dpm++2m-karras": ("DPM++ 2M", "Karras"),
    # sdort's dpm++sde is DPM-Solver++ 2M SDE (not A1111's Brownian-tree "DPM++ SDE"): named for what runs
    "dpm++sde": ("DPM++ 2M SDE", "Automatic"), "dpm++sde-karras": ("DPM++ 2M SDE", "Karras"),
    "dpm++2m-sde": ("DPM++ 2M SDE", "Automatic"), "dpm++2m-sde-karras": ("DPM++ 2M SDE", "Karras"),
    "dpm++2s": (None, None), "dpm++2s-karras": (None, None),  # A1111's 2S is only the ancestral "2S a"
    "unipc": ("UniPC", "Automatic"), "unipc-karras": (None, None), "deis": (None, None),
    "lcm": ("LCM", "Automatic"), "tcd": (None, None), "edm-euler": (None, None), "edm-dpm++2m": (None, None),
}


def test_sampler_mapping():
    assert set(EXPECTED_SAMPLERS) == set(SCHEDULER_NAMES)
    # SD's scheduler config (PNDM with skip_prk_steps, as the folders diffusers and sd-export write)
    config = get_scheduler_class("PNDMScheduler")(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  skip_prk_steps=True, steps_offset=1).config
    for name, expected in EXPECTED_SAMPLERS.items():
        scheduler = scheduler_from_name(name, config)
        assert png_info.a1111_sampler(scheduler) == expected, name
        if expected[0] is not None:  # and back: the name given for A1111's runs the same scheduler
            again = scheduler_from_name(png_info.scheduler_name_for(*expected), config)
            assert type(again) is type(scheduler) and dict(again.config) == dict(scheduler.config), name
    assert png_info.a1111_sampler(("PNDMScheduler", {"skip_prk_steps": False})) == (None, None)
    assert png_info.scheduler_name_for("DPM++ 2M Karras") == "dpm++2m-karras"  # A1111 before 1.9
    assert png_info.scheduler_name_for("DPM++ SDE", "Automatic") is None
    assert png_info.scheduler_name_for("DPM fast", "Automatic") is None


def test_info_on_an_a1111_png(tmp_path, capsys):
    path = tmp_path / "a1111.png"
    meta = PngInfo()
    meta.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (64, 64)).save(path, pnginfo=meta)
    code, out, _ = run(capsys, "info", path, "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["sdort"] == {}
    assert shown["parameters"] == a1111_parse(A1111_TEXT)
    assert shown["parameters"]["Sampler"] == "Euler a" and shown["parameters"]["Model hash"] == "45dee52b"
    code, out, _ = run(capsys, "info", path)
    assert "  Negative prompt: ugly, fat, (((deformed))), [blurry]\n" in out and "  Seed: 965400086\n" in out


def test_info_refuses_a_png_without_parameters(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code, _, err = run(capsys, "info", tmp_path / "plain.png")
    assert code == 2 and "no generation parameters" in err and err.count("\n") == 1
    code, _, err = run(capsys, "txt2img", "--from-png", tmp_path / "none.png")
    assert code == 2 and "--from-png" in err and "not found" in err


def test_sdort_png_then_from_png_gives_the_same_pixels(tiny_export, tmp_path, capsys):
    first = tmp_path / "first.png"
    code, _, err = run(capsys, "txt2img", "--model", tiny_export, "a fox, red", "--negative-prompt", "blurry: dark",
                       "--steps", 2, "--guidance", 6, "--seed", 7, "--height", 64, "--width", 64,
                       "--scheduler", "euler-karras", "--clip-skip", 1, "-o", first)
    assert code == 0, err
    text = Image.open(first).text
    assert text["parameters"] == (
        'a fox, red\nNegative prompt: blurry: dark\n'
        f'Steps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 6.0, Seed: 7, Size: 64x64, '
        f'Model: {tiny_export.name}, Clip skip: 2, RNG: CPU, Version: {png_info._version()}')
    assert a1111_parse(text["parameters"])["Negative prompt"] == "blurry: dark"
    assert text["prompt"] == "a fox, red" and text["scheduler_name"] == "euler-karras"  # sdort's keys stay

    code, out, _ = run(capsys, "info", first)
    assert code == 0 and "  Schedule type: Karras\n" in out and "  task: txt2img\n" in out

    again = tmp_path / "again.png"
    code, _, err = run(capsys, "txt2img", "--from-png", first, "-o", again)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert Image.open(again).text == text

    # options on the command line win over the PNG's
    other = tmp_path / "other.png"
    code, _, err = run(capsys, "txt2img", "--from-png", first, "--seed", 8, "--width", 72, "-o", other)
    assert code == 0, err
    assert Image.open(other).text["seed"] == "8" and Image.open(other).size == (72, 64)


def test_from_png_of_an_a1111_png(tiny_export, tmp_path, capsys):
    """A1111's fields become the options: Euler a, CFG 7, its seed and size, Clip skip 2 = diffusers'
    clip_skip 1, RNG CPU = torch's CPU generator; the same run spelled out gives the same pixels."""
    source = tmp_path / "a1111.png"
    meta = PngInfo()
    meta.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (64, 64)).save(source, pnginfo=meta)
    out, spelled = tmp_path / "out.png", tmp_path / "spelled.png"
    code, _, err = run(capsys, "txt2img", "--model", tiny_export, "--from-png", source, "-o", out)
    assert code == 0, err
    code, _, err = run(capsys, "txt2img", "--model", tiny_export, "girl with an artist's beret, determined, "
                       "blue eyes, desert scene", "--negative-prompt", "ugly, fat, (((deformed))), [blurry]",
                       "--steps", 2, "--scheduler", "euler_a", "--guidance", 7, "--seed", 965400086,
                       "--height", 64, "--width", 64, "--clip-skip", 1, "--rng", "torch-cpu", "-o", spelled)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(spelled)))
    written = Image.open(out).text
    assert written["clip_skip"] == "1" and written["scheduler_name"] == "euler_a" and written["seed"] == "965400086"


def test_from_png_with_a_sampler_sdort_lacks_warns(tiny_export, tmp_path, capsys):
    source = tmp_path / "a1111.png"
    meta = PngInfo()
    meta.add_text("parameters", "a boat\nSteps: 2, Sampler: DPM adaptive, CFG scale: 5, Seed: 3, Size: 64x64")
    Image.new("RGB", (64, 64)).save(source, pnginfo=meta)
    code, _, err = run(capsys, "txt2img", "--model", tiny_export, "--from-png", source, "-o", tmp_path / "o.png")
    assert code == 0 and "no scheduler for A1111's sampler 'DPM adaptive'" in err
    text = Image.open(tmp_path / "o.png").text
    assert "scheduler_name" not in text and text["rng"] == "torch-cuda"  # no RNG field: A1111's GPU default


def test_img2img_writes_denoising_strength_and_from_png_finds_the_image(tiny_export, tmp_path, capsys):
    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(start)
    first = tmp_path / "first.png"
    code, _, err = run(capsys, "img2img", "--model", tiny_export, "oil", "--image", start, "--strength", 0.5,
                       "--steps", 4, "--seed", 1, "-o", first)
    assert code == 0, err
    fields = a1111_parse(Image.open(first).text["parameters"])
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "64x64" and fields["Steps"] == "4"
    again = tmp_path / "again.png"
    code, _, err = run(capsys, "img2img", "--from-png", first, "-o", again)  # --image from sdort's keys
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
