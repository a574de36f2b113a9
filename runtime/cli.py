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
import inspect
import logging
import os
import sys
from pathlib import Path

import numpy as np

from ..schedulers import SCHEDULER_NAMES, scheduler_from_name
from . import png_info


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage too)
        print(f"sdort: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# task -> (pipeline class in sdort.runtime, help, takes a prompt); SDXL folders use XL_TASKS' classes
XL_TASKS = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
            "inpaint": "StableDiffusionXLInpaintPipeline"}
TASKS = {
    "txt2img": ("StableDiffusionPipeline", "text to image", True),
    "img2img": ("StableDiffusionImg2ImgPipeline", "image to image", True),
    "inpaint": ("StableDiffusionInpaintPipeline", "repaint the white part of a mask", True),
    "depth2img": ("StableDiffusionDepth2ImgPipeline", "image to image guided by depth (SD 2 depth models)", True),
    "variation": ("StableDiffusionImageVariationPipeline", "variations of an image (CLIP image embeddings)", False),
    "upscale": ("StableDiffusionUpscalePipeline", "upscale an image x4 (stable-diffusion-x4-upscaler models)", True),
    "latent-upscale": ("StableDiffusionLatentUpscalePipeline", "upscale an image x2 in latent space "
                       "(sd-x2-latent-upscaler models)", True),
}


# Safe Latent Diffusion's options (txt2img on a StableDiffusionPipelineSafe folder): flag, type, meaning.
SAFE_CLASS = "StableDiffusionPipelineSafe"
SLD_OPTIONS = (
    ("--sld-guidance-scale", float, "safety guidance scale; below 1 turns safety guidance off"),
    ("--sld-warmup-steps", int, "steps before safety guidance applies"),
    ("--sld-threshold", float, "how far from the safety concept a prediction must be to be left alone"),
    ("--sld-momentum-scale", float, "how much of the safety momentum is added each step"),
    ("--sld-mom-beta", float, "how much of the previous momentum is kept"),
)


def _add_task(parser: argparse.ArgumentParser, task: str) -> None:
    takes_prompt = TASKS[task][2]
    if task in ("upscale", "latent-upscale"):  # the picture is given: the prompt only steers the details
        parser.add_argument("prompt", nargs="?", default="", help="what the image shows (default: empty)")
    elif takes_prompt:
        parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--model", required=True, help="folder written by sd-export (or Optimum)")
    if takes_prompt:
        parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
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
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode (and encode) large images in overlapping tiles, as diffusers' enable_tiling()")
    parser.add_argument("--vae-slicing", action="store_true", help="decode (and encode) one image at a time")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write; several images get -1, -2, ...")
    parser.add_argument("--from-png", default=None, metavar="IMAGE.png",
                        help="re-run with the parameters of a PNG sdort or A1111 wrote; options given here win")


def build_parser(png_values: dict | None = None) -> argparse.ArgumentParser:
    """The `sdort` parser; `png_values` (from --from-png) become the tasks' defaults."""
    parser = _Parser(prog="sdort", description="Stable Diffusion on ONNX Runtime, without PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for task, (_, help_text, _) in TASKS.items():
        _add_task(commands.add_parser(task, help=help_text), task)
        if png_values:
            png_info.apply_option_values(commands.choices[task], png_values)
    commands.add_parser("schedulers", help="list the schedulers and their short names")
    info = commands.add_parser("info", help="print the generation parameters of a PNG sdort or A1111 wrote")
    info.add_argument("image", help="the PNG")
    info.add_argument("--json", action="store_true", help="print them as JSON")
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


def is_xl_folder(model: str) -> bool:
    """Whether an exported folder holds an SDXL model (its model_index names an SDXL pipeline or a
    second text encoder)."""
    from .model_files import read_json

    index_path = Path(model) / "model_index.json"
    if not index_path.is_file():
        return False
    index = read_json(index_path)
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL") or bool(
        (index.get("text_encoder_2") or [None])[0])


# A folder whose model_index.json names this class runs txt2img with it: RGB and a depth map.
LDM3D_CLASS = "StableDiffusionLDM3DPipeline"


