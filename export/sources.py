"""Where a model comes from: a built-in preset, a local diffusers folder, an original-format single
file (`single_file.py`), or a Hugging Face Hub repo.

Each source is turned into a `Source`: the torch components to trace, plus the files that are
copied unchanged into the artifact (tokenizer, scheduler configuration, feature extractor).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable
from importlib import resources
from pathlib import Path

# Every presets/<name>.json is a preset: configs of the parts, built with random weights.
PRESETS = tuple(sorted(p.name[:-5] for p in resources.files("sdort.export").joinpath("presets").iterdir()
                       if p.name.endswith(".json")))

# The files a Stable Diffusion repo needs for export; weights in safetensors first.
_HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    # the x4 upscaler's scheduler that noises the low-res image
    "low_res_scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    # SDXL's second tokenizer and text encoder
    "tokenizer_2/*",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    # depth-to-image and image variation
    "depth_estimator/config.json",
    "depth_estimator/model.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.safetensors",
    "feature_extractor/preprocessor_config.json",
    # the safety checker (left out by `sd-export --no-safety-checker`)
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
]

# The torch components each pipeline class needs beyond `unet` and `vae`: (required, optional).
# Other classes (text-to-image, image-to-image, Optimum's ONNX classes...) need the text encoder.
# SDXL: a refiner has only the second text encoder.
_XL_COMPONENTS = (("text_encoder_2",), ("text_encoder",))
TASK_COMPONENTS = {
    "StableDiffusionDepth2ImgPipeline": (("text_encoder",), ("depth_estimator",)),
    "StableDiffusionImageVariationPipeline": (("image_encoder",), ()),
    "StableDiffusionXLPipeline": _XL_COMPONENTS,
    "StableDiffusionXLImg2ImgPipeline": _XL_COMPONENTS,
    "StableDiffusionXLInpaintPipeline": _XL_COMPONENTS,
}
_TEXT_COMPONENTS = (("text_encoder",), ())
# Schedulers besides `scheduler/` that a pipeline reads, copied unchanged when the model has them.
EXTRA_SCHEDULERS = ("low_res_scheduler",)
# Parts whose graph takes a feature extractor's output: its preprocessor_config.json is copied with them.
_IMAGE_INPUT_COMPONENTS = ("depth_estimator", "image_encoder", "safety_checker")
# Components exported whatever the task when the model_index lists them.
_ANY_TASK_COMPONENTS = ("safety_checker",)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def task_components(pipeline_class: str, index: dict) -> tuple[tuple, tuple]:
    """(required, optional) components beyond unet and vae, from the class name or, for an unknown
    class, from the components the model_index lists."""
    if pipeline_class in TASK_COMPONENTS:
        return TASK_COMPONENTS[pipeline_class]

    def listed(name):
        entry = index.get(name)
        return bool(entry) and entry[0] is not None

    if listed("text_encoder_2"):
        return _XL_COMPONENTS
    if listed("depth_estimator"):
        return TASK_COMPONENTS["StableDiffusionDepth2ImgPipeline"]
    if listed("image_encoder") and not listed("text_encoder"):
        return TASK_COMPONENTS["StableDiffusionImageVariationPipeline"]
    return _TEXT_COMPONENTS


def check_task(pipeline_class: str, modules: dict, where: str) -> None:
    """What the runtime of a task relies on: depth-to-image concatenates one depth channel to the latents."""
    if pipeline_class == "StableDiffusionDepth2ImgPipeline" or "depth_estimator" in modules:
        channels = modules["unet"].config.in_channels
        latent = modules["vae"].config.latent_channels
        if channels != latent + 1:
            raise ValueError(f"{where}: a depth-to-image model needs a UNet with {latent + 1} input channels "
                             f"(latents and depth); this one has {channels}")


@dataclass
class Source:
    """A model ready to export: torch modules by component name and the files copied as they are."""

    description: str
    pipeline_class: str
    modules: dict  # component name -> torch module (eval mode, float32)
    tokenizers: dict[str, dict[str, bytes]]  # folder (tokenizer, tokenizer_2) -> file name -> content
    scheduler_config: bytes  # scheduler_config.json, unchanged
    model_index: dict = field(default_factory=dict)
    # the pipeline's own settings in model_index.json (SDXL's force_zeros_for_empty_prompt, ...)
    pipeline_config: dict = field(default_factory=dict)
    # feature_extractor/preprocessor_config.json, unchanged, and its model_index entry (class name)
    feature_extractor: bytes | None = None
    feature_extractor_class: str | None = None
    # More schedulers' configs, unchanged, by folder: the x4 upscaler's `low_res_scheduler` (DDPM)
    extra_scheduler_configs: dict[str, bytes] = field(default_factory=dict)
    # A lazy source (`lazy=True`) reads or builds each component only when `load` asks for it: until
    # then, and again after `release`, `modules` holds a stand-in of the same class and config on
    # torch's meta device (no weights), which is all that naming, sizing and config files need.
    loaders: dict[str, Callable] = field(default_factory=dict, repr=False)
    _stand_ins: dict = field(default_factory=dict, repr=False)

    def load(self, component: str):
        """The component with its weights (read or built now, for a lazy source)."""
        loader = self.loaders.get(component)
        if loader is not None and component not in self._stand_ins:
            module = loader().eval()
            self._stand_ins[component] = self.modules[component]
            self.modules[component] = module
        return self.modules[component]

    def release(self, component: str) -> None:
        """Drop a lazily loaded component's weights: its stand-in takes its place again (an eager
        source keeps its modules)."""
        if component in self._stand_ins:
            self.modules[component] = self._stand_ins.pop(component)


def _meta(build: Callable):
    """`build()` on torch's meta device: the module's class and config, no weights, no time."""
    import torch

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build().eval()


class _PresetBuilder:
    """Builds a preset's components one at a time with exactly the weights of building them all in
    order from one seed: the random state before each component is recorded (and replayed)."""

    def __init__(self, seed: int, constructors: dict[str, Callable]):
        import torch

        self.constructors = constructors
        self.order = list(constructors)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.states = {0: torch.get_rng_state()}  # index in build order -> random state before it

    def build(self, component: str):
        import torch

        index = self.order.index(component)
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            start = max(i for i in self.states if i <= index)
            for i in range(start, index + 1):
                torch.set_rng_state(self.states[i])
                module = self.constructors[self.order[i]]()
                self.states[i + 1] = torch.get_rng_state()
                if i < index:
                    del module  # built only to advance the random state
        return module


def _preset_constructors(cfg: dict) -> dict[str, Callable]:
    """Component name -> a function building it with random weights, in the preset's build order."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    constructors = {}
    if "text_encoder" in cfg:
        constructors["text_encoder"] = lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    if "text_encoder_2" in cfg:
        from transformers import CLIPTextModelWithProjection

        constructors["text_encoder_2"] = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    constructors["unet"] = lambda: UNet2DConditionModel(**cfg["unet"])
    constructors["vae"] = lambda: AutoencoderKL(**cfg["vae"])
    if "depth_estimator" in cfg:
        from transformers import DPTConfig, DPTForDepthEstimation

        constructors["depth_estimator"] = lambda: DPTForDepthEstimation(DPTConfig(**cfg["depth_estimator"]))
    if "image_encoder" in cfg:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        constructors["image_encoder"] = lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    if "safety_checker" in cfg:
        constructors["safety_checker"] = lambda: _preset_safety_checker(cfg["safety_checker"])
    return constructors


