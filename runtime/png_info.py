"""Generation parameters in PNG text that other tools read: the AUTOMATIC1111 `parameters` chunk.

A1111's PNG Info tab, Civitai and sd-parsers read one text chunk named `parameters`, which A1111's
`modules/processing.py` (`create_infotext`) writes as

    <prompt>
    Negative prompt: <negative prompt>          (only when there is one)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1, Size: 512x512, ...

and `modules/infotext_utils.py` (`parse_generation_parameters`, regular expression `re_param`) reads
back. This module builds that text as A1111 does, parses it as A1111 does, maps sdort's schedulers
to A1111's sampler and schedule-type names and back, and turns a PNG's parameters (sdort's own
keys first, A1111's otherwise) into the `sdort` command's option values for `--from-png`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PARAMETERS_KEY = "parameters"  # the PNG text key A1111 writes and its readers look for

# A1111's `re_param` (modules/infotext_utils.py): one `key: value` pair, the value either a JSON
# string in double quotes or everything up to the next comma.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

# The key order of A1111's `create_infotext` (the keys sdort can fill; the others are left out the
# way A1111 leaves out a None value). "Refiner" and "Refiner switch at" are A1111's refiner
# extension's extra parameters, which come after the fixed keys and before "Version".
A1111_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
               "Denoising strength", "Clip skip", "RNG", "Refiner", "Refiner switch at", "Version")

# diffusers scheduler class -> A1111 sampler label (modules/sd_samplers_kdiffusion.py, _timesteps.py,
# _lcm.py). DPMSolverMultistepScheduler depends on its algorithm and order: see `a1111_sampler`.
_SAMPLERS = {
    "EulerAncestralDiscreteScheduler": "Euler a",
    "EulerDiscreteScheduler": "Euler",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
# Samplers A1111 runs on timesteps rather than on a k-diffusion sigma schedule: no Karras variant.
_TIMESTEP_SAMPLERS = {"DDIM", "PLMS", "UniPC", "LCM"}
# sdort's sigma-spacing options -> A1111's "Schedule type" labels (modules/sd_schedulers.py).
_SCHEDULE_TYPES = (("use_karras_sigmas", "Karras"), ("use_exponential_sigmas", "Exponential"),
                   ("use_beta_sigmas", "Beta"))


def quote(value) -> str:
    """A value as A1111's `infotext_utils.quote` writes it: JSON-quoted (non-ASCII kept) only when
    it holds a comma, a colon or a newline, which would otherwise end or split the pair."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A value as A1111's `infotext_utils.unquote` reads it: a double-quoted value is JSON, and one
    that is not valid JSON is kept as it is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def a1111_sampler(scheduler) -> tuple[str | None, str | None]:
    """(Sampler, Schedule type) in A1111's names for a scheduler (an sdort scheduler object, or a
    (class name, config dict) pair), or (None, None) when A1111 has no sampler that computes the
    same thing (DDPM, DEIS, TCD, the EDM schedulers, DPM-Solver singlestep, DPM-Solver++ 3M ODE...)."""
    if isinstance(scheduler, tuple):
        class_name, config = scheduler
    else:
        class_name, config = type(scheduler).__name__, dict(scheduler.config)
    if class_name == "DPMSolverMultistepScheduler":
        # k-diffusion's 2M and 2M SDE steps are DPM-Solver++ with the midpoint second-order update
        algorithm, order = config.get("algorithm_type", "dpmsolver++"), config.get("solver_order", 2)
        heun = config.get("solver_type", "midpoint") == "heun"
        sampler = {("dpmsolver++", 2, False): "DPM++ 2M", ("sde-dpmsolver++", 2, False): "DPM++ 2M SDE",
                   ("sde-dpmsolver++", 2, True): "DPM++ 2M SDE Heun",
                   ("sde-dpmsolver++", 3, False): "DPM++ 3M SDE"}.get((algorithm, order, heun))
    elif class_name == "PNDMScheduler" and not config.get("skip_prk_steps", False):
        sampler = None  # PLMS is PNDM without the Runge-Kutta warm-up steps
    else:
        sampler = _SAMPLERS.get(class_name)
    schedule = next((label for option, label in _SCHEDULE_TYPES if config.get(option)), "Automatic")
    if sampler is None or (sampler in _TIMESTEP_SAMPLERS and schedule != "Automatic"):
        return None, None
    return sampler, schedule


