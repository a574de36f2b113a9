"""Bad input: every case is one clear error that names the parameter or the file.

From the command line: one line on stderr, exit code 2, no traceback, and nothing written in the
output folder. From the API: a ValueError or FileNotFoundError with the same message. The table
in the README ("Bad input") is this list; `test_readme_lists_every_case` keeps the two equal.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from sdort.runtime.cli import main as sdort_main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    id: str
    what: str          # the README's "case" column
    message: str       # a fragment of the error the user sees (the README's "error" column)
    run: Callable      # run(ctx) -> argv list (the CLI) or a callable that must raise (the API)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_export):
    """Input files of every kind, and the tiny models (a text-to-image and an inpainting one)."""
    from sdort.export import export

    root = tmp_path_factory.mktemp("bad-input")
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "image.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("L").save(root / "grey.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    Image.fromarray((x * 1000).astype(np.uint16)).save(root / "grey16.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:32, :48]).save(root / "mask-48x32.png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    data = (root / "image.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "a-folder").mkdir()
    inpaint = export("tiny-inpaint", root / "tiny-inpaint", log=lambda *_: None)
    return {"root": root, "tiny": tiny_export, "inpaint": inpaint}


@pytest.fixture
def ctx(files, tmp_path):
    """Per case: an empty output folder, and a private copy of the tiny model to damage."""
    model = tmp_path / "model"
    shutil.copytree(files["tiny"], model)
    out = tmp_path / "out"
    out.mkdir()
    return {**files, "model": model, "out": out, "f": lambda name: str(files["root"] / name)}


def txt2img(ctx, *extra, model=None):
    return ["txt2img", "--model", str(model or ctx["model"]), "a fox", "--steps", "2",
            "-o", str(ctx["out"] / "fox.png"), *extra]


def img2img(ctx, image, *extra):
    return ["img2img", "--model", str(ctx["model"]), "a fox", "--image", image, "--steps", "2",
            "-o", str(ctx["out"] / "fox.png"), *extra]


def inpaint(ctx, mask, *extra):
    return ["inpaint", "--model", str(ctx["inpaint"]), "a fox", "--image", ctx["f"]("image.png"), "--mask", mask,
            "--steps", "2", "-o", str(ctx["out"] / "fox.png"), *extra]


def damaged(ctx, relative: str, content: bytes | None):
    """The model copy with one file replaced by `content` (None: deleted)."""
    path = ctx["model"] / relative
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    return txt2img(ctx)


def external_data(ctx, location: str | None):
    """The model copy's UNet with its weights in an external file at `location` (None: file deleted)."""
    import onnx

    unet = ctx["model"] / "unet" / "model.onnx"
    model = onnx.load(str(unet))
    onnx.save_model(model, str(unet), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    if location is None:
        (unet.parent / "model.onnx_data").unlink()
    else:
        (ctx["out"].parent / "outside.bin").write_bytes((unet.parent / "model.onnx_data").read_bytes())
        model = onnx.load(str(unet), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        unet.write_bytes(model.SerializeToString())
    return txt2img(ctx)


def scheduler_class(ctx, name):
    path = ctx["model"] / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": name}))
    return txt2img(ctx)


def api(ctx, pipeline="StableDiffusionPipeline", model=None, **kwargs):
    """A call of the Python API that must raise."""
    import sdort.runtime

    def call():
        pipe = getattr(sdort.runtime, pipeline).from_pretrained(model or ctx["model"], provider="cpu")
        pipe(num_inference_steps=2, **{"prompt": "a fox", **kwargs})
    return call


def unwritable(ctx):
    folder = ctx["out"].parent / "read-only"
    folder.mkdir()
    if Path("/proc").is_dir():  # root ignores permission bits; /proc refuses new files to everyone
        return txt2img(ctx)[:-2] + ["-o", "/proc/sdort-test.png"]
    folder.chmod(0o500)
    return txt2img(ctx)[:-2] + ["-o", str(folder / "fox.png")]


CASES = [
    # input images
    Case("image-not-image", "`--image` is a text file", "--image: {root}/notes.txt is not a readable image",
         lambda c: img2img(c, c["f"]("notes.txt"))),
    Case("image-empty", "`--image` is an empty file", "--image: {root}/empty.png is empty",
         lambda c: img2img(c, c["f"]("empty.png"))),
    Case("image-truncated", "`--image` is a truncated PNG", "--image: {root}/truncated.png is not a readable image",
         lambda c: img2img(c, c["f"]("truncated.png"))),
    Case("image-missing", "`--image` does not exist", "--image: {root}/missing.png not found",
         lambda c: img2img(c, c["f"]("missing.png"))),
    Case("image-folder", "`--image` is a folder", "--image: {root}/a-folder is not a file",
         lambda c: img2img(c, c["f"]("a-folder"))),
    Case("mask-not-image", "`--mask` is a text file", "--mask: {root}/notes.txt is not a readable image",
         lambda c: inpaint(c, c["f"]("notes.txt"))),
    Case("mask-size", "`--mask` of another size than `--image`", "the mask must have the image's size",
         lambda c: inpaint(c, c["f"]("mask-48x32.png"))),
    Case("api-image-rgba", "API: an RGBA PIL image to img2img (the CLI converts files to RGB)",
         "image: a PIL image of mode RGBA; the VAE takes RGB images",
         lambda c: api(c, "StableDiffusionImg2ImgPipeline", image=Image.open(c["f"]("rgba.png")))),
    Case("api-image-grey", "API: a greyscale (L) PIL image to img2img", "image: a PIL image of mode L; the VAE takes RGB images",
         lambda c: api(c, "StableDiffusionImg2ImgPipeline", image=Image.open(c["f"]("grey.png")))),
    Case("api-image-type", "API: `image` given as a file name", "image: Input is in incorrect format",
         lambda c: api(c, "StableDiffusionImg2ImgPipeline", image=c["f"]("image.png"))),
    Case("api-mask-missing", "API: inpainting without `mask_image`", "mask_image: a mask is required",
         lambda c: api(c, "StableDiffusionInpaintPipeline", model=c["inpaint"],
                       image=Image.open(c["f"]("image.png")))),
    # numbers
    Case("size-huge", "`--height 200000 --width 200000`", "height and width: 200000x200000 (batch 1) needs at least",
         lambda c: txt2img(c, "--height", "200000", "--width", "200000")),
    Case("size-not-multiple", "`--height 60`", "height and width must be multiples of 8",
         lambda c: txt2img(c, "--height", "60", "--width", "64")),
    Case("api-size-float", "API: `height=64.5`", "height must be an integer (pixels); got 64.5",
         lambda c: api(c, height=64.5, width=64)),
    Case("guidance-nan", "`--guidance nan`", "guidance_scale must be a finite number; got nan",
         lambda c: txt2img(c, "--guidance", "nan")),
    Case("guidance-negative", "`--guidance -1`", "guidance_scale must not be negative",
         lambda c: txt2img(c, "--guidance", "-1")),
    Case("strength-inf", "`--strength inf`", "strength must be a finite number; got inf",
         lambda c: img2img(c, c["f"]("image.png"), "--strength", "inf")),
    Case("strength-range", "`--strength 1.5`", "strength must be in [0, 1]; got 1.5",
         lambda c: img2img(c, c["f"]("image.png"), "--strength", "1.5")),
    Case("api-eta-nan", "API: `eta=float('nan')`", "eta must be a finite number; got nan",
         lambda c: api(c, eta=float("nan"))),
    Case("steps-too-many", "`--steps 1001` (the scheduler has 1000 training steps)",
         "num_inference_steps must be at most the scheduler's num_train_timesteps (1000); got 1001",
         lambda c: txt2img(c, "--steps", "1001")),
    Case("steps-past-training", "`--steps 1000` with PNDM's `steps_offset` 1 (timestep 1000 would be read)",
         "num_inference_steps: 1000 steps with this scheduler's spacing reach timestep 1000, beyond its 1000",
         lambda c: txt2img(c, "--steps", "1000")),
    Case("steps-zero", "`--steps 0`", "num_inference_steps must be an integer >= 1; got 0",
         lambda c: txt2img(c, "--steps", "0")),
    Case("num-images-zero", "`--num-images 0`", "num_images_per_prompt must be an integer >= 1; got 0",
         lambda c: txt2img(c, "--num-images", "0")),
    # prompts and other arguments
    Case("api-prompt-type", "API: a prompt list holding a non-string", "prompt must be a str or a list of str",
         lambda c: api(c, prompt=["a fox", 3])),
    Case("api-negative-length", "API: 1 negative prompt list item for 2 prompts", "negative_prompt: a list of 1",
         lambda c: api(c, prompt=["a fox", "a cat"], negative_prompt=["blurry"])),
    Case("api-generator-count", "API: 2 generators for 1 image", "generator: a list of 2 generators",
         lambda c: api(c, generator=[1, 2])),
    Case("api-latents-shape", "API: `latents` of the wrong shape", "latents: expected shape (1, 4, 8, 8)",
         lambda c: api(c, height=64, width=64, latents=np.zeros((1, 4, 4, 4), np.float32))),
    Case("scheduler-name", "`--scheduler nope`", "scheduler: unknown name 'nope'",
         lambda c: txt2img(c, "--scheduler", "nope")),
    # model folders
    Case("model-missing", "`--model` does not exist", "{root}/no-model: no such model folder",
         lambda c: txt2img(c, model=c["f"]("no-model"))),
    Case("model-not-export", "`--model` is a folder without model_index.json",
         "{root}/a-folder: not an exported model (no model_index.json)",
         lambda c: txt2img(c, model=c["f"]("a-folder"))),
    Case("part-missing", "`unet/model.onnx` is missing", "unet/model.onnx: the 'unet' part is missing",
         lambda c: damaged(c, "unet/model.onnx", None)),
    Case("onnx-corrupt", "`unet/model.onnx` holds garbage", "unet/model.onnx: not a valid ONNX model",
         lambda c: damaged(c, "unet/model.onnx", b"\xff\x00garbage" * 100)),
    Case("onnx-truncated", "`unet/model.onnx` is truncated", "unet/model.onnx: not a valid ONNX model",
         lambda c: damaged(c, "unet/model.onnx", (c["model"] / "unet/model.onnx").read_bytes()[:100_000])),
    Case("onnx-empty", "`unet/model.onnx` is empty", "unet/model.onnx: empty file, not an ONNX model",
         lambda c: damaged(c, "unet/model.onnx", b"")),
    Case("onnx-data-missing", "`unet/model.onnx_data` is missing",
         "unet/model.onnx_data: the weights file that model.onnx refers to is missing",
         lambda c: external_data(c, None)),
    Case("onnx-data-outside", "external data `location` is `../../outside.bin`",
         "unet/model.onnx: refusing external data at '../../outside.bin', outside the model's folder",
         lambda c: external_data(c, "../../outside.bin")),
    Case("json-index", "`model_index.json` is not JSON", "model_index.json: invalid JSON",
         lambda c: damaged(c, "model_index.json", b"{not json")),
    Case("json-scheduler", "`scheduler/scheduler_config.json` is not JSON", "scheduler_config.json: invalid JSON",
         lambda c: damaged(c, "scheduler/scheduler_config.json", b"{\"_class_name\": ")),
    Case("json-unet", "`unet/config.json` is not JSON", "unet/config.json: invalid JSON",
         lambda c: damaged(c, "unet/config.json", b"[1, 2")),
    Case("json-tokenizer", "`tokenizer/tokenizer_config.json` is not JSON", "tokenizer_config.json: invalid JSON",
         lambda c: damaged(c, "tokenizer/tokenizer_config.json", b"\x89PNG")),
    Case("json-vocab", "`tokenizer/vocab.json` is not JSON", "vocab.json: invalid JSON",
         lambda c: damaged(c, "tokenizer/vocab.json", b"")),
    Case("scheduler-class", "`_class_name` of the scheduler config is unknown",
         "scheduler_config.json: unknown scheduler class 'FooScheduler'",
         lambda c: scheduler_class(c, "FooScheduler")),
    Case("tokenizer-missing", "`tokenizer/merges.txt` is missing", "merges.txt not found in tokenizer folder",
         lambda c: damaged(c, "tokenizer/merges.txt", None)),
    Case("wrong-task-inpaint", "an inpainting model given to `txt2img`",
         "'unet': this model's UNet takes 9 input channels (an inpainting UNet: sdort inpaint)",
         lambda c: txt2img(c, model=c["inpaint"])),
    Case("wrong-task-depth", "a text-to-image model given to `depth2img`",
         "StableDiffusionDepth2ImgPipeline needs a UNet with 5 input channels",
         lambda c: ["depth2img", "--model", str(c["model"]), "a street", "--image", c["f"]("image.png"),
                    "--depth-map", c["f"]("grey.png"), "-o", str(c["out"] / "x.png")]),
    Case("wrong-task-variation", "a text-to-image model given to `variation`", "the 'image_encoder' part is missing",
         lambda c: ["variation", "--model", str(c["model"]), "--image", c["f"]("image.png"),
                    "-o", str(c["out"] / "x.png")]),
    Case("depth-map-missing", "`--depth-map` does not exist", "--depth-map: {root}/missing.npy not found",
         lambda c: ["depth2img", "--model", str(c["model"]), "a street", "--image", c["f"]("image.png"),
                    "--depth-map", c["f"]("missing.npy"), "-o", str(c["out"] / "x.png")]),
    # outputs
    Case("output-no-folder", "`-o` in a folder that does not exist", "-o/--output: folder {out}/nowhere does not exist",
         lambda c: txt2img(c)[:-2] + ["-o", str(c["out"] / "nowhere" / "fox.png")]),
    Case("output-is-folder", "`-o` names an existing folder", "-o/--output: {out} is a folder",
         lambda c: txt2img(c)[:-2] + ["-o", str(c["out"])]),
    Case("output-unwritable", "`-o` where files cannot be created (`/proc`, or a read-only folder)",
         "-o/--output: cannot write", unwritable),
]


def _expected(case: Case, ctx) -> str:
    return case.message.format(root=ctx["root"], out=ctx["out"])


def _files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, ctx, capsys):
    before = _files_under(ctx["out"])
    action = case.run(ctx)
    if callable(action):
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(_expected(case, ctx))):
            action()
    else:
        capsys.readouterr()
        code = sdort_main(action)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("sdort: error: "), err
        assert _expected(case, ctx) in err[0]
    assert _files_under(ctx["out"]) == before, "something was written"


