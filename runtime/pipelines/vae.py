"""The VAE calls of every pipeline, with diffusers' tiling and slicing, on the exported VAE parts.

diffusers' `AutoencoderKL.enable_tiling()` splits a large input into overlapping tiles, runs the
encoder or decoder on each, and blends the overlaps linearly (`blend_v`, `blend_h`); its
`enable_slicing()` runs a batch one item at a time. sdort's `vae_encoder` part is diffusers'
`encoder` + `quant_conv` and its `vae_decoder` part `post_quant_conv` + `decoder`: exactly what
diffusers applies to each tile, so the same tiles go through the same graphs and are blended with
the same float32 arithmetic, and the results match diffusers' with tiling on.

Tile sizes come from the VAE config as in diffusers: `tile_sample_min_size` is its `sample_size`,
`tile_latent_min_size` that divided by 2 ** (len(block_out_channels) - 1), `tile_overlap_factor`
0.25. A tiled pass only happens where diffusers' does: the latents larger than a latent tile on
either axis (decoding), the image wider or taller than a sample tile (encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class VaeTiling:
    """diffusers' tiling attributes of `AutoencoderKL` (which users may change, as there)."""

    tile_sample_min_size: int
    tile_latent_min_size: int
    tile_overlap_factor: float = 0.25

    @classmethod
    def from_config(cls, config: dict) -> "VaeTiling":
        """The sizes diffusers' AutoencoderKL derives from its config (defaults: its own, 32 and (64,))."""
        sample_size = config.get("sample_size", 32)
        if isinstance(sample_size, (list, tuple)):
            # diffusers keeps the list as the sample tile size (and then fails comparing it with a
            # width); sdort uses its first entry for both, as diffusers does for the latent tile
            sample_size = sample_size[0]
        factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
        return cls(int(sample_size), int(sample_size / factor))


def blend(a: np.ndarray, b: np.ndarray, blend_extent: int, axis: int) -> np.ndarray:
    """Blend the last rows (axis 2) or columns (axis 3) of `a` into the first ones of `b`, in place in
    `b` (diffusers' `blend_v` and `blend_h`)."""
    blend_extent = min(a.shape[axis], b.shape[axis], blend_extent)
    lead = (slice(None),) * axis
    for k in range(blend_extent):
        # the weights are Python floats, rounded to float32 as torch does for a float32 tensor
        b[lead + (k,)] = (a[lead + (k - blend_extent,)] * np.float32(1 - k / blend_extent)
                          + b[lead + (k,)] * np.float32(k / blend_extent))
    return b


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, in_tile: int, out_tile: int,
          overlap_factor: float) -> np.ndarray:
    """`run` over overlapping tiles of `x`, blended and cropped as diffusers' `tiled_decode` (input
    tiles of latents, output tiles of pixels) and `_tiled_encode` (the other way round) do.

    Tiles start every in_tile * (1 - overlap) input positions; each output tile is blended with the
    one above and the one to its left (already blended: diffusers blends in place, in this order)
    over out_tile * overlap positions, then cropped to out_tile - that.
    """
    stride = int(in_tile * (1 - overlap_factor))
    blend_extent = int(out_tile * overlap_factor)
    row_limit = out_tile - blend_extent
    rows = [[np.array(run(np.ascontiguousarray(x[:, :, i:i + in_tile, j:j + in_tile])), dtype=np.float32)
             for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend(rows[i - 1][j], tile, blend_extent, axis=2)
            if j > 0:
                tile = blend(row[j - 1], tile, blend_extent, axis=3)
            result_row.append(tile[:, :, :row_limit, :row_limit])
        result_rows.append(np.concatenate(result_row, axis=3))
    return np.concatenate(result_rows, axis=2)


class VaeSwitches:
    """`pipe.vae`: the tiling and slicing switches where diffusers now has them, on the VAE
    (`pipe.vae.enable_tiling()`), so that code written for diffusers runs unchanged."""

    def __init__(self, pipe):
        self._pipe = pipe

    @property
    def config(self) -> dict:
        return self._pipe.vae_decoder.config

    def enable_tiling(self) -> None:
        self._pipe.enable_vae_tiling()

    def disable_tiling(self) -> None:
        self._pipe.disable_vae_tiling()

    def enable_slicing(self) -> None:
        self._pipe.enable_vae_slicing()

    def disable_slicing(self) -> None:
        self._pipe.disable_vae_slicing()


class VaeCalls:
    """The VAE calls of a pipeline (`vae_encode`, `vae_decode`) and diffusers' switches for them:
    `enable_vae_tiling()`, `enable_vae_slicing()` and their `disable_` twins.

    The switches belong to the pipeline (diffusers keeps them on the shared `vae` module, so a
    pipeline built from another's components inherits them; sdort's pipelines start untiled).
    `vae_tiling` holds the tile sizes while tiling is on; they may be changed there.
    """

    vae_tiling: VaeTiling | None = None
    vae_slicing: bool = False

    @property
    def vae(self) -> VaeSwitches:
        return VaeSwitches(self)

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large inputs in overlapping tiles, as diffusers' `enable_vae_tiling()`:
        memory stays that of one tile whatever the image size; the result is diffusers' tiled one
        (not the untiled image: each tile sees only its neighbourhood)."""
        self.vae_tiling = VaeTiling.from_config(self.vae_decoder.config)

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one image at a time, as diffusers' `enable_vae_slicing()`."""
        self.vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self.vae_slicing = False

    def vae_decode(self, latent_sample: np.ndarray) -> np.ndarray:
        """The VAE decoder's image for latents already divided by scaling_factor (diffusers'
        `vae.decode(...).sample`), sliced and tiled where enabled."""
        return self._vae_call(self.vae_decoder, "latent_sample", "sample", latent_sample, decoding=True)

    def vae_encode(self, sample: np.ndarray) -> np.ndarray:
        """The VAE encoder's first output for images in [-1, 1]: the Gaussian's parameters (mean and
        logvar) of diffusers' `vae.encode(...).latent_dist`, sliced and tiled where enabled.

        A tiled pass blends the parameters, as diffusers does; an old Optimum export whose graph
        samples the latents itself (`latent_sample`) gets its samples blended instead."""
        return self._vae_call(self.vae_encoder, "sample", "latent_parameters", sample, decoding=False)

    def _vae_call(self, part, input_name: str, output_name: str, batch: np.ndarray, decoding: bool) -> np.ndarray:
        """`part` on `batch` (its `output_name`, else its first output), one item at a time with
        slicing, in tiles where tiling is on and the input is larger than one tile (diffusers' test:
        latents larger than a latent tile when decoding, images larger than a sample tile when encoding)."""
        def run(x):
            outputs = part(**{input_name: x})
            return outputs.get(output_name, next(iter(outputs.values()))).astype(np.float32, copy=False)

        def one(x):
            tiling = self.vae_tiling
            sizes = ((tiling.tile_latent_min_size, tiling.tile_sample_min_size) if decoding else
                     (tiling.tile_sample_min_size, tiling.tile_latent_min_size)) if tiling is not None else None
            if sizes is not None and max(x.shape[-2:]) > sizes[0]:
                return tiled(run, x, *sizes, tiling.tile_overlap_factor)
            return run(x)

        if self.vae_slicing and batch.shape[0] > 1:
            return np.concatenate([one(batch[i:i + 1]) for i in range(batch.shape[0])])
        return one(batch)