def scheduler_name_for(sampler: str, schedule: str | None = None) -> str | None:
    """The `--scheduler` short name (schedulers/names.py) for an A1111 sampler and schedule type,
    or None when sdort has none. Older A1111 versions wrote the schedule into the sampler's label
    ("DPM++ 2M Karras"); both spellings are read."""
    from ..schedulers import SCHEDULER_NAMES, get_scheduler_class

    if sampler.endswith(" Karras"):
        sampler, schedule = sampler[: -len(" Karras")], "Karras"
    for short, (class_name, overrides) in SCHEDULER_NAMES.items():
        defaults = get_scheduler_class(class_name)().config  # the option defaults of that class
        config = {**defaults, "skip_prk_steps": True, **overrides}
        if a1111_sampler((class_name, config)) == (sampler, schedule or "Automatic"):
            return short
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"sdort {version('sdort')}"
    except PackageNotFoundError:
        return "sdort"


def a1111_fields(parameters: dict, scheduler=None) -> dict:
    """A1111's `key: value` fields for sdort's PNG keys (the dict `sdort` writes), in A1111's order.
    Sizes, seeds and steps are the ones sdort ran; Clip skip counts as A1111's does (1 is the last
    layer, so diffusers' clip_skip n is A1111's n + 1, written only above 1, as A1111 does)."""
    sampler, schedule = a1111_sampler(scheduler) if scheduler is not None else (None, None)
    clip_skip = parameters.get("clip_skip")
    fields = {
        "Steps": parameters.get("steps"), "Sampler": sampler, "Schedule type": schedule,
        "CFG scale": parameters.get("guidance"), "Seed": parameters.get("seed"), "Size": parameters.get("size"),
        # A1111's hash is of the checkpoint file, which an exported ONNX folder no longer has
        "Model hash": None,
        "Model": Path(parameters["model"]).resolve().name if parameters.get("model") else None,
        "Denoising strength": parameters.get("strength"),
        "Clip skip": int(clip_skip) + 1 if clip_skip is not None and int(clip_skip) > 0 else None,
        # A1111's "CPU" is torch's CPU generator; its default "GPU" (written as nothing) is CUDA's
        # Philox, which sdort's torch-cuda reproduces; numpy's generator has no A1111 name.
        "RNG": {"torch-cpu": "CPU"}.get(parameters.get("rng")),
        "Refiner": Path(parameters["refiner"]).resolve().name if parameters.get("refiner") else None,
        "Refiner switch at": parameters.get("high_noise_frac") if parameters.get("refiner") else None,
        "Version": _version(),
    }
    return {key: fields[key] for key in A1111_ORDER if fields[key] is not None}


def infotext(prompt: str | None, negative_prompt: str | None, fields: dict) -> str:
    """The `parameters` text, built as A1111's `create_infotext`: the prompt, `Negative prompt: ...`
    on its own line when there is one, then the fields joined by ", " (a field whose value equals
    its key is written alone, as A1111 does), the whole stripped."""
    pairs = ", ".join(key if key == value else f"{key}: {quote(value)}"
                      for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt or ''}{negative}\n{pairs}".strip()


