"""The `sdort` command: generate images from an exported model folder.

    sdort txt2img --model models/sd15 "a fox in the snow" --steps 30 --seed 42 -o fox.png

Bad input ends with one line on stderr and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage too)
        print(f"sdort: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--model", required=True, help="folder written by sd-export (or Optimum)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, recorded in the PNG)")
    parser.add_argument("--rng", choices=("torch-cpu", "torch-cuda", "numpy"), default="torch-cpu",
                        help="random-number generator the seed drives (default torch-cpu: diffusers' CPU generator)")
    parser.add_argument("--height", type=int, default=None, help="image height, a multiple of 8")
    parser.add_argument("--width", type=int, default=None, help="image width, a multiple of 8")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--scheduler", default=None, help="scheduler class or short name (see `sdort schedulers`)")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write; several images get -1, -2, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdort", description="Stable Diffusion on ONNX Runtime, without PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_common(commands.add_parser("txt2img", help="text to image"))
    commands.add_parser("schedulers", help="list the schedulers and their short names")
    return parser


def make_generator(rng: str, seed: int):
    from .random import PhiloxGenerator, TorchGenerator

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
    """Write PNGs with the generation parameters as PNG text; each via a temporary file and a rename."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in parameters.items():
        info.add_text(key, "" if value is None else str(value))
    for image, path in zip(images, paths):
        tmp = path.with_name(f".{path.name}.partial")
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)


def txt2img(args) -> int:
    from . import StableDiffusionPipeline
    from ..schedulers import scheduler_from_name

    out_dir = Path(args.output).resolve().parent
    if not out_dir.is_dir():
        raise FileNotFoundError(f"-o/--output: folder {out_dir} does not exist")
    pipe = StableDiffusionPipeline.from_pretrained(args.model, provider=args.provider)
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    images = pipe(
        args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance, height=args.height, width=args.width,
        num_images_per_prompt=args.num_images, generator=make_generator(args.rng, seed),
    ).images
    height, width = images[0].height, images[0].width
    parameters = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, "rng": args.rng,
        "steps": args.steps, "guidance": args.guidance, "scheduler": type(pipe.scheduler).__name__,
        "size": f"{width}x{height}", "model": args.model, "software": "sdort",
    }
    paths = output_paths(args.output, len(images))
    save_images(images, paths, parameters)
    for path in paths:
        print(path)
    return 0


def list_schedulers() -> int:
    from ..schedulers import SCHEDULER_NAMES

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
        return txt2img(args)
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sdort: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