def is_ldm3d_folder(task: str, model: str) -> bool:
    """Whether `task` on this folder runs LDM3D (its model_index.json `_class_name`), which writes a
    16-bit depth PNG beside each RGB one."""
    from .model_files import read_json

    index_path = Path(model) / "model_index.json"
    return task == "txt2img" and index_path.is_file() and read_json(index_path).get("_class_name") == LDM3D_CLASS


def depth_paths(paths: list[Path]) -> list[Path]:
    """out.png -> out-depth.png (out-1.png -> out-1-depth.png): where LDM3D's depth maps go."""
    return [path.with_name(f"{path.stem}-depth{path.suffix}") for path in paths]


def is_safe_folder(task: str, model: str) -> bool:
    """Whether `task` on this folder runs Safe Latent Diffusion (its model_index.json `_class_name`)."""
    from .model_files import read_json

    index_path = Path(model) / "model_index.json"
    return task == "txt2img" and index_path.is_file() and read_json(index_path).get("_class_name") == SAFE_CLASS


def add_sld_inputs(args, inputs: dict) -> None:
    """The --sld-* values (and --safety-config's) for a Safe SD folder; refused for other models.
    The Safe pipeline has no clip_skip, as diffusers'."""
    given = {option[2:].replace("-", "_"): getattr(args, option[2:].replace("-", "_"), None)
             for option, _, _ in SLD_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    preset = getattr(args, "safety_config", None)
    if not is_safe_folder(args.command, args.model):
        if given or preset:
            flag = "--safety-config" if preset else f"--{next(iter(given)).replace('_', '-')}"
            raise ValueError(f"{flag}: only Safe SD models ({SAFE_CLASS} in model_index.json) take it")
        return
    if inputs.pop("clip_skip", None) is not None:
        raise ValueError(f"--clip-skip: {SAFE_CLASS} has no clip_skip")
    if preset:
        from .pipelines.safe import SafetyConfig

        inputs.update(getattr(SafetyConfig, preset.upper()))
    inputs.update(given)


# The pipelines of a latent consistency model's folder (its model_index.json `_class_name`).
LCM_TASKS = {"txt2img": "LatentConsistencyModelPipeline", "img2img": "LatentConsistencyModelImg2ImgPipeline"}


def is_lcm_folder(task: str, model: str) -> bool:
    """Whether `task` on this folder runs an LCM pipeline (4 steps, guidance through the UNet)."""
    from .model_files import read_json

    index_path = Path(model) / "model_index.json"
    return (task in LCM_TASKS and index_path.is_file()
            and read_json(index_path).get("_class_name") in LCM_TASKS.values())


def pipeline_class_name(task: str, model: str) -> str:
    if task in XL_TASKS and is_xl_folder(model):
        return XL_TASKS[task]
    if is_lcm_folder(task, model):
        return LCM_TASKS[task]
    if is_ldm3d_folder(task, model):
        return LDM3D_CLASS
    if is_safe_folder(task, model):
        return SAFE_CLASS
    return TASKS[task][0]


def task_inputs(args, xl: bool) -> dict:
    """The pipeline arguments a task adds to the common ones, read from the command line."""
    kwargs = {}
    if getattr(args, "prompt", None) is not None:
        kwargs.update(prompt=args.prompt, negative_prompt=args.negative_prompt)
        if hasattr(args, "clip_skip"):
            kwargs["clip_skip"] = args.clip_skip
    for name in ("prompt_2", "negative_prompt_2"):
        if getattr(args, name, None) is not None:
            if not xl:
                raise ValueError(f"--{name.replace('_', '-')}: only SDXL models have a second text encoder")
            kwargs[name] = getattr(args, name)
    if getattr(args, "refiner", None) is not None and not xl:
        raise ValueError("--refiner: the base model must be an SDXL model")
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
    if getattr(args, "noise_level", None) is not None:
        kwargs["noise_level"] = args.noise_level
    if getattr(args, "strength", None) is not None:
        kwargs["strength"] = args.strength
    if hasattr(args, "height"):
        kwargs.update(height=args.height, width=args.width)
    return kwargs


def load_pipeline(class_name: str, args, model: str):
    from .. import runtime

    pipe = getattr(runtime, class_name).from_pretrained(model, provider=args.provider)
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    return pipe


def call_default(pipe, name: str):
    """The default of a pipeline's `__call__` parameter (guidance_scale, strength), as diffusers'."""
    return inspect.signature(pipe.__call__).parameters[name].default


def generate(args) -> int:
    paths = output_paths(args.output, args.num_images)
    check_writable(paths)
    ldm3d = is_ldm3d_folder(args.command, args.model)
    if ldm3d:
        check_writable(depth_paths(paths))
    xl = is_xl_folder(args.model)
    inputs = task_inputs(args, xl)  # read the input files before loading the model
    add_sld_inputs(args, inputs)
    refiner = None
    if getattr(args, "refiner", None) is not None:
        if not Path(args.refiner).is_dir():
            raise FileNotFoundError(f"--refiner: {args.refiner}: no such model folder")
        refiner = load_pipeline(XL_TASKS["img2img"], args, args.refiner)
    pipe = load_pipeline(pipeline_class_name(args.command, args.model), args, args.model)
    if "negative_prompt" in inputs and "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
        # LCM: guidance was distilled into the UNet against the empty prompt; diffusers takes none
        if inputs.pop("negative_prompt") is not None:
            raise ValueError(f"--negative-prompt: {type(pipe).__name__} takes no negative prompt")
    for switch, enable in ((args.vae_tiling, pipe.enable_vae_tiling), (args.vae_slicing, pipe.enable_vae_slicing)):
        if switch:
            enable()
    guidance = args.guidance if args.guidance is not None else call_default(pipe, "guidance_scale")
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    generator = make_generator(args.rng, seed)
    if args.steps is None:
        args.steps = call_default(pipe, "num_inference_steps")
    common = dict(num_inference_steps=args.steps, guidance_scale=guidance, num_images_per_prompt=args.num_images,
                  generator=generator)
    if "num_images_per_prompt" not in inspect.signature(pipe.__call__).parameters:  # the latent upscaler
        if args.num_images != 1:
            raise ValueError(f"--num-images: {type(pipe).__name__} makes one image per prompt")
        del common["num_images_per_prompt"]
    if refiner is None:
        output = pipe(**common, **inputs)
        # LDM3D gives RGB images and depth maps (16-bit "I;16" PIL images) where others give images
        images, depths = (output.rgb, output.depth) if ldm3d else (output.images, None)
    else:
        # diffusers' two-stage SDXL: the base stops at high_noise_frac and hands its latents over;
        # the refiner continues the same generator and finishes the schedule
        latents = pipe(**common, **inputs, denoising_end=args.high_noise_frac, output_type="latent").images
        text = {k: v for k, v in inputs.items() if k in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")}
        images = refiner(**common, **text, image=latents, denoising_start=args.high_noise_frac).images
    parameters = {
        "task": args.command, "prompt": getattr(args, "prompt", None),
        "negative_prompt": getattr(args, "negative_prompt", None), "seed": seed, "rng": args.rng,
        "steps": args.steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__,
        "size": f"{images[0].width}x{images[0].height}", "model": args.model, "pipeline": type(pipe).__name__,
        "software": "sdort",
    }
    for name in ("prompt_2", "negative_prompt_2", "clip_skip", "image", "mask", "depth_map", "strength",
                 "padding_mask_crop", "refiner", "noise_level"):
        if getattr(args, name, None) is not None:
            parameters[name] = getattr(args, name)
    if refiner is not None:
        parameters["high_noise_frac"] = args.high_noise_frac
    if "strength" in inputs or args.command in ("img2img", "inpaint", "depth2img"):
        parameters["strength"] = inputs.get("strength", call_default(pipe, "strength"))
    if args.scheduler:  # the name given, options (Karras sigmas...) included, for --from-png
        parameters["scheduler_name"] = args.scheduler
    fields = png_info.a1111_fields(parameters, pipe.scheduler)  # A1111's `parameters` text, for other tools
    parameters[png_info.PARAMETERS_KEY] = png_info.infotext(parameters["prompt"], parameters["negative_prompt"], fields)
    paths = output_paths(args.output, len(images))
    save_images(images, paths, parameters)
    written = paths
    if ldm3d:
        save_images(depths, depth_paths(paths), parameters)
        written = [path for pair in zip(paths, depth_paths(paths)) for path in pair]
    for path in written:
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
