"""Tiny x4 and latent x2 upscalers for the parity tests: diffusers pipelines built from the shipped
presets' configs (the preset's seed, components built in the preset's order, so the weights are the
preset's own), saved with `save_pretrained` and exported with sd-export from that folder."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import TOKENIZER_DIR


def preset_components(name: str) -> dict:
    """The torch components of preset `name`, with the weights `sd-export <name>` exports."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdort.export.sources import preset_config

    cfg = preset_config(name)
    torch.manual_seed(cfg["seed"])  # the preset's build order: text encoder, UNet, VAE
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    parts = dict(text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval(),
                 tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, **cfg["tokenizer"]))
    for folder in ("scheduler", "low_res_scheduler"):
        if folder in cfg:
            parts[folder] = getattr(diffusers, cfg[folder]["_class_name"]).from_config(cfg[folder])
    return parts, cfg.get("pipeline_config", {})


def _build(folder: Path, class_name: str, preset: str):
    import diffusers

    from sdort.export import export

    cls = getattr(diffusers, class_name)
    parts, config = preset_components(preset)
    source = folder / "diffusers"
    cls(**parts, **config).save_pretrained(source)
    # The reference reads the same files as the export, as a diffusers user loading the folder would.
    pipe = cls.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    return pipe, export(str(source), folder / "onnx", log=lambda *_: None)


def build_upscale_model(folder: Path):
    """(diffusers StableDiffusionUpscalePipeline, export dir) of the tiny-upscale preset's weights."""
    return _build(folder, "StableDiffusionUpscalePipeline", "tiny-upscale")


def build_latent_upscale_model(folder: Path):
    """(diffusers StableDiffusionLatentUpscalePipeline, export dir) of the tiny-latent-upscale weights."""
    return _build(folder, "StableDiffusionLatentUpscalePipeline", "tiny-latent-upscale")
