"""The `sdort` command: generate images from an exported model folder.

    sdort txt2img --model models/sd15 "a fox in the snow" --steps 30 --seed 42 -o fox.png
    sdort img2img --model models/sd15 "a fox, oil painting" --image fox.png --strength 0.6 -o oil.png

Bad input ends with one line on stderr and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from ..schedulers import SCHEDULER_NAMES, scheduler_from_name


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage too)
        print(f"sdort: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# task -> (pipeline class in sdort.runtime, help, takes a prompt)
TASKS = {
    "txt2img": ("StableDiffusionPipeline", "text to image", True),
    "img2img": ("StableDiffusionImg2ImgPipeline", "image to image", True),
    "inpaint": ("StableDiffusionInpaintPipeline", "repaint the white part of a mask", True),
    "depth2img": ("StableDiffusionDepth2ImgPipeline", "image to image guided by depth (SD 2 depth models)", True),
    "variation": ("StableDiffusionImageVariationPipeline", "variations of an image (CLIP image embeddings)", False),
}


def _add_task(parser: argparse.ArgumentParser, task: str) -> None:
    takes_prompt = TASKS[task][2]
    if takes_prompt:
        parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--model", required=True, help="folder written by sd-export (or Optimum)")
    if takes_prompt:
        parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
    if task != "txt2img":
        parser.add_argument("--image", required=True, help="the starting image")
    if task == "inpaint":
        parser.add_argument("--mask", required=True, help="mask image: white is repainted, black kept")
        parser.add_argument("--padding-mask-crop", type=int, default=None,
                            help="generate only around the mask, with this margin in pixels")
    if task == "depth2img":
        parser.add_argument("--depth-map", default=None, help="depth map (.npy or image); estimated when omitted")
    if task in ("img2img", "inpaint", "depth2img"):
        parser.add_argument("--strength", type=float, default=1.0 if task == "inpaint" else 0.8,
                            help="how much of the image is redrawn, in [0, 1]")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, recorded in the PNG)")
    parser.add_argument("--rng", choices=("torch-cpu", "torch-cuda", "numpy"), default="torch-cpu",
                        help="random-number generator the seed drives (default torch-cpu: diffusers' CPU generator)")
    if task in ("txt2img", "inpaint", "variation"):
        parser.add_argument("--height", type=int, default=None, help="image height, a multiple of 8")
        parser.add_argument("--width", type=int, default=None, help="image width, a multiple of 8")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--scheduler", default=None, help="scheduler class or short name (see `sdort schedulers`)")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write; several images get -1, -2, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdort", description="Stable Diffusion on ONNX Runtime, without PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for task, (_, help_text, _) in TASKS.items():
        _add_task(commands.add_parser(task, help=help_text), task)
    commands.add_parser("schedulers", help="list the schedulers and their short names")
    return parser


def load_image(path: str, flag: str):
    """An RGB PIL image from `path`, as diffusers' `load_image`: EXIF orientation applied, then
    converted to RGB (alpha dropped, grey and palette expanded). 16-bit images are scaled to 8 bits
    first (Pillow's own conversion would clip them to white). A missing, empty, truncated or
    non-image file is an error naming the option."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{flag}: {path} not found")
    if not file.is_file():
        raise ValueError(f"{flag}: {path} is not a file")
    if file.stat().st_size == 0:
        raise ValueError(f"{flag}: {path} is empty")
    try:
        with Image.open(file) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()  # decode now: a truncated file fails here, not in the middle of a pipeline
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey, as Pillow opens it
                grey = np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8)
                image = Image.fromarray(grey)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{flag}: {path} is not a readable image ({str(exc).splitlines()[0]})") from None


