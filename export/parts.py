"""The export contract of each ONNX part: input and output names, dynamic axes, sample inputs.

Declared once here and used both to trace the torch module and to check the exported graph
in ONNX Runtime. The names follow the layout of Optimum's ONNX Runtime diffusion pipelines
(see docs/architecture.md), which sdort's runtime reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class _TextEncoder(torch.nn.Module):
    """CLIP text encoder: input_ids -> its named outputs, then every hidden state (embeddings first).

    CLIPTextModel gives (last_hidden_state, pooler_output), CLIPTextModelWithProjection (SDXL's second
    encoder) (text_embeds, last_hidden_state); the hidden states serve clip_skip and SDXL, which reads
    the penultimate one.
    """

    def __init__(self, model, outputs):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return (*(out[name] for name in self.outputs), *out.hidden_states)


class _UNet(torch.nn.Module):
    """UNet: (sample, timestep [B] float, encoder_hidden_states) -> out_sample."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _UNetXL(_UNet):
    """SDXL's UNet: the micro-conditioning of `addition_embed_type="text_time"` as two more inputs,
    the pooled text embeddings and the size/crop (or aesthetic score) time ids."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        conditions = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=conditions, return_dict=False)[0]


class _UNetClassLabels(_UNet):
    """The x4 upscaler's UNet: `class_labels` (int64 [B], the low-res image's noise level) pick a class
    embedding added to the time embedding (`num_class_embeds` in its config)."""

    def forward(self, sample, timestep, encoder_hidden_states, class_labels):
        return self.model(sample, timestep, encoder_hidden_states, class_labels=class_labels, return_dict=False)[0]


def _k_downsample(self, inputs):
    # KDownsample2D as a depthwise convolution: diffusers builds a [C, C, 4, 4] kernel, zero off the
    # diagonal, from the input's shape at run time, which the ONNX exporter cannot give a kernel shape
    channels = int(inputs.shape[1])  # a constant of the graph: the block's channel count
    inputs = torch.nn.functional.pad(inputs, (self.pad,) * 4, self.pad_mode)
    weight = self.kernel.to(inputs.dtype)[None, None].expand(channels, 1, -1, -1)
    return torch.nn.functional.conv2d(inputs, weight, stride=2, groups=channels)


def _k_upsample(self, inputs):
    # KUpsample2D as a depthwise transposed convolution (see `_k_downsample`)
    channels = int(inputs.shape[1])
    inputs = torch.nn.functional.pad(inputs, ((self.pad + 1) // 2,) * 4, self.pad_mode)
    weight = self.kernel.to(inputs.dtype)[None, None].expand(channels, 1, -1, -1)
    return torch.nn.functional.conv_transpose2d(inputs, weight, stride=2, padding=self.pad * 2 + 1, groups=channels)


def traceable_k_resampling(model) -> None:
    """Give the UNet's k-diffusion resampling layers (the latent upscaler's blocks) forwards that trace
    to ONNX: the same filter applied per channel, the zero cross-channel terms left out."""
    import types

    from diffusers.models.downsampling import KDownsample2D
    from diffusers.models.upsampling import KUpsample2D

    for module in model.modules():
        if isinstance(module, KDownsample2D):
            module.forward = types.MethodType(_k_downsample, module)
        elif isinstance(module, KUpsample2D):
            module.forward = types.MethodType(_k_upsample, module)


class _UNetTimestepCond(_UNet):
    """A UNet with `time_cond_proj_dim`: `timestep_cond` [B, dim] is projected and added to the time
    embedding (the latent x2 upscaler's noise-level and pooled-text condition, or an LCM UNet's
    guidance-scale embedding; its other inputs are the plain SD ones)."""

    def __init__(self, model):
        super().__init__(model)
        traceable_k_resampling(model)

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.model(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    """VAE encoder: image in [-1, 1] -> latent_parameters (mean and logvar, concatenated on channels).

    The Gaussian is sampled in numpy by the runtime, so that its generator controls the noise.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters


