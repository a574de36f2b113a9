"""`sdort serve`: the JSON API of the AUTOMATIC1111 web UI, served from pipelines loaded once.

    sdort serve --model models/sd15 --port 7860 --max-concurrency 1 --queue-size 8

Routes (A1111's paths and shapes, `modules/api/api.py` and `models.py`):

    POST /sdapi/v1/txt2img      {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", ...}
    POST /sdapi/v1/img2img      ... + "init_images": [base64], "denoising_strength", "mask" (inpainting)
    GET  /sdapi/v1/samplers     [{"name", "aliases", "options"}] for the samplers sdort offers
    GET  /sdapi/v1/schedulers   A1111's schedule types sdort offers
    GET  /sdapi/v1/sd-models    the one model folder being served
    GET  /sdapi/v1/options      the few settings a client reads at start (sd_model_checkpoint, ...)
    GET  /health, /internal/ping

Each request becomes the options of `sdort txt2img|img2img|inpaint` (`cli.task_options`) and runs through
`generation.generate`, so the same fields and seed give the same pixels over HTTP as from the command:
the answer is A1111's `{"images": [base64 PNG], "parameters": {request}, "info": "<JSON text>"}`, the PNGs
carrying the parameters `sdort` writes (A1111's `parameters` text included).

Generations run in a pool of `--max-concurrency` threads (ONNX Runtime releases the GIL); at most
`--queue-size` more wait, and a request beyond that is answered 503 at once. A bad request is answered
4xx with a JSON `detail` naming the field; a generation that fails answers 500 for that request only.
Starlette and uvicorn are imported only here (`pip install 'sdort[serve]'`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import png_info

logger = logging.getLogger("sdort.serve")

# A1111's sampler aliases (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py),
# for the samplers sdort has a scheduler for; clients may send an alias as `sampler_name`.
SAMPLER_ALIASES = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "LMS": ["k_lms"], "Heun": ["k_heun"],
    "DPM2": ["k_dpm_2"], "DPM2 a": ["k_dpm_2_a"], "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde"],
    "DDIM": ["ddim"], "PLMS": ["plms"], "UniPC": ["unipc"], "LCM": ["k_lcm"],
}
# A1111's schedule types (modules/sd_schedulers.py): name -> label, and its default rho.
SCHEDULE_TYPES = {"automatic": ("Automatic", -1), "karras": ("Karras", 7.0), "exponential": ("Exponential", -1),
                  "beta": ("Beta", -1)}
# A1111 fields whose non-default value changes the image in a way sdort cannot (hires fix, face
# restoration, seamless tiling, variation seeds, scripts, saved styles): refused rather than ignored.
REFUSED = {"enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0,
           "script_name": "", "styles": []}
# A1111's `randn_source` setting -> sdort's --rng (A1111 "GPU" is torch's CUDA Philox generator).
RNG_SOURCES = {"CPU": "torch-cpu", "GPU": "torch-cuda"}


class RequestError(Exception):
    """A request answered with `status` and a JSON `detail` (which names the field at fault)."""

    def __init__(self, status: int, detail: str, error: str = "BadRequest"):
        super().__init__(detail)
        self.status, self.detail, self.error = status, detail, error


@dataclass
class Limits:
    max_pixels: int = 1024 * 1024  # width x height of one image (and of an uploaded image)
    max_images: int = 16  # batch_size x n_iter
    max_body_bytes: int = 64 * 2**20


# ---- the samplers ----------------------------------------------------------------------------------


class Samplers:
    """A1111's sampler and schedule-type names for sdort's schedulers: the pairs `png_info.a1111_sampler`
    gives for the `--scheduler` short names (schedulers/names.py), built once."""

    def __init__(self):
        from ..schedulers import SCHEDULER_NAMES, get_scheduler_class

        self.short: dict[tuple[str, str], str] = {}  # (sampler label, schedule label) -> short name
        for short, (class_name, overrides) in SCHEDULER_NAMES.items():
            config = {**get_scheduler_class(class_name)().config, "skip_prk_steps": True, **overrides}
            sampler, schedule = png_info.a1111_sampler((class_name, config))
            if sampler is not None:
                self.short.setdefault((sampler, schedule), short)
        self.names = list(dict.fromkeys(sampler for sampler, _ in self.short))
        lookup = {name.lower(): name for name in self.names}
        for name in self.names:
            lookup.update({alias: name for alias in SAMPLER_ALIASES.get(name, [])})
        self._lookup = lookup

    def schedules(self, sampler: str) -> list[str]:
        return [schedule for name, schedule in self.short if name == sampler]

    def listing(self) -> list[dict]:
        """`GET /sdapi/v1/samplers`: A1111's shape; `options` says which schedule types go with each."""
        return [{"name": name, "aliases": SAMPLER_ALIASES.get(name, []),
                 "options": {"schedule_types": self.schedules(name)}} for name in self.names]

    def schedule_listing(self) -> list[dict]:
        """`GET /sdapi/v1/schedulers`: the schedule types offered with at least one sampler."""
        offered = {schedule for _, schedule in self.short}
        return [{"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
                for name, (label, rho) in SCHEDULE_TYPES.items() if label in offered]

    def resolve(self, sampler: str | None, schedule: str | None) -> str | None:
        """The `--scheduler` short name for A1111's `sampler_name` and `scheduler` (schedule type), or
        None (no sampler named: the folder's own scheduler, as `sdort` without --scheduler). Names are
        matched without case; A1111's older labels ("DPM++ 2M Karras") are read too."""
        schedule_label = "Automatic"
        if schedule is not None:
            known = {name: label for name, (label, _) in SCHEDULE_TYPES.items()}
            known.update({label.lower(): label for label, _ in SCHEDULE_TYPES.values()})
            if schedule.lower() not in known:
                raise RequestError(422, f"scheduler: unknown schedule type {schedule!r}; sdort offers "
                                        f"{', '.join(entry['label'] for entry in self.schedule_listing())}")
            schedule_label = known[schedule.lower()]
        if sampler is None:
            if schedule_label != "Automatic":
                raise RequestError(422, f"scheduler: {schedule_label!r} needs a sampler_name")
            return None
        name = sampler
        if name.lower().endswith(" karras") and name.lower() not in self._lookup:
            name, schedule_label = name[: -len(" karras")], "Karras"
        label = self._lookup.get(name.lower())
        if label is None:
            raise RequestError(422, f"sampler_name: {sampler!r} is not offered by sdort; it offers "
                                    f"{', '.join(self.names)} (see GET /sdapi/v1/samplers)")
        short = self.short.get((label, schedule_label))
        if short is None:
            raise RequestError(422, f"scheduler: sampler {label!r} has no {schedule_label!r} schedule in sdort; "
                                    f"it offers {', '.join(self.schedules(label))}")
        return short


# ---- reading a request ------------------------------------------------------------------------------

_KINDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false",
          "list": "a list", "dict": "an object"}