def test_readme_lists_every_case():
    """The README's table is this list: every case and its message, nothing more."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Bad input", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    rows = [r for r in rows if not set(r) <= set("|- ")]
    assert len(rows) == len(CASES) + len(CONVERSIONS)
    for case in CASES:
        message = case.message.replace("{root}/", "").replace("{out}/", "").replace("{out}", "OUT")
        assert any(case.what in row and message in row for row in rows), f"README lacks the case {case.id}"


# Where RGB is needed and diffusers converts (its `load_image` reads files as RGB), the CLI converts.
CONVERSIONS = {"rgba.png": "RGBA", "grey.png": "L", "palette.png": "P", "grey16.png": "I;16"}


@pytest.mark.parametrize("name", CONVERSIONS)
def test_cli_converts_image_files_to_rgb(files, name):
    from sdort.runtime.generation import load_image

    source = Image.open(files["root"] / name)
    assert source.mode in (CONVERSIONS[name], "I")  # Pillow versions open 16-bit grey as I;16 or I
    image = load_image(str(files["root"] / name), "--image")
    assert image.mode == "RGB" and image.size == (64, 64)
    if name == "grey16.png":  # scaled to 8 bits (Pillow's own convert would clip to white)
        expected = np.round(np.asarray(source, np.float64) / 257).astype(np.uint8)
    else:
        expected = np.asarray(source.convert("RGB"))[..., 0] if name != "grey.png" else np.asarray(source)
    assert np.array_equal(np.asarray(image)[..., 0], expected)


def test_rgba_file_runs_img2img(files, tmp_path, capsys):
    """An RGBA file through the CLI gives the image of its RGB version (alpha dropped, as diffusers' load_image)."""
    outputs = []
    for name in ("rgba.png", "image.png"):
        out = tmp_path / f"{name}.out.png"
        code = sdort_main(["img2img", "--model", str(files["tiny"]), "a fox", "--image", str(files["root"] / name),
                           "--steps", "2", "--seed", "1", "-o", str(out)])
        assert code == 0, capsys.readouterr().err
        outputs.append(np.asarray(Image.open(out)))
    assert np.array_equal(outputs[0], outputs[1])