class _VaeDecoder(torch.nn.Module):
    """VAE decoder: latent_sample (already divided by scaling_factor) -> image in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _DepthEstimator(torch.nn.Module):
    """DPT depth estimator (transformers DPTForDepthEstimation): pixel_values -> predicted_depth [B, H, W]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=True).predicted_depth


class _ImageEncoder(torch.nn.Module):
    """CLIP image encoder (transformers CLIPVisionModelWithProjection): pixel_values -> image_embeds [B, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=True).image_embeds


class _SafetyChecker(torch.nn.Module):
    """diffusers' StableDiffusionSafetyChecker: (clip_input, images) -> out_images, has_nsfw_concepts
    (its `forward_onnx`, Optimum's contract), and the raw scores `special_scores` [B, 3] and
    `concept_scores` [B, 17]: cosine similarity to each concept embedding less its threshold.

    The runtime flags images from the raw scores by the rule of diffusers' PyTorch `forward`, which
    rounds them to 3 decimals (the traced graph cannot follow its per-image Python loop), and
    blacks out the flagged images itself; `has_nsfw_concepts` and `out_images` serve Optimum."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, clip_input, images):
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        checker = self.model
        image_embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        special_scores = cosine_distance(image_embeds, checker.special_care_embeds) - checker.special_care_embeds_weights
        concept_scores = cosine_distance(image_embeds, checker.concept_embeds) - checker.concept_embeds_weights
        special_care = torch.any(special_scores > 0, dim=1)
        has_nsfw_concepts = torch.any(concept_scores + (special_care * 0.01).unsqueeze(1) > 0, dim=1)
        out_images = torch.where(has_nsfw_concepts.view(-1, *([1] * (images.dim() - 1))), torch.zeros_like(images),
                                 images)
        return out_images, has_nsfw_concepts, special_scores, concept_scores


@dataclass
class Part:
    """One ONNX graph of the artifact: which torch component it comes from and its I/O contract."""

    name: str  # folder name in the artifact
    component: str  # key of the torch component it is traced from
    wrap: Callable[[torch.nn.Module], torch.nn.Module]
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    sample: Callable[..., tuple]  # (module, batch, height, width, modules) -> sample inputs
    fp16: bool = True  # converted to float16 by `--dtype fp16` (the VAE stays float32: it overflows)
    hidden_states: bool = False  # also outputs `hidden_states.0` .. `hidden_states.N`, as Optimum names them

    def output_names(self, module) -> list[str]:
        if not self.hidden_states:
            return list(self.outputs)
        return [*self.outputs, *(f"hidden_states.{i}" for i in range(module.config.num_hidden_layers + 1))]

    def axes(self, module) -> dict[str, dict[int, str]]:
        """Dynamic axes of every input and output, the hidden states' batch included."""
        return {**{name: {0: "batch"} for name in self.output_names(module)}, **self.dynamic_axes}


def _text_sample(model, batch, height, width, modules):
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, model.config.max_position_embeddings), generator=generator)
    return (ids.to(torch.int32),)


def _unet_sample(model, batch, height, width, modules):
    cfg = model.config
    generator = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, cfg.in_channels, height, width, generator=generator)
    timestep = torch.linspace(1.0, 981.0, batch)
    hidden = torch.randn(batch, 77, cfg.cross_attention_dim, generator=generator)
    return sample, timestep, hidden


def xl_time_ids_count(unet, text_embeds_dim: int) -> int:
    """How many time ids an SDXL UNet takes: 6 (sizes and crop) for the base, 5 (crop and aesthetic
    score) for the refiner, from its added-embedding width less the pooled text embeddings'."""
    return (unet.config.projection_class_embeddings_input_dim - text_embeds_dim) // unet.config.addition_time_embed_dim