def _get(body: dict, name: str, kind: str, default=None):
    """Field `name` of the request, checked to be of JSON type `kind` (None or absent: `default`).
    An integer may come as an integral float (20.0), as pydantic reads it for A1111."""
    value = body.get(name)
    if value is None:
        return default
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool),
          "list": isinstance(value, list), "dict": isinstance(value, dict)}[kind]
    if not ok:
        raise RequestError(422, f"{name}: expected {_KINDS[kind]}, got {json.dumps(value)[:60]}")
    if kind == "number" and not math.isfinite(value):
        raise RequestError(422, f"{name}: expected a finite number, got {value}")
    return value


def _flag(body: dict, name: str) -> bool:
    """A1111's switches, which clients send as true/false or as 0/1."""
    value = body.get(name)
    if value in (None, False, 0) or value in (True, 1):
        return bool(value)
    raise RequestError(422, f"{name}: expected true/false or 0/1, got {json.dumps(value)[:60]}")


def _at_least(name: str, value, low) -> None:
    if value is not None and value < low:
        raise RequestError(422, f"{name}: must be at least {low}, got {value}")


def decode_image(value, name: str, limits: Limits):
    """A base64 image (A1111's form, with or without a `data:image/...;base64,` prefix) as (bytes, PIL
    size), checked to be a readable image no larger than --max-pixels before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise RequestError(422, f"{name}: expected a base64 string, got {json.dumps(value)[:60]}")
    text = value.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise RequestError(422, f"{name}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{name}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if size[0] * size[1] > limits.max_pixels:
                raise RequestError(422, f"{name}: {size[0]}x{size[1]} is more than --max-pixels "
                                        f"({limits.max_pixels} pixels)")
            image.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RequestError(422, f"{name}: not a readable image ({reason})") from None
    return data, size


@dataclass
class Job:
    """One request, read and checked: the `sdort <task>` fields of each iteration (n_iter), and what
    the answer repeats."""

    task: str
    iterations: list[dict]  # task_options fields, one dict per n_iter batch (its own seed)
    batch_size: int
    request: dict
    folder: Path | None = None  # temporary files of the uploaded images
    seeds: list[int] = field(default_factory=list)

    def cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _write_image(folder: Path, name: str, data: bytes, size, target) -> str:
    """Save an uploaded image for `sdort`'s --image/--mask: its own bytes when it has the target size
    (so the pixels are exactly those the command would read from the same file), else resized to it
    as A1111's "Just resize" (resize_mode 0: Lanczos) and saved losslessly."""
    path = folder / f"{name}.png"
    if target is None or tuple(size) == tuple(target):
        path.write_bytes(data)
        return str(path)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        resized = image.convert("RGB").resize(target, Image.LANCZOS)
    resized.save(path, format="PNG")
    return str(path)


