"""Writes a diffusers model as an original-format single-file checkpoint (CompVis / Stability / A1111
key names), for the single-file export tests.

This is the inverse of diffusers' `loaders/single_file_utils.py` conversions, written out from the
original repositories' module layout:

- UNet (`model.diffusion_model.`): `input_blocks.N` are conv_in (N=0), then per down block its
  resnets (`.0`) with their attentions (`.1`) and a downsampler (`.0.op`); `middle_block.0/1/2` are
  resnet, attention, resnet; `output_blocks.N` are the up blocks' resnets (`.0`), attentions (`.1`)
  and the upsampler (`.1.conv` without attention, `.2.conv` with); resnets name their layers
  `in_layers.0/2`, `out_layers.0/3`, `emb_layers.1`, `skip_connection`.
- VAE (`first_stage_model.`): `encoder.down.I.block.J`, `decoder.up.I.block.J` with the up blocks in
  reverse order, `mid.block_1/2`, `mid.attn_1` (q, k, v, proj_out as 1x1 convolutions), `norm_out`,
  `nin_shortcut`.
- SD 1.x text encoder: transformers' CLIPTextModel under `cond_stage_model.transformer.text_model.`.
- SD 2.x text encoder: OpenCLIP under `cond_stage_model.model.` (`token_embedding`, `positional_embedding`,
  `transformer.resblocks.I` with the attention's q, k and v stacked in `in_proj_weight`, `ln_final`,
  `text_projection` as [width, projection]).
- SDXL: `conditioner.embedders.0.transformer.` (CLIP ViT-L, as SD 1.x) and `conditioner.embedders.1.model.`
  (OpenCLIP bigG); the refiner has only the OpenCLIP one, as `conditioner.embedders.0.model.`.
"""

from __future__ import annotations

from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _resnet_key(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESNET[layer]}.{tail}"


def unet_to_original(unet) -> dict:
    """A UNet2DConditionModel's weights under the original UNetModel's names."""
    per_block = unet.config.layers_per_block  # an int in the configs the tests build
    out = {}
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        module, leaf = ".".join(parts[:-1]), parts[-1]
        if module in top:
            name = f"{top[module]}.{leaf}"
        elif parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":  # the block's last input block: a strided conv
                name = f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{parts[-1]}"
            else:
                index = 1 + block * (per_block + 1) + int(parts[3])
                name = (f"input_blocks.{index}.0.{_resnet_key(rest)}" if kind == "resnets"
                        else f"input_blocks.{index}.1.{rest}")
        elif parts[0] == "mid_block":
            kind, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            name = (f"middle_block.{2 * layer}.{_resnet_key(rest)}" if kind == "resnets"
                    else f"middle_block.1.{rest}")
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "upsamplers":  # after the block's last resnet (and its attention, if any)
                index = block * (per_block + 1) + per_block
                slot = 2 if hasattr(unet.up_blocks[block], "attentions") else 1
                name = f"output_blocks.{index}.{slot}.conv.{parts[-1]}"
            else:
                index = block * (per_block + 1) + int(parts[3])
                name = (f"output_blocks.{index}.0.{_resnet_key(rest)}" if kind == "resnets"
                        else f"output_blocks.{index}.1.{rest}")
        else:
            raise KeyError(f"no original name for UNet parameter {key}")
        out[UNET_PREFIX + name] = value
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(vae) -> dict:
    """An AutoencoderKL's weights under the original (taming) autoencoder's names; the mid-block
    attention's projections as 1x1 convolutions, as the original stores them."""
    blocks = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        side, _, rest = key.partition(".")  # encoder | decoder | quant_conv | post_quant_conv
        if side not in ("encoder", "decoder"):
            out[VAE_PREFIX + key] = value
            continue
        parts = rest.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            index = int(parts[1]) if side == "encoder" else blocks - 1 - int(parts[1])
            group = "down" if side == "encoder" else "up"
            if parts[2] == "resnets":
                layer = parts[4].replace("conv_shortcut", "nin_shortcut")
                name = f"{group}.{index}.block.{parts[3]}.{layer}.{parts[5]}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                name = f"{group}.{index}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            layer = parts[3].replace("conv_shortcut", "nin_shortcut")
            name = f"mid.block_{int(parts[2]) + 1}.{layer}.{parts[4]}"
        elif parts[0] == "mid_block":  # attentions.0.<layer>.<leaf>
            layer = ".".join(parts[3:-1])
            name = f"mid.attn_1.{_VAE_ATTENTION[layer]}.{parts[-1]}"
            if layer != "group_norm" and parts[-1] == "weight":
                value = value[:, :, None, None]
        elif parts[0] == "conv_norm_out":
            name = f"norm_out.{parts[1]}"
        else:  # conv_in, conv_out
            name = rest
        out[f"{VAE_PREFIX}{side}.{name}"] = value
    return out