def _unet_xl_sample(model, batch, height, width, modules):
    generator = torch.Generator().manual_seed(batch + 1)
    text_dim = modules["text_encoder_2"].config.projection_dim
    text_embeds = torch.randn(batch, text_dim, generator=generator)
    sizes = torch.tensor([512.0, 768.0, 16.0, 8.0, 1024.0, 640.0])[: xl_time_ids_count(model, text_dim)]
    return (*_unet_sample(model, batch, height, width, modules), text_embeds, sizes.repeat(batch, 1))


def _unet_class_labels_sample(model, batch, height, width, modules):
    generator = torch.Generator().manual_seed(batch + 2)
    labels = torch.randint(0, model.config.num_class_embeds, (batch,), generator=generator)
    return (*_unet_sample(model, batch, height, width, modules), labels)


def _unet_timestep_cond_sample(model, batch, height, width, modules):
    if any(block.startswith("K") for block in model.config.down_block_types):
        # k-diffusion blocks pad by reflection around each resampling: they take only latent sizes
        # that are multiples of 2**downsamplings, at least 2 at the deepest level (as in diffusers),
        # so the trace and the check use the next such sizes
        factor = 2 ** (len(model.config.down_block_types) - 1)
        height, width = (max(2 * factor, -(-size // factor) * factor) for size in (height, width))
    sample, timestep, hidden = _unet_sample(model, batch, height, width, modules)
    if model.config.time_embedding_type == "fourier":
        # Fourier features take k-diffusion's c_noise = log(sigma) / 4 (about -1 to 0.7), not a
        # training timestep: sin of 981 times the random frequencies would compare float32 noise
        timestep = torch.linspace(-0.9, 0.7, batch)
    generator = torch.Generator().manual_seed(batch + 3)
    condition = torch.randn(batch, model.config.time_cond_proj_dim, generator=generator)
    return sample, timestep, hidden, condition


def _vae_encoder_sample(vae, batch, height, width, modules):
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(batch)
    return (torch.rand(batch, vae.config.in_channels, height * factor, width * factor, generator=generator) * 2 - 1,)


def _vae_decoder_sample(vae, batch, height, width, modules):
    generator = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, vae.config.latent_channels, height, width, generator=generator),)


def _pixel_sample(model, batch, height, width, modules):
    """Feature-extractor output at the model's own input size (config.image_size): these graphs take
    one fixed size, the one their preprocessor makes; only the batch is dynamic."""
    size = model.config.image_size
    size_h, size_w = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(batch)
    return (torch.rand(batch, model.config.num_channels, size_h, size_w, generator=generator) * 2 - 1,)


def _safety_checker_sample(model, batch, height, width, modules):
    """`clip_input` at the vision tower's own size; `images` as Optimum feeds them, NHWC in [0, 1]."""
    vision = model.config.vision_config
    size = vision.image_size
    size_h, size_w = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(batch)
    clip_input = torch.rand(batch, vision.num_channels, size_h, size_w, generator=generator) * 2 - 1
    return clip_input, torch.rand(batch, height * 8, width * 8, 3, generator=generator)


_IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}
_LATENT_AXES = {0: "batch", 2: "latent_height", 3: "latent_width"}

TEXT_ENCODER = Part(
    "text_encoder", "text_encoder", lambda m: _TextEncoder(m, ("last_hidden_state", "pooler_output")), ["input_ids"],
    ["last_hidden_state", "pooler_output"], {"input_ids": {0: "batch"}}, _text_sample, hidden_states=True,
)
# SDXL's second text encoder (CLIPTextModelWithProjection): the pooled projection is `text_embeds`.
TEXT_ENCODER_2 = Part(
    "text_encoder_2", "text_encoder_2", lambda m: _TextEncoder(m, ("text_embeds", "last_hidden_state")), ["input_ids"],
    ["text_embeds", "last_hidden_state"], {"input_ids": {0: "batch"}}, _text_sample, hidden_states=True,
)
_UNET_AXES = {"sample": _LATENT_AXES, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "sequence"},
              "out_sample": _LATENT_AXES}