def read_job(route: str, body: dict, samplers: Samplers, limits: Limits, model_names: set[str]) -> Job:
    """An A1111 txt2img or img2img request as `sdort` task fields, every field checked (422 naming it).
    Fields not sent take the `sdort` command's defaults (the pipeline's, as diffusers); A1111 fields
    sdort has no use for are ignored, those it cannot honour (REFUSED) are refused when set."""
    for name, default in REFUSED.items():
        value = body.get(name)
        if value not in (None, default):
            raise RequestError(422, f"{name}: not offered by sdort serve (got {json.dumps(value)[:60]}; "
                                    f"leave it {json.dumps(default)})")
    prompt = _get(body, "prompt", "str", "")
    negative = _get(body, "negative_prompt", "str") or None  # A1111's "" is no negative prompt, as the CLI's default
    steps, cfg = _get(body, "steps", "int"), _get(body, "cfg_scale", "number")
    width, height = _get(body, "width", "int"), _get(body, "height", "int")
    batch_size, n_iter = _get(body, "batch_size", "int", 1), _get(body, "n_iter", "int", 1)
    seed = _get(body, "seed", "int", -1)
    _at_least("steps", steps, 1)
    _at_least("batch_size", batch_size, 1)
    _at_least("n_iter", n_iter, 1)
    if batch_size * n_iter > limits.max_images:
        raise RequestError(422, f"batch_size: {batch_size} x n_iter {n_iter} images is more than --max-images "
                                f"({limits.max_images})")
    for name, side in (("width", width), ("height", height)):
        if side is not None and (side <= 0 or side % 8):
            raise RequestError(422, f"{name}: must be a positive multiple of 8, got {side}")
    if width is not None and height is not None and width * height > limits.max_pixels:
        raise RequestError(422, f"width: {width}x{height} is more than --max-pixels ({limits.max_pixels} pixels)")
    if seed < -1 or seed >= 2**64:
        raise RequestError(422, f"seed: must be -1 (random) or in [0, 2**64), got {seed}")
    sampler = _get(body, "sampler_name", "str") or _get(body, "sampler_index", "str")
    scheduler = samplers.resolve(sampler, _get(body, "scheduler", "str"))

    fields = dict(prompt=prompt, negative_prompt=negative, steps=steps, guidance=cfg, scheduler=scheduler,
                  num_images=batch_size)
    settings = _get(body, "override_settings", "dict", {})
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint not in (None, "") and str(checkpoint) not in model_names:
        raise RequestError(422, f"override_settings.sd_model_checkpoint: {checkpoint!r} is not served here; "
                                f"this server has {sorted(model_names)[0]!r}")
    clip = _get(settings, "CLIP_stop_at_last_layers", "int")
    _at_least("override_settings.CLIP_stop_at_last_layers", clip, 1)
    if clip is not None and clip > 1:
        fields["clip_skip"] = clip - 1  # A1111 counts the last layer as 1; diffusers counts skipped layers
    source = _get(settings, "randn_source", "str", "CPU")
    if source not in RNG_SOURCES:
        raise RequestError(422, f"override_settings.randn_source: sdort has {', '.join(RNG_SOURCES)}, got {source!r}")
    fields["rng"] = RNG_SOURCES[source]

    job = Job(task="txt2img", iterations=[], batch_size=batch_size, request=dict(body))
    if route == "txt2img":
        fields.update(width=width, height=height)
    else:
        job.folder = Path(tempfile.mkdtemp(prefix="sdort-serve-"))
        try:
            _read_images(body, fields, job, limits, width, height)
        except BaseException:
            job.cleanup()
            raise
    base_seed = random.randrange(2**32) if seed == -1 else seed
    for i in range(n_iter):  # A1111: batch i starts at seed + i * batch_size
        job.iterations.append({**fields, "seed": base_seed + i * batch_size})
        job.seeds += [base_seed + i * batch_size] * batch_size
    return job


