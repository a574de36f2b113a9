"""Shared fixtures: tiny diffusers pipelines built from configs with fixed seeds, saved with
`save_pretrained` and exported with sdort's exporter — the oracle and the system under test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# The tests interleave torch and ONNX Runtime in one process on 2 cores: one torch thread keeps
# the two thread pools from fighting (diffusers' calls were up to 50x slower otherwise).
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "export" / "presets" / "tokenizer"


def tiny_components(v_prediction: bool = False, seed: int = 0):
    """Torch parts of an SD1-style (or SD2-style, v-prediction) model small enough for CPU tests."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
        attention_head_dim=(2, 4) if v_prediction else 8, use_linear_projection=v_prediction,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=49408, projection_dim=32,
        hidden_act="gelu" if v_prediction else "quick_gelu",
    ))
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!" if v_prediction else "<|endoftext|>")
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                  steps_offset=1, clip_sample=False)
    if v_prediction:
        scheduler = DDIMScheduler(prediction_type="v_prediction", **common)
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in common.items() if k != "clip_sample"})
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_model(folder: Path, v_prediction: bool = False):
    """Save a tiny diffusers StableDiffusionPipeline and export it with sdort; returns (diffusers pipe, export dir)."""
    from diffusers import StableDiffusionPipeline

    from sdort.export import export

    source = folder / "diffusers"
    StableDiffusionPipeline(**tiny_components(v_prediction)).save_pretrained(source)
    # The reference reads the same files as the export, as a diffusers user loading the folder would.
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = export(str(source), folder / "onnx", log=lambda *_: None)
    return pipe, out


@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="session")
def sd2(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sd2"), v_prediction=True)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The `tiny` preset exported by the `sd-export` code path."""
    from sdort.export import export

    return export("tiny", tmp_path_factory.mktemp("tiny") / "model", log=lambda *_: None)


def latents_for(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def tiny_xl_components(kind: str = "base", seed: int = 0):
    """Torch parts of a tiny SDXL model: two text encoders of different widths (32 and 64) for the
    base, the second alone for the refiner (aesthetic-score time ids), a 9-channel UNet for inpainting."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    refiner = kind == "refiner"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=9 if kind == "inpaint" else 4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        # time ids x 8 + the pooled projection (32): 6 sizes/crop for the base, 5 with the aesthetic score
        projection_class_embeddings_input_dim=(5 if refiner else 6) * 8 + 32,
        cross_attention_dim=64 if refiner else 96, norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.13025,
    )

    def text_config(width):
        return CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=width, intermediate_size=37,
                              layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
                              projection_dim=32, hidden_act="gelu")

    torch.manual_seed(seed + 2)
    text_encoder = None if refiner else CLIPTextModel(text_config(32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(64))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                 tokenizer=None if refiner else CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
                 tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"), scheduler=scheduler)
    if refiner:
        parts.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return parts


def build_xl_model(folder: Path, kind: str = "base"):
    """Save a tiny diffusers SDXL pipeline (text-to-image, refiner = image-to-image, or inpainting) and
    export it with sdort; returns (diffusers pipe, export dir)."""
    import diffusers

    from sdort.export import export

    cls = {"base": diffusers.StableDiffusionXLPipeline, "refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    source = folder / "diffusers"
    cls(**tiny_xl_components(kind), add_watermarker=False).save_pretrained(source)
    pipe = cls.from_pretrained(source, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    out = export(str(source), folder / "onnx", log=lambda *_: None)
    return pipe, out


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    return build_xl_model(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def sdxl_refiner(tmp_path_factory):
    return build_xl_model(tmp_path_factory.mktemp("sdxl_refiner"), "refiner")


@pytest.fixture(scope="session")
def sdxl_inpaint(tmp_path_factory):
    return build_xl_model(tmp_path_factory.mktemp("sdxl_inpaint"), "inpaint")
