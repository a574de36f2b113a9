"""The guidance-scale embedding of consistency-distilled UNets (LCM): the UNet's `timestep_cond`.

A UNet distilled with guidance (its config sets `time_cond_proj_dim`, e.g. LCM-Dreamshaper) learnt
classifier-free guidance at scale w as an input: a sinusoidal embedding of w, projected and added to
its time embedding. diffusers' `StableDiffusionPipeline` and `LatentConsistencyModelPipeline` give
it w = guidance_scale - 1 (the Imagen formulation of guidance the pipelines use, where the LCM
paper's w is one less) and then run no classifier-free batch.
"""

from __future__ import annotations

import numpy as np


def guidance_scale_embedding(w, embedding_dim: int = 512) -> np.ndarray:
    """[len(w), embedding_dim] float32: sin then cos of 1000 w times geometric frequencies from 1 to
    1/10000 (zero-padded to an odd width), as diffusers' `get_guidance_scale_embedding` (VDM's), in
    the same float32 operations in the same order."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 1:
        raise ValueError(f"w: a 1-D array of guidance scales is needed; got shape {w.shape}")
    w = w * np.float32(1000.0)
    half = embedding_dim // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)
    # exp in float64 rounded to float32: the correctly rounded value, which torch's float32 exp gives
    # (numpy's own float32 exp is 1 ulp off for 6 of 16 frequencies, and at 1000 w ~ 7500 one ulp of
    # a frequency moves the angle by ~1e-3 rad)
    frequencies = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)
    angles = w[:, None] * frequencies[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32, copy=False)


def time_cond_proj_dim(unet) -> int | None:
    """The UNet's guidance-embedding width: its config's `time_cond_proj_dim`, else (an export without
    that config entry) the width of the graph's `timestep_cond` input; None for a UNet without one."""
    dim = unet.config.get("time_cond_proj_dim")
    if dim is None and "timestep_cond" in unet.inputs:
        width = unet.inputs["timestep_cond"].shape[-1]
        dim = width if isinstance(width, (int, np.integer)) else None
    if dim is not None and "timestep_cond" not in unet.inputs:
        raise ValueError("'unet': its config sets time_cond_proj_dim (an LCM UNet) but the ONNX graph has no "
                         "'timestep_cond' input; export the model again with sd-export")
    return None if dim is None else int(dim)


def guidance_inputs(unet, guidance_scale: float, batch: int) -> dict:
    """{"timestep_cond": embedding of guidance_scale - 1 for each of `batch` images} for a UNet
    distilled with guidance, {} for any other: the UNet inputs diffusers adds for it."""
    dim = time_cond_proj_dim(unet)
    if dim is None:
        return {}
    w = np.full((batch,), np.float32(guidance_scale - 1), dtype=np.float32)
    return {"timestep_cond": guidance_scale_embedding(w, embedding_dim=dim)}