def _read_images(body: dict, fields: dict, job: Job, limits: Limits, width, height) -> None:
    """img2img's uploads: init_images[0] (and `mask` for inpainting) saved for --image/--mask, resized to
    width x height when those are given and differ, and denoising_strength as --strength."""
    init_images = _get(body, "init_images", "list")
    if not init_images:
        raise RequestError(422, "init_images: img2img needs one base64 image")
    if len(init_images) > 1:
        raise RequestError(422, f"init_images: sdort takes one image, got {len(init_images)}")
    resize_mode = _get(body, "resize_mode", "int", 0)
    if resize_mode != 0:
        raise RequestError(422, f"resize_mode: sdort offers 0 (just resize), got {resize_mode}")
    data, size = decode_image(init_images[0], "init_images[0]", limits)
    target = (width or size[0], height or size[1]) if (width or height) else None
    fields["image"] = _write_image(job.folder, "init", data, size, target)
    strength = _get(body, "denoising_strength", "number")
    if strength is not None and not 0 <= strength <= 1:
        raise RequestError(422, f"denoising_strength: must be in [0, 1], got {strength}")
    fields["strength"] = strength
    mask = body.get("mask")
    if mask is None:
        job.task = "img2img"
        return
    job.task = "inpaint"
    mask_data, mask_size = decode_image(mask, "mask", limits)
    if _flag(body, "inpainting_mask_invert"):
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(mask_data)) as image:
            inverted = io.BytesIO()
            ImageOps.invert(image.convert("L")).save(inverted, format="PNG")
        mask_data = inverted.getvalue()
    fields["mask"] = _write_image(job.folder, "mask", mask_data, mask_size, target or size)
    if _flag(body, "inpaint_full_res"):
        # A1111's "only masked" with its padding is diffusers' padding_mask_crop
        fields["padding_mask_crop"] = _get(body, "inpaint_full_res_padding", "int", 32)


# ---- running a request --------------------------------------------------------------------------------


