"""The `sdort` command: generate images from an exported model folder.

    sdort txt2img --model models/sd15 "a fox in the snow" --steps 30 --seed 42 -o fox.png
    sdort img2img --model models/sd15 "a fox, oil painting" --image fox.png --strength 0.6 -o oil.png
    sdort txt2img --model models/sdxl "a fox" --refiner models/sdxl-refiner --high-noise-frac 0.8
    sdort upscale --model models/x4-upscaler --image low.png --noise-level 20 -o x4.png

The pipeline follows the folder's model_index.json: an SDXL folder runs diffusers' SDXL pipelines.
Defaults (guidance, strength) are the pipeline's own, as in diffusers.

Bad input ends with one line on stderr and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..schedulers import SCHEDULER_NAMES
from . import png_info
from .lora import parse_embedding_argument, parse_lora_argument
from .sessions import PRECISIONS, PROVIDERS
from .generation import (SLD_OPTIONS, TASKS, XL_TASKS, LoadedModel, add_sld_inputs, check_writable, depth_paths,
                         generate, is_ldm3d_folder, is_xl_folder, output_paths, task_inputs, write_images)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage too)
        print(f"sdort: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_task(parser: argparse.ArgumentParser, task: str) -> None:
    takes_prompt = TASKS[task][2]
    if task in ("upscale", "latent-upscale"):  # the picture is given: the prompt only steers the details
        parser.add_argument("prompt", nargs="?", default="", help="what the image shows (default: empty)")
    elif takes_prompt:
        parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--model", required=True, help="folder written by sd-export (or Optimum)")
    if takes_prompt:
        parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
        parser.add_argument("--lora", metavar="FILE[:SCALE]", action="append", default=None, type=parse_lora_argument,
                            help="a LoRA (diffusers/PEFT or kohya .safetensors) at SCALE (default 1); repeatable")
        parser.add_argument("--embedding", metavar="FILE[:TOKEN]", action="append", default=None,
                            type=parse_embedding_argument,
                            help="a textual-inversion embedding, as TOKEN (default: the file's); repeatable")
        if task != "latent-upscale":  # diffusers' latent upscaler has no clip_skip
            parser.add_argument("--clip-skip", type=int, default=None,
                                help="text encoder layers to skip from the end for the prompt (diffusers' clip_skip)")
    if task == "upscale":
        parser.add_argument("--noise-level", type=int, default=None,
                            help="noise added to the low-res image, in [0, max_noise_level] (default 20)")
    if task in XL_TASKS:
        parser.add_argument("--prompt-2", default=None, help="SDXL: the prompt for the second text encoder")
        parser.add_argument("--negative-prompt-2", default=None, help="SDXL: the second encoder's negative prompt")
    if task == "txt2img":
        parser.add_argument("--refiner", default=None,
                            help="SDXL: a refiner folder that finishes the last part of the schedule")
        parser.add_argument("--high-noise-frac", type=float, default=0.8,
                            help="SDXL with --refiner: the fraction of the schedule the base runs (default 0.8)")
        for option, kind, meaning in SLD_OPTIONS:
            parser.add_argument(option, type=kind, default=None,
                                help=f"Safe SD models: {meaning} (default: the pipeline's, or --safety-config's)")
        parser.add_argument("--safety-config", choices=("weak", "medium", "strong", "max"), default=None,
                            help="Safe SD models: one of diffusers' SafetyConfig presets of the --sld-* values")
    if task != "txt2img":
        parser.add_argument("--image", required=True, help="the starting image")
    if task == "inpaint":
        parser.add_argument("--mask", required=True, help="mask image: white is repainted, black kept")
        parser.add_argument("--padding-mask-crop", type=int, default=None,
                            help="generate only around the mask, with this margin in pixels")
    if task == "depth2img":
        parser.add_argument("--depth-map", default=None, help="depth map (.npy or image); estimated when omitted")
    if task in ("img2img", "inpaint", "depth2img"):
        parser.add_argument("--strength", type=float, default=None,
                            help="how much of the image is redrawn, in [0, 1] (default: the pipeline's, "
                                 "0.8 for SD img2img, 1.0 for SD inpaint, 0.3 and 0.9999 for SDXL)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the pipeline's, 50; 75 for the upscalers)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the pipeline's, 7.5; 5.0 for SDXL)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, recorded in the PNG)")
    parser.add_argument("--rng", choices=("torch-cpu", "torch-cuda", "numpy"), default="torch-cpu",
                        help="random-number generator the seed drives (default torch-cpu: diffusers' CPU generator)")
    if task in ("txt2img", "inpaint", "variation"):
        parser.add_argument("--height", type=int, default=None, help="image height, a multiple of 8")
        parser.add_argument("--width", type=int, default=None, help="image width, a multiple of 8")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--scheduler", default=None, help="scheduler class or short name (see `sdort schedulers`)")
    add_provider_arguments(parser, cuda_graph=True)
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode (and encode) large images in overlapping tiles, as diffusers' enable_tiling()")
    parser.add_argument("--vae-slicing", action="store_true", help="decode (and encode) one image at a time")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write; several images get -1, -2, ...")
    parser.add_argument("--from-png", default=None, metavar="IMAGE.png",
                        help="re-run with the parameters of a PNG sdort or A1111 wrote; options given here win")


def add_provider_arguments(parser: argparse.ArgumentParser, cuda_graph: bool = False) -> None:
    """--provider and --precision, as `from_pretrained` takes them; with `cuda_graph`, --cuda-graph too
    (the one-image-at-a-time commands: a captured graph serves one image size and batch)."""
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="ONNX Runtime execution provider (auto: CUDA where available, else the CPU; "
                             "openvino needs sdort[openvino])")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="compute precision where the provider can choose it (bf16: OpenVINO on CPUs with "
                             "AVX-512 BF16 or AMX); fp32 keeps parity with diffusers")
    if cuda_graph:
        parser.add_argument("--cuda-graph", action="store_true",
                            help="CUDA only: run the UNet as a captured CUDA graph on fixed device buffers")


def build_parser(png_values: dict | None = None) -> argparse.ArgumentParser:
    """The `sdort` parser; `png_values` (from --from-png) become the tasks' defaults."""
    parser = _Parser(prog="sdort", description="Stable Diffusion on ONNX Runtime, without PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for task, (_, help_text, _) in TASKS.items():
        _add_task(commands.add_parser(task, help=help_text), task)
        if png_values:
            png_info.apply_option_values(commands.choices[task], png_values)
    commands.add_parser("schedulers", help="list the schedulers and their short names")
    from .batch import add_arguments  # Ray itself is imported only when a batch runs

    add_arguments(commands.add_parser("batch", help="many generations from a JSONL file, on Ray Data"))
    from .serve import add_arguments as add_serve_arguments  # Starlette and uvicorn only when it serves

    add_serve_arguments(commands.add_parser("serve", help="serve the AUTOMATIC1111 web UI's HTTP API"))
    info = commands.add_parser("info", help="print the generation parameters of a PNG sdort or A1111 wrote")
    info.add_argument("image", help="the PNG")
    info.add_argument("--json", action="store_true", help="print them as JSON")
    return parser


class _CheckingParser(argparse.ArgumentParser):
    def error(self, message):  # a request's bad field is that request's error, not the process' exit
        raise ValueError(message)


def task_options(task: str, fields: dict) -> argparse.Namespace:
    """A request's fields as the options of `sdort <task>`, checked by that command's own parser, so
    that the same fields give the same generation as the command line. Field names are the options'
    (`negative_prompt` for --negative-prompt, `prompt` for the positional prompt); True switches a flag
    on; None or a missing field takes the option's default. Bad fields raise ValueError naming the
    option."""
    if task not in TASKS:
        raise ValueError(f"task: must be one of {', '.join(TASKS)}; got {task!r}")
    parser = _CheckingParser(prog=f"sdort {task}", add_help=False)
    _add_task(parser, task)
    flags = {action.dest: action for action in parser._actions}
    argv, positional = [], []
    for name, value in fields.items():
        action = flags.get(name)
        if action is None or name == "from_png":
            raise ValueError(f"{name}: not an option of `sdort {task}`")
        if value is None:
            continue
        if not action.option_strings:
            positional.append(str(value))
        elif action.nargs == 0:  # a switch such as --vae-tiling
            if not isinstance(value, bool):
                raise ValueError(f"{action.option_strings[-1]}: expected true or false, got {value!r}")
            argv += [action.option_strings[-1]] if value else []
        else:
            argv += [action.option_strings[-1], str(value)]
    options = parser.parse_args([*argv, "--", *positional] if positional else argv)
    options.command = task
    return options


def run_task(args) -> int:
    """`sdort <task>`: check the outputs and inputs, load the model, generate, write the PNGs."""
    paths = output_paths(args.output, args.num_images)
    check_writable(paths)
    if is_ldm3d_folder(args.command, args.model):
        check_writable(depth_paths(paths))
    add_sld_inputs(args, task_inputs(args, is_xl_folder(args.model)))  # the input files, before loading
    loaded = LoadedModel(args.command, args.model, args.provider, getattr(args, "refiner", None),
                         precision=args.precision, loras=getattr(args, "lora", None) or (),
                         embeddings=getattr(args, "embedding", None) or (), cuda_graph=getattr(args, "cuda_graph", False))
    for path in write_images(generate(loaded, args), args.output):
        print(path)
    return 0


def list_schedulers() -> int:
    for short, (class_name, overrides) in SCHEDULER_NAMES.items():
        extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
        print(f"{short:<22} {class_name}{f' ({extra})' if extra else ''}")
    return 0


def from_png_text(argv) -> dict:
    """The text of the PNG that --from-png names, read before the real parse so that its values
    can become the options' defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from-png", default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    return png_info.read_png_text(known.from_png, "--from-png") if known.from_png else {}


def print_info(args) -> int:
    """`sdort info IMAGE.png`: A1111's fields, then sdort's keys, one `key: value` a line."""
    import json

    shown = png_info.describe(png_info.read_png_text(args.image, "info"))
    if args.json:
        print(json.dumps(shown, ensure_ascii=False, indent=2))
        return 0
    for title, values in (("parameters (A1111)", shown["parameters"]), ("sdort", shown["sdort"])):
        if values:
            print(f"{title}:")
            for key, value in values.items():
                print(f"  {key}: {value}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    try:
        text = from_png_text(argv)
        png_values = png_info.option_values(text) if text else None
    except (ValueError, OSError) as exc:
        print(f"sdort: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    args = build_parser(png_values).parse_args(argv)
    try:
        if args.command == "schedulers":
            return list_schedulers()
        if args.command == "info":
            return print_info(args)
        if args.command == "batch":
            from .batch import run_batch
            return run_batch(args)
        if args.command == "serve":
            from .serve import serve_command
            return serve_command(args)
        return run_task(args)
    except (ValueError, OSError, FloatingPointError) as exc:  # FloatingPointError: sdort's NumericalError
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sdort: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are written by rename, so nothing partial is left
        done = {"batch": "the images and manifest written so far are kept; run it again to resume",
                "serve": "server stopped"}
        print(f"sdort: interrupted; {done.get(args.command, 'no image written')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
