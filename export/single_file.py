"""Original-format single-file checkpoints (CompVis / Stability / A1111 / Civitai `.safetensors`) as a Source.

The weights are read and converted by diffusers' own single-file code, component by component, as
`StableDiffusionPipeline.from_single_file(path, config=...)` does (`diffusers/loaders/single_file.py`):
diffusers infers the architecture from the checkpoint's keys (`infer_diffusers_model_type`), takes the
configs (model_index.json, each part's config.json, tokenizers, scheduler) from the diffusers repo it
names for that architecture, or from `config`, and converts the original key names to its own. The
exported folder is then the one a diffusers folder with those configs and weights gives.
"""

from __future__ import annotations

import os
from pathlib import Path

from .exporter import _without_safety_checker
from .sources import Source, load_folder

SAFE_SUFFIXES = (".safetensors",)
# torch pickles: unpickling can run code that the file names
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES

# What diffusers downloads of a repo when it fetches only a single file's configs.
_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]

# diffusers' model types (`infer_diffusers_model_type`) that sd-export takes: SD 1.x, SD 2.x, SDXL.
SUPPORTED_TYPES = ("v1", "v2", "inpainting", "inpainting_v2", "xl_base", "xl_refiner", "xl_inpaint")
_UNET_PREFIX = "model.diffusion_model."  # the original UNet's weights (diffusers' LDM_UNET_KEY)
_CONV_IN = _UNET_PREFIX + "input_blocks.0.0.weight"


def check_file(path: Path, allow_pickle: bool) -> None:
    """Refuse a file sd-export cannot read safely: an unknown suffix, or a pickle without `allow_pickle`."""
    # Case kept: diffusers reads a file as safetensors by its exact suffix, anything else through torch.load.
    suffix = path.suffix
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: a single-file checkpoint must end in .safetensors "
                         f"(or, with --allow-pickle, {', '.join(PICKLE_SUFFIXES)}); got '{suffix or path.name}'")
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(
            f"{path}: a {suffix} checkpoint is a Python pickle, and loading a pickle can run any code the file "
            f"holds; sd-export reads it only with --allow-pickle (for a file you trust); "
            f"or use the model's .safetensors version"
        )


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's state dict, read by diffusers (`load_single_file_checkpoint`: safetensors
    memory-mapped, pickles through torch.load(weights_only=True), a nested "state_dict" unwrapped)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # safetensors' header errors, torch's unpickling errors, diffusers' OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or not any(isinstance(k, str) and k.startswith(_UNET_PREFIX)
                                                   for k in checkpoint):
        raise ValueError(f"{path}: not a Stable Diffusion checkpoint in the original single-file layout "
                         f"(no '{_UNET_PREFIX}' UNet weights); LoRA, lone VAE or diffusers-format files are not models")
    return checkpoint


def model_type(path: Path, checkpoint: dict) -> str:
    """diffusers' name for the checkpoint's architecture; one of `SUPPORTED_TYPES`."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = infer_diffusers_model_type(checkpoint)
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: diffusers identifies it as a '{kind}' checkpoint; sd-export takes single files "
                         f"of SD 1.x, SD 2.x and SDXL ({', '.join(SUPPORTED_TYPES)})")
    return kind


def _fetch_configs(repo: str, what: str) -> Path:
    """The config files of a Hub repo (from the local cache when they are there)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=_CONFIG_PATTERNS, etag_timeout=10))
    except Exception as exc:  # offline, unknown repo, authentication: the way out is the same
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConnectionError(
            f"{what} needs the diffusers configs of the Hub repo '{repo}', which could not be fetched "
            f"({type(exc).__name__}: {reason}); without network, pass --config DIR: a local diffusers folder "
            f"of the same architecture (save_pretrained layout; its config files suffice)"
        ) from None


def resolve_config(path: Path, checkpoint: dict, config: str | os.PathLike | None) -> Path:
    """The local folder of diffusers configs for the checkpoint: `config` (a folder, or a Hub repo id
    whose configs are fetched), else the repo diffusers names for the inferred architecture."""
    kind = model_type(path, checkpoint)
    if config is not None:
        config = str(config)
        if Path(config).is_dir():
            return Path(config)
        if config.count("/") == 1 and not config.startswith((".", "/")):
            return _fetch_configs(config, f"--config {config}")
        raise FileNotFoundError(f"{config}: --config must be a local diffusers folder or a Hub repo id (owner/name)")
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]
    return _fetch_configs(repo, f"{path} (a '{kind}' checkpoint, as diffusers infers it)")


def _loader(path: Path, name: str, entry: list, checkpoint: dict, config_dir: Path):
    """A function loading component `name` from the checkpoint exactly as the pipeline's
    `from_single_file` does (`load_single_file_sub_model`), in float32."""

    def load():
        from diffusers import pipelines
        from diffusers.loaders.single_file import load_single_file_sub_model

        library, class_name = entry
        try:
            module = load_single_file_sub_model(
                library_name=library, class_name=class_name, name=name, checkpoint=checkpoint, pipelines=pipelines,
                is_pipeline_module=hasattr(pipelines, library), cached_model_config_path=str(config_dir),
                local_files_only=True,
            )
        except Exception as exc:  # diffusers' SingleFileComponentError, shape mismatches against the config
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: could not load its {name} with the configs of {config_dir} ({reason})") from None
        return module.float().eval()

    return load


def _check_unet_channels(path: Path, checkpoint: dict, source: Source, config_dir: Path) -> None:
    """An inpainting checkpoint (9 input channels) needs an inpainting config, and the reverse."""
    weight = checkpoint.get(_CONV_IN)
    expected = source.modules["unet"].config.in_channels
    if weight is not None and weight.shape[1] != expected:
        raise ValueError(f"{path}: its UNet takes {weight.shape[1]} input channels, the config {config_dir} "
                         f"describes {expected}; pass a --config of the same kind of model (e.g. inpainting)")


def load_single_file(model: str | os.PathLike, config: str | os.PathLike | None = None, allow_pickle: bool = False,
                     lazy: bool = False) -> Source:
    """The Source of an original-format single-file checkpoint (SD 1.x, SD 2.x, SDXL; inpainting
    and SDXL refiners included), with the configs of `config` or of the repo diffusers infers.

    As diffusers' `from_single_file`, the safety checker is not loaded (a single file has none).
    `lazy`: convert each component only when `Source.load` asks for it (the checkpoint itself is
    memory-mapped)."""
    path = Path(model)
    check_file(path, allow_pickle)
    checkpoint = read_checkpoint(path)
    config_dir = resolve_config(path, checkpoint, config)
    # The configs, tokenizers, scheduler and pipeline settings as from that diffusers folder, with
    # weightless stand-ins for the modules; the weights come from the checkpoint below.
    source = load_folder(config_dir, lazy=True)
    source.description = str(path)
    _without_safety_checker(source)
    _check_unet_channels(path, checkpoint, source, config_dir)
    source.loaders = {name: _loader(path, name, source.model_index[name], checkpoint, config_dir)
                      for name in source.modules}
    if not lazy:
        for name in list(source.loaders):
            source.modules[name] = source.loaders.pop(name)()
    return source
