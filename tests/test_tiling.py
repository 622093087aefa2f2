"""Tiled denoising: tile plans, blending weights, equality for small images, no seams, bounded forward size."""

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.tiny_models import tiny_unet_config

from napari_iscat_diffusion.diffusion import (
    ConditionalUNet,
    ModelConfig,
    SamplingCancelled,
    generate,
    load_checkpoint,
    save_checkpoint,
)
from napari_iscat_diffusion.diffusion.conditioning import encode_condition
from napari_iscat_diffusion.diffusion.denoiser import DiscreteTimeDenoiser
from napari_iscat_diffusion.diffusion.schedules import linear_schedule
from napari_iscat_diffusion.diffusion.tiling import auto_tile_size, plan_tiles, tile_starts, tiled_denoiser


def _perturbed_net(**overrides) -> ConditionalUNet:
    torch.manual_seed(0)
    net = ConditionalUNet(tiny_unet_config(**overrides))
    with torch.no_grad():  # away from the zero-initialised output, so that the output depends on the input
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def denoiser() -> DiscreteTimeDenoiser:
    return DiscreteTimeDenoiser(_perturbed_net(), linear_schedule(1000), "v")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    unet = tiny_unet_config()
    config = ModelConfig(
        unet=unet,
        schedule=linear_schedule(1000).to_config(),
        parameterization="v",
        normalization={"mean": [0.0], "std": [1.0]},
    )
    path = tmp_path_factory.mktemp("tiling") / "tiny.safetensors"
    save_checkpoint(path, _perturbed_net(), config)
    return load_checkpoint(path)


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "align"),
    [(100, 32, 8, 1), (100, 32, 8, 4), (450, 256, 64, 4), (2048, 256, 64, 4), (257, 256, 64, 4), (96, 32, 0, 1)],
)
def test_tiles_cover_the_image_with_the_requested_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all() and starts[0] == 0 and starts[-1] == size - tile
    assert all(b - a <= tile - overlap for a, b in pairwise(starts))
    assert all(start % align == 0 for start in starts[:-1])


def test_a_size_that_fits_one_tile_gives_one_tile():
    assert tile_starts(200, 256, 64, 4) == [0]
    assert len(plan_tiles(200, 256, 256, 64, 4)) == 1


@pytest.mark.parametrize(("height", "width"), [(450, 300), (192, 192), (2048, 700)])
def test_weights_are_smooth_positive_and_sum_to_one(height, width):
    total = torch.zeros(height, width)
    for t in plan_tiles(height, width, 256 if height > 200 else 64, 64 if height > 200 else 16, 4):
        assert (t.weight > 0).all()
        # a sin^2 ramp over >= 16 pixels changes by less than pi/32 per pixel: no step in any tile's weight
        assert (t.weight.diff(dim=0).abs().max() < 0.11) and (t.weight.diff(dim=1).abs().max() < 0.11)
        total[t.rows, t.cols] += t.weight
    torch.testing.assert_close(total, torch.ones(height, width), atol=1e-6, rtol=0)


def _inputs(size: int, seed: int = 0):
    """A smooth noisy image and an empty mask: the untiled prediction is smooth, so that a seam would stand out."""
    generator = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(1, 1, 8, 8, generator=generator), size=(size, size), mode="bicubic")
    cond = encode_condition(torch.zeros(1, size, size, dtype=torch.long), 2)
    return x, torch.tensor([0.5]), cond


def test_image_smaller_than_a_tile_is_not_tiled(denoiser):
    x, sigma, cond = _inputs(48)
    with torch.inference_mode():
        assert torch.equal(tiled_denoiser(denoiser, 64, 16, 2)(x, sigma, cond), denoiser(x, sigma, cond))


def _seam_ratio(image: torch.Tensor, borders: list[int]) -> float:
    """Mean squared difference between neighbouring pixels across the given rows/columns, over its median everywhere."""
    across_cols = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean(dim=(0, 1, 2))
    across_rows = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean(dim=(0, 1, 3))
    at_borders = [b - 1 for b in borders]  # index b - 1 holds the step from pixel b - 1 to pixel b
    everywhere = torch.cat([across_cols, across_rows])
    return float(torch.cat([across_cols[at_borders], across_rows[at_borders]]).mean() / everywhere.median())


def _tile_borders(size: int, tile: int, overlap: int, align: int) -> list[int]:
    starts = tile_starts(size, tile, overlap, align)
    return sorted({edge for start in starts for edge in (start, start + tile) if 0 < edge < size})