def make_generator(rng: str, seed: int):
    from .randomness import PhiloxGenerator, TorchGenerator

    if rng == "torch-cpu":
        return TorchGenerator(seed)
    if rng == "torch-cuda":
        return PhiloxGenerator(seed)
    return np.random.default_rng(seed)


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def save_images(images, paths: list[Path], parameters: dict) -> None:
    """Write PNGs with the generation parameters as PNG text; each via a temporary file and a rename,
    so an interrupted or failed write (Ctrl-C, full disk) leaves no partial PNG."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in parameters.items():
        info.add_text(key, "" if value is None else str(value))
    for image, path in zip(images, paths):
        tmp = _partial(path)
        try:
            image.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def check_writable(paths: list[Path]) -> None:
    """Fail before generating when an output cannot be written (no folder, a folder in the way,
    no permission, a read-only disk): the temporary file is created once and removed."""
    for path in paths:
        if not path.parent.is_dir():
            raise FileNotFoundError(f"-o/--output: folder {path.parent} does not exist")
        if path.is_dir():
            raise ValueError(f"-o/--output: {path} is a folder; give a file name such as {path / 'out.png'}")
        try:
            _partial(path).open("wb").close()
        except OSError as exc:
            raise ValueError(f"-o/--output: cannot write {path} ({exc.strerror or exc})") from None
        _partial(path).unlink(missing_ok=True)


def task_inputs(args) -> dict:
    """The pipeline arguments a task adds to the common ones, read from the command line."""
    kwargs = {}
    if getattr(args, "prompt", None) is not None:
        kwargs.update(prompt=args.prompt, negative_prompt=args.negative_prompt)
    if getattr(args, "image", None):
        kwargs["image"] = load_image(args.image, "--image")
    if getattr(args, "mask", None):
        kwargs["mask_image"] = load_image(args.mask, "--mask")
        kwargs["padding_mask_crop"] = args.padding_mask_crop
        if kwargs["mask_image"].size != kwargs["image"].size:
            # diffusers would stretch both to one size; from two files that is almost always a mistake
            (mw, mh), (iw, ih) = kwargs["mask_image"].size, kwargs["image"].size
            raise ValueError(f"--mask: {args.mask} is {mw}x{mh}, --image is {iw}x{ih}; "
                             f"the mask must have the image's size")
    if getattr(args, "depth_map", None):
        if not Path(args.depth_map).is_file():
            raise FileNotFoundError(f"--depth-map: {args.depth_map} not found")
        kwargs["depth_map"] = args.depth_map
    if hasattr(args, "strength"):
        kwargs["strength"] = args.strength
    if hasattr(args, "height"):
        kwargs.update(height=args.height, width=args.width)
    return kwargs


def generate(args) -> int:
    from .. import runtime

    paths = output_paths(args.output, args.num_images)
    check_writable(paths)
    inputs = task_inputs(args)  # read the input files before loading the model
    pipe = getattr(runtime, TASKS[args.command][0]).from_pretrained(args.model, provider=args.provider)
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    images = pipe(num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
                  generator=make_generator(args.rng, seed), **inputs).images
    parameters = {
        "task": args.command, "prompt": getattr(args, "prompt", None),
        "negative_prompt": getattr(args, "negative_prompt", None), "seed": seed, "rng": args.rng,
        "steps": args.steps, "guidance": args.guidance, "scheduler": type(pipe.scheduler).__name__,
        "size": f"{images[0].width}x{images[0].height}", "model": args.model, "software": "sdort",
    }
    for name in ("image", "mask", "depth_map", "strength", "padding_mask_crop"):
        if getattr(args, name, None) is not None:
            parameters[name] = getattr(args, name)
    paths = output_paths(args.output, len(images))
    save_images(images, paths, parameters)
    for path in paths:
        print(path)
    return 0


def list_schedulers() -> int:
    for short, (class_name, overrides) in SCHEDULER_NAMES.items():
        extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
        print(f"{short:<22} {class_name}{f' ({extra})' if extra else ''}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schedulers":
            return list_schedulers()
        return generate(args)
    except (ValueError, OSError, FloatingPointError) as exc:  # FloatingPointError: sdort's NumericalError
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sdort: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are written by rename, so nothing partial is left
        print("sdort: interrupted; no image written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