def _preset_safety_checker(spec: dict):
    """diffusers' StableDiffusionSafetyChecker from a preset's `config` (a CLIPConfig), with random
    concept embeddings (diffusers initialises all 20 to ones, alike) and the preset's thresholds."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    checker = StableDiffusionSafetyChecker(CLIPConfig(**spec["config"]))
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(spec["concept_threshold"])
        checker.special_care_embeds_weights.fill_(spec["special_care_threshold"])
    return checker


def _component_class(name: str, entry: list, library):
    """The class that loads a diffusers folder's component from its model_index entry."""
    if name == "safety_checker":
        # saved as ["stable_diffusion", "StableDiffusionSafetyChecker"] (a pipeline module, not a
        # top-level class); Safe SD's SafeStableDiffusionSafetyChecker has the same weights
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        return StableDiffusionSafetyChecker
    return getattr(library, entry[1])


def preset_config(name: str) -> dict:
    return json.loads(resources.files("sdort.export").joinpath("presets", f"{name}.json").read_text())


def shipped_tokenizer_dir() -> Path:
    """The CLIP ViT-L/14 vocabulary shipped with sdort (derived from OpenAI CLIP, MIT licence)."""
    return Path(str(resources.files("sdort.export").joinpath("presets", "tokenizer")))


def build_preset(name: str, lazy: bool = False) -> Source:
    """Build a preset's torch modules from its shipped configs with deterministic random weights.

    `lazy`: build each only when `Source.load` asks for it (the same weights), so that an export
    holds one component at a time."""
    import torch

    cfg = preset_config(name)
    # Built in this order from one seed, so that a preset's weights never change.
    constructors = _preset_constructors(cfg)
    loaders = {}
    if lazy:
        builder = _PresetBuilder(cfg["seed"], constructors)
        modules = {k: _meta(c) for k, c in constructors.items()}
        loaders = {k: (lambda k=k: builder.build(k)) for k in constructors}
    else:
        torch.manual_seed(cfg["seed"])
        modules = {k: c() for k, c in constructors.items()}
    tokenizers = {}
    for suffix in ("", "_2"):
        if f"text_encoder{suffix}" not in modules:
            continue
        files = {p.name: p.read_bytes() for p in shipped_tokenizer_dir().iterdir() if p.is_file()}
        # SD 2.x tokenizers (and SDXL's second) differ from SD 1.x only in their special-token
        # settings (pad with "!").
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            settings = json.loads(files[fname])
            settings.update(cfg.get(f"tokenizer{suffix}", {}))
            files[fname] = json.dumps(settings, indent=2).encode()
        tokenizers[f"tokenizer{suffix}"] = files
    scheduler = json.dumps(cfg["scheduler"], indent=2).encode()
    source = Source(f"preset:{name}", cfg["pipeline"], {k: m.eval() for k, m in modules.items()}, tokenizers,
                    scheduler, pipeline_config=cfg.get("pipeline_config", {}), loaders=loaders)
    for folder in EXTRA_SCHEDULERS:
        if folder in cfg:
            source.extra_scheduler_configs[folder] = json.dumps(cfg[folder], indent=2).encode()
    if "feature_extractor" in cfg:
        source.feature_extractor = (json.dumps(cfg["feature_extractor"], indent=2, sort_keys=True) + "\n").encode()
        source.feature_extractor_class = cfg["feature_extractor"]["image_processor_type"]
    check_task(source.pipeline_class, source.modules, f"preset {name}")
    return source


