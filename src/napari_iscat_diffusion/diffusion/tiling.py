"""Tiled denoising for large masks, in the style of MultiDiffusion (Bar-Tal et al. 2023).

A 2048x2048 mask does not fit a U-Net forward pass in bounded memory (activations grow with the
pixel count, and self-attention at the lowest resolution costs O(tokens^2) time), and the network
was trained on small crops anyway. ``tiled_denoiser`` therefore runs the network on overlapping
tiles inside *every denoiser call* and blends the tiles' predictions with smooth weights that sum
to one at every pixel. The sampler state (the noisy image, the noise drawn per image, the
multistep history) stays global, so tiles cannot drift apart and no seams appear; the network's
memory is that of one tile's forward pass, whatever the image size.

The weights are separable: along each axis a tile ramps up with a sin^2 profile over the pixels it
shares with its previous neighbour and down over those it shares with the next, and the ramps are
divided by their sum over all tiles. The 2-D weight of a tile is the outer product of its two
axis weights, so the 2-D weights sum to one as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from .denoiser import ConditionalDenoiser
from .unet import UNetConfig


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` that cover ``range(size)``.

    Neighbouring tiles share at least ``overlap`` pixels; the tiles are spread evenly, and every
    start but the last (which is ``size - tile``) is a multiple of ``align``. A size that fits one tile gives ``[0]``.
    """
    if tile < 1 or align < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1, align >= 1 and 0 <= overlap < tile; got {tile=}, {overlap=}, {align=}")
    if size <= tile:
        return [0]
    span = size - tile
    count = math.ceil(span / (tile - overlap)) + 1
    while True:
        # Even spacing rounded down to multiples of align; rounding can shrink an overlap: add tiles till none is short.
        starts = [(i * span // (count - 1)) // align * align for i in range(count - 1)] + [span]
        if all(start + tile - following >= overlap for start, following in pairwise(starts)):
            return starts
        count += 1


def axis_weights(size: int, starts: list[int], tile: int) -> list[torch.Tensor]:
    """One float64 weight vector of length ``min(tile, size)`` per tile; at every pixel the weights sum to one.

    A tile's raw weight ramps from near 0 to 1 (sin^2, never exactly 0) over the pixels it shares with
    its previous neighbour and back down over those it shares with the next; the raw weights are
    then divided by their sum over the tiles that cover each pixel.
    """
    length = min(tile, size)
    raw = []
    for i, start in enumerate(starts):
        shared_before = starts[i - 1] + length - start if i > 0 else 0
        shared_after = start + length - starts[i + 1] if i < len(starts) - 1 else 0
        ramp_up = torch.cat([_ramp(shared_before), torch.ones(length - shared_before, dtype=torch.float64)])
        ramp_down = torch.cat([torch.ones(length - shared_after, dtype=torch.float64), _ramp(shared_after).flip(0)])
        raw.append(torch.minimum(ramp_up, ramp_down))
    total = torch.zeros(size, dtype=torch.float64)
    for start, weight in zip(starts, raw, strict=True):
        total[start : start + length] += weight
    return [weight / total[start : start + length] for start, weight in zip(starts, raw, strict=True)]


def _ramp(length: int) -> torch.Tensor:
    """sin^2 rising from near 0 to near 1 over ``length`` pixels, sampled at pixel centres."""
    return torch.sin((torch.arange(length, dtype=torch.float64) + 0.5) * (math.pi / (2 * max(length, 1)))) ** 2


@dataclass(frozen=True)
class Tile:
    """One tile: its rows and columns in the image and its blending weight (tile_h, tile_w), already normalised."""

    rows: slice
    cols: slice
    weight: torch.Tensor


def plan_tiles(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[Tile]:
    """The tiles covering an image of ``height`` x ``width`` pixels, with weights that sum to one at every pixel."""
    tiles = []
    row_starts = tile_starts(height, tile, overlap, align)
    col_starts = tile_starts(width, tile, overlap, align)
    row_weights = axis_weights(height, row_starts, tile)
    col_weights = axis_weights(width, col_starts, tile)
    tile_h, tile_w = min(tile, height), min(tile, width)
    for row, row_weight in zip(row_starts, row_weights, strict=True):
        for col, col_weight in zip(col_starts, col_weights, strict=True):
            weight = (row_weight[:, None] * col_weight[None, :]).float()
            tiles.append(Tile(slice(row, row + tile_h), slice(col, col + tile_w), weight))
    return tiles


# Measured with the default model on the CPU (docs/performance.md): a tile whose highest-resolution
# attention level holds 64x64 tokens costs about as much per pixel as the convolutions; 128x128 tokens
# cost 2.5x more per pixel, since attention grows with the square of the token count.
MAX_ATTENTION_SIDE = 64
# Without attention the cost per pixel is flat; this only bounds memory (~1 GB per image in the batch
# for the default model in fp32).
MAX_TILE = 512


def auto_tile_size(unet: UNetConfig) -> int:
    """The default tile side for a network: 64 attention tokens per side at its finest attention level, at most 512."""
    if not unet.attention_levels:
        return MAX_TILE
    return min(MAX_TILE, MAX_ATTENTION_SIDE * 2 ** min(unet.attention_levels))


def check_tiling(tile_size: int | None, overlap: int) -> None:
    """Raise ValueError unless ``tile_size`` is None or an int >= 0 and ``overlap`` an int in [0, tile_size / 2]."""
    if tile_size is None or tile_size == 0:
        return
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 0:
        raise ValueError(f"tile_size must be a positive integer, or None or 0 for no tiling; got {tile_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= tile_size // 2:
        raise ValueError(f"tile_overlap must be an integer in [0, tile_size / 2 = {tile_size // 2}]; got {overlap!r}")


def needs_tiling(height: int, width: int, tile_size: int | None) -> bool:
    """Whether an image of this size is denoised in tiles; ``tile_size`` None or 0 switches tiling off."""
    return bool(tile_size) and max(height, width) > tile_size


def tiled_denoiser(cond_denoise: ConditionalDenoiser, tile: int, overlap: int, align: int = 1) -> ConditionalDenoiser:
    """Wrap ``cond_denoise(x, sigma, cond) -> x0_hat`` so that it runs on overlapping tiles and blends them.

    Args:
        cond_denoise: the conditional denoiser, for example a ``DiscreteTimeDenoiser``.
        tile: tile side in pixels; an image that fits one tile is passed through unchanged.
        overlap: pixels shared by neighbouring tiles, over which their predictions are cross-faded.
        align: tile starts are rounded to multiples of this (the U-Net's total downsampling factor),
            so that every tile sees the same pooling grid as the whole image.

    Returns:
        A conditional denoiser with the same interface; its memory use is that of one tile.
    """
    check_tiling(tile, overlap)
    plans: dict[tuple[int, int, torch.device], list[Tile]] = {}

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if not needs_tiling(height, width, tile):
            return cond_denoise(x, sigma, cond)
        key = (height, width, x.device)
        if key not in plans:
            plans[key] = [
                Tile(t.rows, t.cols, t.weight.to(x.device)) for t in plan_tiles(height, width, tile, overlap, align)
            ]
        out = None
        for t in plans[key]:
            prediction = cond_denoise(x[..., t.rows, t.cols], sigma, cond[..., t.rows, t.cols])
            if out is None:
                out = torch.zeros(x.shape, dtype=prediction.dtype, device=x.device)
            out[..., t.rows, t.cols] += prediction * t.weight.to(prediction.dtype)
        return out

    return denoise