UNET = Part(
    "unet", "unet", _UNet, ["sample", "timestep", "encoder_hidden_states"], ["out_sample"], _UNET_AXES, _unet_sample,
)
UNET_XL = Part(
    "unet", "unet", _UNetXL, ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
    ["out_sample"], {**_UNET_AXES, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}}, _unet_xl_sample,
)
# The x4 upscaler: the noise level of the low-res image as class labels.
UNET_CLASS_LABELS = Part(
    "unet", "unet", _UNetClassLabels, ["sample", "timestep", "encoder_hidden_states", "class_labels"],
    ["out_sample"], {**_UNET_AXES, "class_labels": {0: "batch"}}, _unet_class_labels_sample,
)
# The latent x2 upscaler (and LCM-distilled UNets): a condition added to the time embedding.
UNET_TIMESTEP_COND = Part(
    "unet", "unet", _UNetTimestepCond, ["sample", "timestep", "encoder_hidden_states", "timestep_cond"],
    ["out_sample"], {**_UNET_AXES, "timestep_cond": {0: "batch"}}, _unet_timestep_cond_sample,
)
VAE_ENCODER = Part(
    "vae_encoder", "vae", _VaeEncoder, ["sample"], ["latent_parameters"],
    {"sample": _IMAGE_AXES, "latent_parameters": _LATENT_AXES}, _vae_encoder_sample, fp16=False,
)
VAE_DECODER = Part(
    "vae_decoder", "vae", _VaeDecoder, ["latent_sample"], ["sample"],
    {"latent_sample": _LATENT_AXES, "sample": _IMAGE_AXES}, _vae_decoder_sample, fp16=False,
)

# Run once per call, and the DPT-Hybrid backbone's batch norms do not take float16: kept in float32.
DEPTH_ESTIMATOR = Part(
    "depth_estimator", "depth_estimator", _DepthEstimator, ["pixel_values"], ["predicted_depth"],
    {"pixel_values": {0: "batch"}, "predicted_depth": {0: "batch"}}, _pixel_sample, fp16=False,
)
IMAGE_ENCODER = Part(
    "image_encoder", "image_encoder", _ImageEncoder, ["pixel_values"], ["image_embeds"],
    {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, _pixel_sample,
)

# Run once per call, and float16 would move the scores by about 1e-3, which decides flags near a
# threshold (diffusers rounds them to 3 decimals): kept in float32.
_NHWC_AXES = {0: "batch", 1: "height", 2: "width"}
SAFETY_CHECKER = Part(
    "safety_checker", "safety_checker", _SafetyChecker, ["clip_input", "images"],
    ["out_images", "has_nsfw_concepts", "special_scores", "concept_scores"],
    {"clip_input": {0: "batch"}, "images": _NHWC_AXES, "out_images": _NHWC_AXES}, _safety_checker_sample, fp16=False,
)

# Every part sd-export knows, in export order; a model exports those whose component it has.
ALL_PARTS = [TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER, DEPTH_ESTIMATOR, IMAGE_ENCODER,
             SAFETY_CHECKER]


def is_xl_unet(unet) -> bool:
    return unet.config.get("addition_embed_type") == "text_time"


def unet_part(unet) -> Part:
    """The UNet's contract, chosen from its config: the extra inputs a model family adds (SDXL's
    `text_embeds` and `time_ids`, ...) are inputs of the graph. A new family adds its case here."""
    if is_xl_unet(unet):
        return UNET_XL
    if unet.config.get("num_class_embeds") is not None:
        return UNET_CLASS_LABELS
    if unet.config.get("time_cond_proj_dim") is not None:
        return UNET_TIMESTEP_COND
    return UNET


def parts_for(modules) -> list[Part]:
    """The parts to export for a model's torch components (a name -> module mapping), the UNet with
    the contract its config calls for."""
    parts = [part for part in ALL_PARTS if part.component in modules]
    return [unet_part(modules["unet"]) if part is UNET else part for part in parts]