def _stand_in(cls, path: Path, diffusers_class: bool):
    """A weightless module of `cls` with the config saved in `path`."""
    if diffusers_class:
        return _meta(lambda: cls.from_config(cls.load_config(path)))
    config = cls.config_class.from_pretrained(path)
    return _meta(lambda: cls(config))


def load_folder(folder: str | os.PathLike, lazy: bool = False) -> Source:
    """Load a diffusers `save_pretrained` folder (model_index.json, unet/, vae/, text_encoder/, ...).

    Which components are loaded depends on the pipeline class (see `TASK_COMPONENTS`): text
    tasks need the text encoder and tokenizer, depth-to-image adds the depth estimator when the
    model has one, image variation needs the image encoder and has no text encoder.
    `lazy`: read only the configs now and each component's weights when `Source.load` asks for it.
    """
    import diffusers
    import transformers

    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: not found; MODEL must be a diffusers folder (save_pretrained layout)")
    index = json.loads(index_path.read_text())
    pipeline_class = index.get("_class_name", "StableDiffusionPipeline")
    required, optional = task_components(pipeline_class, index)
    modules, loaders = {}, {}
    for name in (*required, "unet", "vae", *optional, *_ANY_TASK_COMPONENTS):
        entry = index.get(name)
        if not entry or entry[0] is None:
            if name in optional or name in _ANY_TASK_COMPONENTS:
                continue
            raise FileNotFoundError(f"{index_path}: the model has no '{name}' component")
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder / name}: folder missing")
        library = diffusers if entry[0] == "diffusers" else transformers
        cls = _component_class(name, entry, library)
        if lazy:
            modules[name] = _stand_in(cls, folder / name, library is diffusers)
            loaders[name] = lambda cls=cls, path=folder / name: cls.from_pretrained(path).float().eval()
        else:
            modules[name] = cls.from_pretrained(folder / name).float().eval()
    tokenizers = {}
    for suffix in ("", "_2"):
        if f"text_encoder{suffix}" not in modules:
            continue
        tokenizer_dir = folder / f"tokenizer{suffix}"
        if not (tokenizer_dir / "vocab.json").is_file() and not (tokenizer_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{tokenizer_dir}: no vocab.json or tokenizer.json")
        tokenizers[tokenizer_dir.name] = {p.name: p.read_bytes() for p in tokenizer_dir.iterdir() if p.is_file()}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise FileNotFoundError(f"{scheduler_path}: not found")
    settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    source = Source(str(folder), pipeline_class, modules, tokenizers, scheduler_path.read_bytes(), index,
                    pipeline_config=settings, loaders=loaders)
    for name in EXTRA_SCHEDULERS:
        if (index.get(name) or [None])[0] is not None:
            config_path = folder / name / "scheduler_config.json"
            if not config_path.is_file():
                raise FileNotFoundError(f"{config_path}: not found; model_index.json lists '{name}'")
            source.extra_scheduler_configs[name] = config_path.read_bytes()
    if any(name in modules for name in _IMAGE_INPUT_COMPONENTS):
        # The runtime preprocesses images for these parts exactly as this file says.
        config_path = folder / "feature_extractor" / PREPROCESSOR_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: not found; the depth estimator, image encoder and safety checker need it")
        source.feature_extractor = config_path.read_bytes()
        # The portable class name (transformers 5 saves e.g. "DPTImageProcessorPil" in model_index.json).
        entry = index.get("feature_extractor") or [None, None]
        source.feature_extractor_class = json.loads(source.feature_extractor).get("image_processor_type") or entry[1]
    check_task(pipeline_class, modules, str(folder))
    return source


def download(repo_id: str) -> Path:
    """Download the files that export needs from the Hub; fail fast, naming the repo, when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as exc:  # connection, authentication, unknown repo: all end the same way for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConnectionError(
            f"could not download '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}: {reason}); "
            f"without network, download it elsewhere and pass the local diffusers folder instead"
        ) from None


def load_source(model: str, lazy: bool = False, config: str | None = None, allow_pickle: bool = False) -> Source:
    """Resolve MODEL: a preset name, a local folder, an original-format single-file checkpoint, or a
    Hub repo id ("owner/name"); `lazy` as in `build_preset`. `config` and `allow_pickle` are for a
    single file (see `single_file.load_single_file`)."""
    if model not in PRESETS and Path(model).is_file():
        from .single_file import load_single_file

        return load_single_file(model, config=config, allow_pickle=allow_pickle, lazy=lazy)
    if config is not None:
        raise ValueError(f"{model}: --config applies to a single-file checkpoint, and MODEL is not a file")
    if model in PRESETS:
        return build_preset(model, lazy=lazy)
    if Path(model).exists():
        if not Path(model).is_dir():
            raise FileNotFoundError(f"{model}: MODEL must be a folder, a file, a preset ({', '.join(PRESETS)}) "
                                    f"or a Hub repo id")
        return load_folder(model, lazy=lazy)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        source = load_folder(download(model), lazy=lazy)
        source.description = model
        return source
    raise FileNotFoundError(f"{model}: no such folder, file, preset ({', '.join(PRESETS)}) or Hub repo id (owner/name)")
