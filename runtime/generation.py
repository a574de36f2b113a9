"""One generation as `sdort txt2img|img2img|...`, `sdort batch` and `sdort serve` run it.

`LoadedModel` is a model folder's pipeline (and an SDXL refiner) loaded once; `generate` runs one
request's options (the `sdort` task options, as an argparse namespace) on it and returns the images with
the parameters written into their PNGs; `write_images` saves them. The pipeline follows the folder's
model_index.json (SDXL, LCM, LDM3D, Safe SD); defaults (guidance, strength, steps) are the pipeline's own,
as in diffusers.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..schedulers import scheduler_from_name
from . import png_info

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


def load_pipeline(class_name: str, provider: str, model: str, session_options=None, share=None,
                  precision: str = "fp32", cuda_graph: bool = False):
    """The pipeline `class_name` on a model folder; with `share` (a loaded pipeline of the same folder),
    built on its sessions as diffusers' `OtherPipeline(**pipe.components)`, where it has the parts."""
    from .. import runtime

    cls = getattr(runtime, class_name)
    if share is not None and type(share) is not cls:
        # the folder's settings too (requires_safety_checker, SDXL's config_names), which diffusers'
        # `components` leaves out: without them the new pipeline would take the defaults
        takes = inspect.signature(cls.__init__).parameters
        known = {**getattr(share, "config", {}), **vars(share)}
        settings = {name: known[name] for name in ("requires_safety_checker", *cls.config_names)
                    if name in takes and name in known}
        try:
            return cls(**share.components, **settings)
        except (TypeError, ValueError):  # a part the other task has no use for (depth2img's estimator)
            pass
    elif share is not None:
        return share
    return cls.from_pretrained(model, provider=provider, session_options=session_options, precision=precision,
                               cuda_graph=cuda_graph)


def call_default(pipe, name: str):
    """The default of a pipeline's `__call__` parameter (guidance_scale, strength), as diffusers'."""
    return inspect.signature(pipe.__call__).parameters[name].default


class LoadedModel:
    """The pipeline a task runs on a model folder (and, for SDXL, a refiner), loaded once and reused
    for many generations; each generation may pick its own scheduler."""

    def __init__(self, task: str, model: str, provider: str = "auto", refiner: str | None = None,
                 session_options=None, share: LoadedModel | None = None, precision: str = "fp32",
                 loras=(), embeddings=(), cuda_graph: bool = False):
        """`session_options`: ONNX Runtime's, for every session (None: sdort's defaults); `share`: a
        LoadedModel of the same folder (another task) whose sessions this one reuses where it can;
        `loras`: [(file, scale)], made the active adapters with their scales (diffusers'
        `load_lora_weights` + `set_adapters`); `embeddings`: [(file, token or None)], loaded with
        `load_textual_inversion`; `cuda_graph`: `from_pretrained`'s (the UNets as CUDA graphs)."""
        self.task, self.model = task, str(model)
        self.xl = is_xl_folder(self.model)
        if refiner is not None and not self.xl:
            raise ValueError("--refiner: the base model must be an SDXL model")
        self.ldm3d = is_ldm3d_folder(task, self.model)
        self.refiner = None
        if refiner is not None:
            if not Path(refiner).is_dir():
                raise FileNotFoundError(f"--refiner: {refiner}: no such model folder")
            self.refiner = load_pipeline(XL_TASKS["img2img"], provider, refiner, session_options,
                                         precision=precision, cuda_graph=cuda_graph)
        self.pipe = load_pipeline(pipeline_class_name(task, self.model), provider, self.model, session_options,
                                  share.pipe if share is not None and share.model == self.model else None,
                                  precision, cuda_graph)
        self._schedulers = {None: (self.pipe.scheduler, self.refiner and self.refiner.scheduler)}
        self.loras, self.embeddings = list(loras), list(embeddings)
        if (self.loras or self.embeddings) and not hasattr(self.pipe, "load_lora_weights"):
            flag = "--lora" if self.loras else "--embedding"
            raise ValueError(f"{flag}: {type(self.pipe).__name__} takes no LoRA or textual-inversion weights")
        if self.loras or self.embeddings:
            with self.pipe.adapter_changes():  # each changed session re-created once, at the end
                for number, (file, _) in enumerate(self.loras, 1):
                    self.pipe.load_lora_weights(file, adapter_name=f"lora{number}")
                if self.loras:
                    self.pipe.set_adapters([f"lora{n}" for n in range(1, len(self.loras) + 1)],
                                           [scale for _, scale in self.loras])
                for file, token in self.embeddings:
                    self.pipe.load_textual_inversion(file, token=token)

    def use_scheduler(self, name: str | None) -> None:
        """Give the pipelines the scheduler `name` (None: the folder's own), built from the folder's
        scheduler config as `--scheduler` does."""
        if name not in self._schedulers:
            base, refiner = self._schedulers[None]
            self._schedulers[name] = (scheduler_from_name(name, base.config),
                                      refiner and scheduler_from_name(name, refiner.config))
        self.pipe.scheduler, refiner = self._schedulers[name]
        if self.refiner is not None:
            self.refiner.scheduler = refiner

    def for_thread(self) -> LoadedModel:
        """This model for one more thread (`sdort serve` keeps one per worker): the same sessions and
        settings, but pipeline objects of its own, because `generate` sets the scheduler and the VAE
        switches on the pipeline and two threads sharing one would take each other's. A shallow copy
        is enough: a pipeline call keeps its state in its own copy of the scheduler (tests/test_threads.py)."""
        import copy

        twin = copy.copy(self)
        twin.pipe, twin.refiner = copy.copy(self.pipe), copy.copy(self.refiner)
        twin._schedulers = dict(self._schedulers)
        return twin