def parse_infotext(text: str) -> dict:
    """The fields of a `parameters` text, read as A1111's `parse_generation_parameters`: the last
    line holds the fields when `re_param` finds at least three pairs there (else it is prompt
    text); lines from `Negative prompt:` on are the negative prompt; quoted values are unquoted.
    Unlike A1111, sizes stay "WxH" and none of A1111's UI defaults are filled in."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in RE_PARAM.findall(last):
        result[key] = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
    return result


def read_png_text(path: str, flag: str) -> dict:
    """A PNG's text chunks (tEXt, zTXt, iTXt) as a dict; a missing or unreadable file, or one with
    no text, is an error naming `flag`."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{flag}: {path} not found")
    try:
        with Image.open(file) as image:
            image.load()  # text chunks after the image data are read with it
            text = dict(getattr(image, "text", None) or {})
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{flag}: {path} is not a readable image ({str(exc).splitlines()[0]})") from None
    if PARAMETERS_KEY not in text and text.get("software") != "sdort":
        raise ValueError(f"{flag}: {path} holds no generation parameters (neither A1111's "
                         f"'{PARAMETERS_KEY}' text nor sdort's)")
    return text


def describe(text: dict) -> dict:
    """What `sdort info` shows: A1111's fields parsed from `parameters` and sdort's own keys."""
    sdort_keys = {key: value for key, value in text.items() if key != PARAMETERS_KEY}
    a1111 = parse_infotext(text[PARAMETERS_KEY]) if PARAMETERS_KEY in text else {}
    return {"parameters": a1111, "sdort": sdort_keys if text.get("software") == "sdort" else {}}


def _number(kind, value, key: str):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--from-png: the PNG's {key!r} is {value!r}, not a number") from None


def option_values(text: dict) -> dict:
    """The `sdort` option values (argparse dests) a PNG's parameters give for `--from-png`: sdort's
    keys where it wrote them (they name the model folder and input images too), else A1111's fields.
    A1111 samplers sdort has no scheduler for are reported on stderr and left to the folder's own."""
    if text.get("software") == "sdort":
        values = {key: text[key] for key in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2",
                                             "rng", "model", "image", "mask", "depth_map", "refiner")
                  if text.get(key)}  # sdort writes "" for a prompt not given (None)
        values["scheduler"] = text.get("scheduler_name") or text.get("scheduler")
        for key, kind in (("seed", int), ("steps", int), ("guidance", float), ("strength", float),
                          ("clip_skip", int), ("padding_mask_crop", int), ("noise_level", int),
                          ("high_noise_frac", float)):
            if text.get(key) not in (None, ""):
                values[key] = _number(kind, text[key], key)
        size = text.get("size")
    else:
        fields = parse_infotext(text[PARAMETERS_KEY])
        values = {"prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"] or None}
        for key, dest, kind in (("Seed", "seed", int), ("Steps", "steps", int), ("CFG scale", "guidance", float),
                                ("Denoising strength", "strength", float)):
            if key in fields:
                values[dest] = _number(kind, fields[key], key)
        if "Clip skip" in fields:  # A1111 counts the last layer as 1; diffusers counts skipped layers
            skip = _number(int, fields["Clip skip"], "Clip skip")
            values["clip_skip"] = skip - 1 if skip > 1 else None
        values["rng"] = {"CPU": "torch-cpu"}.get(fields.get("RNG"), "torch-cuda")  # A1111: none is GPU
        if "Sampler" in fields:
            values["scheduler"] = scheduler_name_for(fields["Sampler"], fields.get("Schedule type"))
            if values["scheduler"] is None:
                print(f"sdort: warning: --from-png: sdort has no scheduler for A1111's sampler "
                      f"{fields['Sampler']!r}; the model's own is used", file=sys.stderr)
        size = fields.get("Size")
    if size and re.fullmatch(r"\d+x\d+", size):
        values["width"], values["height"] = (int(side) for side in size.split("x"))
    return {key: value for key, value in values.items() if value is not None}


def apply_option_values(parser, values: dict) -> None:
    """Make `values` the defaults of a task's options, so that options given on the command line
    still win; the options they fill (the prompt, --model, --image, ...) are no longer required."""
    for action in parser._actions:
        if action.dest in values:
            action.default = values[action.dest]
            action.required = False
            if not action.option_strings and action.nargs is None:  # the prompt: now optional
                action.nargs = "?"