def _clip_keys(text_encoder) -> dict:
    """CLIP text weights without the `text_model.` wrapper (transformers 5 flattened CLIPTextModel)."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def clip_to_original(text_encoder, prefix: str) -> dict:
    """transformers' CLIPTextModel as the original checkpoints hold it (a wrapped HF model)."""
    return {f"{prefix}text_model.{k}": v for k, v in _clip_keys(text_encoder).items() if k != "embeddings.position_ids"}


def open_clip_to_original(text_encoder, prefix: str) -> dict:
    """A CLIPTextModel(WithProjection) as OpenCLIP's text tower: q, k, v stacked, the projection as
    [width, projection] (OpenCLIP multiplies x @ text_projection). SD 2.x has no projection in
    diffusers; its file still holds one, which diffusers ignores, so a [width, width] identity stands in."""
    import torch

    weights = _clip_keys(text_encoder)
    out = {
        prefix + "token_embedding.weight": weights["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": weights["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": weights["final_layer_norm.weight"],
        prefix + "ln_final.bias": weights["final_layer_norm.bias"],
    }
    if "text_projection.weight" in weights:
        out[prefix + "text_projection"] = weights["text_projection.weight"].T.contiguous()
    else:
        width = text_encoder.config.hidden_size
        out[prefix + "text_projection"] = torch.eye(width)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for layer in range(text_encoder.config.num_hidden_layers):
        source = f"encoder.layers.{layer}."
        target = f"{prefix}transformer.resblocks.{layer}."
        for leaf in ("weight", "bias"):
            out[f"{target}attn.in_proj_{leaf}"] = torch.cat(
                [weights[f"{source}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in names.items():
                out[f"{target}{theirs}.{leaf}"] = weights[f"{source}{ours}.{leaf}"]
    return out


def to_original(components: dict, open_clip: bool = False) -> dict:
    """A diffusers pipeline's components (SD 1.x; SD 2.x when `open_clip`, its text encoder as
    OpenCLIP; SDXL base or refiner) as one original-format state dict."""
    state = {**unet_to_original(components["unet"]), **vae_to_original(components["vae"])}
    text_encoder, text_encoder_2 = components.get("text_encoder"), components.get("text_encoder_2")
    if text_encoder_2 is not None:  # SDXL
        if text_encoder is not None:
            state.update(clip_to_original(text_encoder, "conditioner.embedders.0.transformer."))
            state.update(open_clip_to_original(text_encoder_2, "conditioner.embedders.1.model."))
        else:  # the refiner
            state.update(open_clip_to_original(text_encoder_2, "conditioner.embedders.0.model."))
    elif open_clip:  # SD 2.x
        state.update(open_clip_to_original(text_encoder, "cond_stage_model.model."))
    else:
        state.update(clip_to_original(text_encoder, "cond_stage_model.transformer."))
    return state


def write_single_file(components: dict, path: Path, open_clip: bool = False) -> Path:
    """Save `to_original(components)` as safetensors, or as a torch pickle (`{"state_dict": ...}`, as
    CompVis' .ckpt files are) when `path` does not end in .safetensors."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in to_original(components, open_clip).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path