def test_blended_tiles_leave_no_seam_where_naive_tiles_do(denoiser):
    size, tile = 192, 64
    x, sigma, cond = _inputs(size)
    with torch.inference_mode():
        whole = denoiser(x, sigma, cond)
        blended = tiled_denoiser(denoiser, tile, 16, 2)(x, sigma, cond)
        naive = tiled_denoiser(denoiser, tile, 0, 1)(x, sigma, cond)
    assert _seam_ratio(whole, _tile_borders(size, tile, 16, 2)) < 1.5
    # The check can fail: abutting tiles without blending leave a visible step at their borders.
    assert _seam_ratio(naive, _tile_borders(size, tile, 0, 1)) > 3.0
    assert _seam_ratio(blended, _tile_borders(size, tile, 16, 2)) < 1.5
    # Close to the whole-image prediction; GroupNorm statistics and attention of this random network
    # are per tile, which is what the remaining difference is.
    relative = float((blended - whole).norm() / whole.norm())
    assert relative < 0.25
    assert relative < float((naive - whole).norm() / whole.norm())


def test_forward_passes_never_exceed_one_tile(model):
    shapes = []
    handle = model.net.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        image = generate(np.zeros((150, 100), np.uint8), model, steps=2, guidance=2.0, tile_size=64, tile_overlap=16)
    finally:
        handle.remove()
    assert image.shape == (150, 100) and np.isfinite(image).all()
    assert shapes and max(max(shape) for shape in shapes) == 64
    rows, cols = len(tile_starts(150, 64, 16, 2)), len(tile_starts(100, 64, 16, 2))
    assert len(shapes) == 2 * rows * cols


def test_same_seed_same_image_whatever_the_tile_size_when_it_fits(model):
    mask = np.zeros((48, 40), np.uint8)
    mask[10:14, 20:24] = 1
    reference = generate(mask, model, steps=3, seed=3, tile_size=None)
    for tile_size in (0, 48, 64, 256, "auto"):
        np.testing.assert_array_equal(generate(mask, model, steps=3, seed=3, tile_size=tile_size), reference)


def test_tiled_generation_stays_close_to_untiled(model):
    mask = np.zeros((96, 96), np.uint8)
    mask[40:44, 50:54] = 2
    whole = generate(mask, model, steps=2, seed=1, tile_size=None)
    tiled = generate(mask, model, steps=2, seed=1, tile_size=64, tile_overlap=16)
    assert not np.array_equal(tiled, whole)
    assert np.linalg.norm(tiled - whole) / np.linalg.norm(whole) < 0.25


def _generate_six_tiles(model, **options):
    """Three steps on an empty 150 x 100 mask in 64 px tiles with 16 px overlap (six tiles per denoiser call)."""
    return generate(np.zeros((150, 100), np.uint8), model, steps=3, tile_size=64, tile_overlap=16, **options)


def test_should_stop_cancels_between_tiles_of_the_first_step(model):
    calls = []
    handle = model.net.register_forward_pre_hook(lambda _m, _args: calls.append(1))
    try:
        with pytest.raises(SamplingCancelled) as raised:
            _generate_six_tiles(model, guidance=2.0, should_stop=lambda: len(calls) >= 1)
    finally:
        handle.remove()
    tiles = len(tile_starts(150, 64, 16, 2)) * len(tile_starts(100, 64, 16, 2))
    assert tiles >= 6
    assert len(calls) == 1  # one tile's forward, not the step's six
    assert raised.value.step == -1  # inside the first step


def test_should_stop_reports_the_last_finished_step(model):
    steps_done = []
    with pytest.raises(SamplingCancelled) as raised:
        _generate_six_tiles(
            model,
            callback=lambda progress: steps_done.append(progress.step),
            should_stop=lambda: len(steps_done) == 2,
        )
    assert steps_done == [0, 1] and raised.value.step == 1


def test_should_stop_that_never_stops_leaves_the_image_unchanged(model):
    mask = np.zeros((150, 100), np.uint8)
    mask[60:64, 40:44] = 1
    options = {"steps": 2, "seed": 5, "guidance": 2.0, "tile_size": 64, "tile_overlap": 16}
    polls = []
    image = generate(mask, model, should_stop=lambda: polls.append(1) is not None, **options)
    np.testing.assert_array_equal(image, generate(mask, model, **options))
    assert len(polls) == 2 * len(tile_starts(150, 64, 16, 2)) * len(tile_starts(100, 64, 16, 2))


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"tile_size": -1}, "tile_size"),
        ({"tile_size": 64, "tile_overlap": 40}, "tile_overlap"),
        ({"tile_size": 1.5}, "tile_size"),
        ({"tile_size": "big"}, "tile_size"),
    ],
)
def test_bad_tiling_arguments_are_rejected(model, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        generate(np.zeros((8, 8), np.uint8), model, **kwargs)


def test_auto_tile_size_keeps_attention_at_64_tokens_per_side():
    assert auto_tile_size(tiny_unet_config(channel_mults=(1, 2, 2), attention_levels=(2,))) == 256
    assert auto_tile_size(tiny_unet_config(attention_levels=(1,))) == 128
    assert auto_tile_size(tiny_unet_config(channel_mults=(1, 2, 2, 2, 2), attention_levels=(4,))) == 512
    assert auto_tile_size(tiny_unet_config(attention_levels=())) == 512