def encode_png(image, parameters: dict) -> str:
    """An image as base64 PNG with the parameters `sdort` writes into its files (A1111's included)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in parameters.items():
        info.add_text(key, "" if value is None else str(value))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return base64.b64encode(out.getvalue()).decode("ascii")


def info_text(job: Job, generations: list, loaded) -> str:
    """A1111's `info`: the JSON text of `Processed.js()` (modules/processing.py), filled from what ran."""
    first = generations[0].parameters
    sampler, schedule = png_info.a1111_sampler(loaded.pipe.scheduler)
    infotexts = [g.parameters[png_info.PARAMETERS_KEY] for g in generations for _ in g.images]
    count, negative = len(infotexts), first["negative_prompt"] or ""
    width, height = (int(side) for side in first["size"].split("x"))
    clip_skip = first.get("clip_skip")
    return json.dumps({
        "prompt": first["prompt"], "all_prompts": [first["prompt"]] * count,
        "negative_prompt": negative, "all_negative_prompts": [negative] * count,
        # a batch shares one generator (as `sdort --num-images`): each image lists its batch's seed
        "seed": job.seeds[0], "all_seeds": job.seeds, "subseed": -1, "all_subseeds": [-1] * count,
        "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": sampler or first["scheduler"], "cfg_scale": first["guidance"], "steps": first["steps"],
        "batch_size": job.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": Path(first["model"]).name, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first.get("strength"),
        "extra_generation_params": {"Schedule type": schedule} if schedule else {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": int(clip_skip) + 1 if clip_skip else 1,
        "is_using_inpainting_conditioning": job.task == "inpaint" and loaded.pipe.unet_in_channels == 9,
        "version": png_info.a1111_fields({}).get("Version"),
    }, ensure_ascii=False)


class Service:
    """The loaded model and the worker pool. The txt2img pipeline is loaded at start; img2img and
    inpainting are built on its sessions when first asked for (no part loaded twice). Each worker
    thread has its own copy of each (`LoadedModel.for_thread`), since a generation sets its scheduler
    on the pipeline."""

    def __init__(self, model: str, provider: str, max_concurrency: int, queue_size: int, limits: Limits,
                 precision: str = "fp32"):
        from .generation import LoadedModel

        self.model, self.provider, self.limits = str(model), provider, limits
        txt2img = LoadedModel("txt2img", self.model, provider, precision=precision)
        txt2img.pipe.set_progress_bar_config(disable=True)
        self.base = {"txt2img": txt2img}
        self.name = Path(self.model).resolve().name
        self.samplers = Samplers()
        self.capacity, self.max_concurrency = max_concurrency + queue_size, max_concurrency
        self.pending = 0  # requests running or waiting; read and written on the event loop only
        self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="sdort-serve")
        self._local = threading.local()
        self._load_lock = threading.Lock()

    def model_names(self) -> set[str]:
        return {self.name, self.sd_model()["title"], self.model}

    def sd_model(self) -> dict:
        return {"title": self.name, "model_name": self.name, "hash": None, "sha256": None,
                "filename": str(Path(self.model).resolve()), "config": None}

    def loaded_for(self, task: str):
        """This thread's LoadedModel for `task`, built on the shared sessions the first time."""
        from .generation import LoadedModel

        models = self._local.__dict__.setdefault("models", {})
        if task not in models:
            with self._load_lock:
                if task not in self.base:
                    loaded = LoadedModel(task, self.model, self.provider, share=self.base["txt2img"])
                    loaded.pipe.set_progress_bar_config(disable=True)
                    self.base[task] = loaded
            models[task] = self.base[task].for_thread()
        return models[task]

    def run(self, job: Job) -> dict:
        """Run a request in a worker thread: A1111's answer, or a RequestError (422 for a value the
        pipeline refuses, 500 when the generation itself fails)."""
        from .cli import task_options
        from .generation import generate

        try:
            loaded = self.loaded_for(job.task)
            generations = [generate(loaded, task_options(job.task, {**fields, "model": self.model}))
                           for fields in job.iterations]
        except ValueError as exc:  # a value the command's parser or the pipeline refuses
            raise RequestError(422, str(exc).splitlines()[0] if str(exc) else "invalid request") from None
        except Exception as exc:  # noqa: BLE001 - any failure answers this request only, without a traceback
            logger.exception("sdort serve: a %s generation failed", job.task)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RequestError(500, f"generation failed: {message}", "GenerationFailed") from None
        images = []
        for generation in generations:
            parameters = dict(generation.parameters)
            for name in ("image", "mask"):  # the uploads' temporary paths mean nothing to the client
                if name in parameters:
                    parameters[name] = "init_images[0]" if name == "image" else "mask"
            images += [encode_png(image, parameters) for image in generation.images]
        request = dict(job.request)
        if not request.get("include_init_images"):  # as A1111: the uploads are not sent back
            for name in ("init_images", "mask"):
                if name in request:
                    request[name] = None
        return {"images": images if request.get("send_images", True) is not False else [],
                "parameters": request, "info": info_text(job, generations, loaded)}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---- the ASGI app -------------------------------------------------------------------------------------


