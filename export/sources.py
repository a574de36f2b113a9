"""Where a model comes from: a built-in preset, a local diffusers folder, or a Hugging Face Hub repo.

Each source is turned into a `Source`: the torch components to trace, plus the files that are
copied unchanged into the artifact (tokenizer, scheduler configuration).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# Every presets/<name>.json is a preset: configs of the parts, built with random weights.
PRESETS = tuple(sorted(p.name[:-5] for p in resources.files("sdort.export").joinpath("presets").iterdir()
                       if p.name.endswith(".json")))

# The files a Stable Diffusion repo needs for export; weights in safetensors first.
_HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@dataclass
class Source:
    """A model ready to export: torch modules by component name and the files copied as they are."""

    description: str
    pipeline_class: str
    modules: dict  # component name -> torch module (eval mode, float32)
    tokenizer_files: dict[str, bytes]  # file name -> content
    scheduler_config: bytes  # scheduler_config.json, unchanged
    model_index: dict = field(default_factory=dict)


def preset_config(name: str) -> dict:
    return json.loads(resources.files("sdort.export").joinpath("presets", f"{name}.json").read_text())


def shipped_tokenizer_dir() -> Path:
    """The CLIP ViT-L/14 vocabulary shipped with sdort (derived from OpenAI CLIP, MIT licence)."""
    return Path(str(resources.files("sdort.export").joinpath("presets", "tokenizer")))


def build_preset(name: str) -> Source:
    """Build a preset's torch modules from its shipped configs with deterministic random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = preset_config(name)
    torch.manual_seed(cfg["seed"])
    modules = {
        "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        "unet": UNet2DConditionModel(**cfg["unet"]),
        "vae": AutoencoderKL(**cfg["vae"]),
    }
    tokenizer_files = {p.name: p.read_bytes() for p in shipped_tokenizer_dir().iterdir() if p.is_file()}
    if cfg["tokenizer"]:
        # SD 2.x tokenizers differ from SD 1.x only in their special-token settings (pad with "!").
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            settings = json.loads(tokenizer_files[fname])
            settings.update(cfg["tokenizer"])
            tokenizer_files[fname] = json.dumps(settings, indent=2).encode()
    scheduler = json.dumps(cfg["scheduler"], indent=2).encode()
    return Source(f"preset:{name}", cfg["pipeline"], {k: m.eval() for k, m in modules.items()}, tokenizer_files, scheduler)


def load_folder(folder: str | os.PathLike) -> Source:
    """Load a diffusers `save_pretrained` folder (model_index.json, unet/, vae/, text_encoder/, ...)."""
    import diffusers
    import transformers

    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: not found; MODEL must be a diffusers folder (save_pretrained layout)")
    index = json.loads(index_path.read_text())
    modules = {}
    for name in ("text_encoder", "unet", "vae"):
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise FileNotFoundError(f"{index_path}: the model has no '{name}' component")
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder / name}: folder missing")
        library = diffusers if entry[0] == "diffusers" else transformers
        cls = getattr(library, entry[1])
        modules[name] = cls.from_pretrained(folder / name).float().eval()
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file() and not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no vocab.json or tokenizer.json")
    tokenizer_files = {p.name: p.read_bytes() for p in tokenizer_dir.iterdir() if p.is_file()}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise FileNotFoundError(f"{scheduler_path}: not found")
    return Source(str(folder), index.get("_class_name", "StableDiffusionPipeline"), modules,
                  tokenizer_files, scheduler_path.read_bytes(), index)


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


def load_source(model: str) -> Source:
    """Resolve MODEL: a preset name, a local folder, or a Hub repo id ("owner/name")."""
    if model in PRESETS:
        return build_preset(model)
    if Path(model).exists():
        if not Path(model).is_dir():
            raise FileNotFoundError(f"{model}: MODEL must be a folder, a preset ({', '.join(PRESETS)}) or a Hub repo id")
        return load_folder(model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        source = load_folder(download(model))
        source.description = model
        return source
    raise FileNotFoundError(f"{model}: no such folder, preset ({', '.join(PRESETS)}) or Hub repo id (owner/name)")