@dataclass
class Generation:
    """What one generation made: PIL images (LDM3D: and 16-bit depth maps) and the parameters
    written into each PNG (sdort's keys and A1111's `parameters` text)."""

    images: list
    parameters: dict
    depths: list | None = field(default=None)


def check_options(args, loaded: LoadedModel) -> dict:
    """Read and check a request's inputs (files included) before anything runs; the pipeline's
    task arguments."""
    inputs = task_inputs(args, loaded.xl)
    add_sld_inputs(args, inputs)
    pipe = loaded.pipe
    takes = inspect.signature(pipe.__call__).parameters
    if "negative_prompt" in inputs and "negative_prompt" not in takes:
        # LCM: guidance was distilled into the UNet against the empty prompt; diffusers takes none
        if inputs.pop("negative_prompt") is not None:
            raise ValueError(f"--negative-prompt: {type(pipe).__name__} takes no negative prompt")
    if "num_images_per_prompt" in takes:
        inputs["num_images_per_prompt"] = args.num_images
    elif args.num_images != 1:
        raise ValueError(f"--num-images: {type(pipe).__name__} makes one image per prompt")  # the latent upscaler
    return inputs


def generate(loaded: LoadedModel, args) -> Generation:
    """Run one request (`sdort` task options) on a loaded model, as `sdort <task>` does: the same
    options and seed give the same images wherever this runs."""
    inputs = check_options(args, loaded)
    pipe, refiner = loaded.pipe, loaded.refiner
    loaded.use_scheduler(args.scheduler)
    for switch, enable, disable in ((args.vae_tiling, pipe.enable_vae_tiling, pipe.disable_vae_tiling),
                                    (args.vae_slicing, pipe.enable_vae_slicing, pipe.disable_vae_slicing)):
        enable() if switch else disable()
    guidance = args.guidance if args.guidance is not None else call_default(pipe, "guidance_scale")
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    generator = make_generator(args.rng, seed)
    steps = args.steps if args.steps is not None else call_default(pipe, "num_inference_steps")
    common = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generator)
    depths = None
    if refiner is None:
        output = pipe(**common, **inputs)
        # LDM3D gives RGB images and depth maps (16-bit "I;16" PIL images) where others give images
        images, depths = (output.rgb, output.depth) if loaded.ldm3d else (output.images, None)
    else:
        # diffusers' two-stage SDXL: the base stops at high_noise_frac and hands its latents over;
        # the refiner continues the same generator and finishes the schedule
        latents = pipe(**common, **inputs, denoising_end=args.high_noise_frac, output_type="latent").images
        kept = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "num_images_per_prompt")
        text = {k: v for k, v in inputs.items() if k in kept}
        images = refiner(**common, **text, image=latents, denoising_start=args.high_noise_frac).images
    parameters = {
        "task": args.command, "prompt": getattr(args, "prompt", None),
        "negative_prompt": getattr(args, "negative_prompt", None), "seed": seed, "rng": args.rng,
        "steps": steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__,
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
    if loaded.loras:
        parameters["lora"] = ", ".join(f"{file}:{scale:g}" for file, scale in loaded.loras)
    if loaded.embeddings:
        parameters["embedding"] = ", ".join(file if token is None else f"{file}:{token}"
                                            for file, token in loaded.embeddings)
    fields = png_info.a1111_fields(parameters, pipe.scheduler)  # A1111's `parameters` text, for other tools
    parameters[png_info.PARAMETERS_KEY] = png_info.infotext(parameters["prompt"], parameters["negative_prompt"], fields)
    return Generation(list(images), parameters, None if depths is None else list(depths))


def write_images(generation: Generation, output) -> list[Path]:
    """Save a generation's PNGs at `output` (several images: -1, -2, ...; LDM3D's depth maps beside
    them as -depth), each through a temporary file and a rename; the paths written."""
    paths = output_paths(output, len(generation.images))
    save_images(generation.images, paths, generation.parameters)
    if generation.depths is None:
        return paths
    save_images(generation.depths, depth_paths(paths), generation.parameters)
    return [path for pair in zip(paths, depth_paths(paths)) for path in pair]