async def read_body(request, limits: Limits) -> dict:
    """The request's JSON object, refused beyond --max-body-mb (413) or when it is not JSON (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        # Read (and drop) a body up to a few times the limit before answering: a client that sends its
        # whole body before reading (urllib, most scripts) otherwise meets a closed connection, a broken
        # pipe instead of the 413. Beyond that the connection is simply closed on it.
        drained = 0
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > 4 * limits.max_body_bytes:
                break
        raise RequestError(413, f"body: {declared} bytes is more than the limit ({limits.max_body_bytes})",
                           "PayloadTooLarge")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise RequestError(413, f"body: more than the limit ({limits.max_body_bytes} bytes)", "PayloadTooLarge")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(422, f"body: expected a JSON object, got {type(body).__name__}")
    return body


def create_app(service: Service):
    """The Starlette app of `sdort serve` on a loaded `Service`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error_response(status: int, error: str, detail: str):
        return JSONResponse({"error": error, "detail": detail}, status_code=status)

    def generation_route(route: str):
        async def endpoint(request):
            try:
                body = await read_body(request, service.limits)
                job = read_job(route, body, service.samplers, service.limits, service.model_names())
            except RequestError as exc:
                return error_response(exc.status, exc.error, exc.detail)
            if service.pending >= service.capacity:
                job.cleanup()
                return error_response(503, "QueueFull", f"the server is busy: {service.max_concurrency} running "
                                                        f"and {service.capacity - service.max_concurrency} waiting; "
                                                        f"retry later")
            loop = asyncio.get_running_loop()
            service.pending += 1

            def finished(_future):  # in the worker (or here, when cancelled): free the slot on the loop
                job.cleanup()
                loop.call_soon_threadsafe(_release)

            future = service.executor.submit(service.run, job)
            future.add_done_callback(finished)
            try:
                return JSONResponse(await asyncio.wrap_future(future))
            except RequestError as exc:
                return error_response(exc.status, exc.error, exc.detail)

        return endpoint

    def _release():
        service.pending -= 1

    async def samplers(_request):
        return JSONResponse(service.samplers.listing())

    async def schedulers(_request):
        return JSONResponse(service.samplers.schedule_listing())

    async def sd_models(_request):
        return JSONResponse([service.sd_model()])

    async def options(_request):
        return JSONResponse({"sd_model_checkpoint": service.name, "CLIP_stop_at_last_layers": 1,
                             "randn_source": "CPU", "samples_format": "png"})

    async def health(_request):
        return JSONResponse({"status": "ok", "model": service.name, "pending": service.pending,
                             "capacity": service.capacity})

    async def ping(_request):
        return JSONResponse({})

    async def http_error(_request, exc):
        return error_response(exc.status_code, "HTTPError", str(exc.detail))

    async def server_error(_request, exc):  # anything unforeseen: a JSON 500, the traceback only in the log
        logger.error("sdort serve: %s: %s", type(exc).__name__, exc)
        return error_response(500, "InternalError", "internal error (see the server's log)")

    routes = [
        Route("/sdapi/v1/txt2img", generation_route("txt2img"), methods=["POST"]),
        Route("/sdapi/v1/img2img", generation_route("img2img"), methods=["POST"]),
        Route("/sdapi/v1/samplers", samplers), Route("/sdapi/v1/schedulers", schedulers),
        Route("/sdapi/v1/sd-models", sd_models), Route("/sdapi/v1/options", options),
        Route("/health", health), Route("/internal/ping", ping),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def add_arguments(parser) -> None:
    """`sdort serve`'s options (cli.py builds the subcommand with them)."""
    parser.add_argument("--model", required=True, help="folder written by sd-export (or Optimum)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    parser.add_argument("--max-concurrency", type=int, default=1, help="generations run at once (default 1)")
    parser.add_argument("--queue-size", type=int, default=8,
                        help="requests that may wait beyond those running; more are answered 503 (default 8)")
    parser.add_argument("--max-pixels", type=int, default=1024 * 1024,
                        help="largest width x height of an image, generated or uploaded (default 1048576)")
    parser.add_argument("--max-images", type=int, default=16, help="largest batch_size x n_iter (default 16)")
    parser.add_argument("--max-body-mb", type=float, default=64, help="largest request body in MiB (default 64)")
    from .cli import add_provider_arguments

    add_provider_arguments(parser)


def serve_command(args) -> int:
    """`sdort serve`: check the options, load the model, serve until interrupted."""
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--max-pixels", args.max_pixels),
                        ("--max-images", args.max_images), ("--max-body-mb", args.max_body_mb)):
        if value <= 0:
            raise ValueError(f"{flag}: must be positive, got {value}")
    if args.queue_size < 0:
        raise ValueError(f"--queue-size: must be 0 or more, got {args.queue_size}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port: must be in [0, 65535], got {args.port}")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError("serve: needs Starlette and uvicorn; install them with pip install 'sdort[serve]'") from None
    limits = Limits(args.max_pixels, args.max_images, int(args.max_body_mb * 2**20))
    service = Service(args.model, args.provider, args.max_concurrency, args.queue_size, limits, args.precision)
    print(f"sdort serve: {service.name} on http://{args.host}:{args.port} (A1111 API under /sdapi/v1)",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    finally:
        service.close()
    return 0
