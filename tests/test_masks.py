"""Random particle masks: blob drawing, dart throwing, size classes."""

import math
import time

import numpy as np
import pytest

from napari_iscat_diffusion.iscat.masks import (
    RandomMask,
    classify_by_size,
    draw_blobs,
    random_mask,
    random_positions,
)


def _pairwise_min_distance(positions: np.ndarray) -> float:
    diff = positions[:, None, :] - positions[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return float(dist.min())


# --- draw_blobs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("centre", [(20.0, 30.0), (20.3, 29.6), (19.5001, 30.4999)])
def test_blob_is_centred_where_placed(centre):
    mask = draw_blobs((64, 64), np.array([centre]), np.array([3]), radius=5.0)
    assert mask.dtype == np.uint8
    assert mask[round(centre[0]), round(centre[1])] == 3
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - centre[0]) < 0.3
    assert abs(xs.mean() - centre[1]) < 0.3
    assert set(np.unique(mask)) == {0, 3}


@pytest.mark.parametrize("radius", [3.0, 6.5, 12.0])
def test_blob_area_is_close_to_disc_area(radius):
    mask = draw_blobs((64, 64), np.array([[31.2, 32.7]]), np.array([1]), radius=radius)
    area = np.count_nonzero(mask)
    # Pixel counting of a disc deviates from pi r^2 by about its perimeter at most.
    assert abs(area - math.pi * radius**2) <= 2 * math.pi * radius


def test_pixel_on_the_radius_is_inside():
    mask = draw_blobs((11, 11), np.array([[5.0, 5.0]]), np.array([1]), radius=2.0)
    assert mask[5, 7] == 1 and mask[3, 5] == 1
    assert mask[5, 8] == 0 and mask[7, 7] == 0


def test_overlaps_go_to_nearest_centre_and_ties_to_lower_index():
    positions = np.array([[10.0, 10.0], [10.0, 14.0]])
    mask = draw_blobs((21, 25), positions, np.array([1, 2]), radius=5.0)
    # Columns 11 and 13 are nearer to particles 1 and 2; column 12 is equidistant, so particle index 0 wins.
    assert mask[10, 11] == 1
    assert mask[10, 13] == 2
    assert mask[10, 12] == 1
    swapped = draw_blobs((21, 25), positions[::-1], np.array([2, 1]), radius=5.0)
    assert swapped[10, 12] == 2  # the tie follows the index, not the label
    np.testing.assert_array_equal(mask[:, :12], swapped[:, :12])
    np.testing.assert_array_equal(mask[:, 13:], swapped[:, 13:])


def test_overlap_resolution_matches_brute_force_nearest_centre():
    rng = np.random.default_rng(0)
    positions = rng.random((40, 2)) * [30, 40]
    labels = rng.integers(1, 5, 40)
    radius = 4.5
    mask = draw_blobs((30, 40), positions, labels, radius)
    yy, xx = np.mgrid[:30, :40]
    d2 = (yy[..., None] - positions[:, 0]) ** 2 + (xx[..., None] - positions[:, 1]) ** 2
    nearest = d2.argmin(-1)  # argmin returns the first (lowest index) of equal minima
    expected = np.where(d2.min(-1) <= radius**2, labels[nearest], 0)
    np.testing.assert_array_equal(mask, expected)


def test_blobs_are_clipped_at_the_border():
    positions = np.array([[0.0, 0.0], [-3.0, 10.0], [100.0, 100.0]])
    mask = draw_blobs((20, 20), positions, np.array([1, 2, 3]), radius=4.0)
    assert mask[0, 0] == 1
    assert mask[0, 10] == 2  # centre outside, edge of the disc inside
    assert 3 not in mask


def test_labels_above_255_give_uint16():
    mask = draw_blobs((16, 16), np.array([[4.0, 4.0], [11.0, 11.0]]), np.array([300, 2]), radius=2.0)
    assert mask.dtype == np.uint16
    assert mask[4, 4] == 300 and mask[11, 11] == 2


def test_no_particles_gives_empty_mask():
    mask = draw_blobs((8, 9), np.zeros((0, 2)), np.zeros(0, dtype=int), radius=3.0)
    assert mask.shape == (8, 9) and mask.dtype == np.uint8 and not mask.any()


def test_many_particles_on_a_large_image_are_fast():
    rng = np.random.default_rng(1)
    positions = rng.random((500, 2)) * 2048
    start = time.perf_counter()
    mask = draw_blobs((2048, 2048), positions, np.ones(500, dtype=int), radius=6.0)
    assert time.perf_counter() - start < 2.0
    assert mask.any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": np.array([0])}, "labels"),
        ({"labels": np.array([1.5])}, "labels"),
        ({"labels": np.array([1, 2])}, "labels"),
        ({"labels": np.array([70000])}, "65535"),
        ({"radius": 0.0}, "radius"),
        ({"radius": float("nan")}, "radius"),
        ({"positions": np.array([[np.nan, 1.0]])}, "positions"),
        ({"shape": (0, 5)}, "shape"),
    ],
)
def test_draw_blobs_rejects_bad_arguments(kwargs, match):
    args = {"shape": (10, 10), "positions": np.array([[5.0, 5.0]]), "labels": np.array([1]), "radius": 2.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        draw_blobs(**args)


# --- random_positions ---------------------------------------------------------------------------------------


def test_random_positions_keep_min_distance_and_margin():
    rng = np.random.default_rng(2)
    positions = random_positions((128, 96), 60, min_distance=7.5, rng=rng, margin=4.0)
    assert positions.shape == (60, 2)
    assert _pairwise_min_distance(positions) >= 7.5
    assert positions[:, 0].min() >= 4.0 and positions[:, 0].max() <= 127 - 4.0
    assert positions[:, 1].min() >= 4.0 and positions[:, 1].max() <= 95 - 4.0


def test_random_positions_are_deterministic_per_seed():
    a = random_positions((64, 64), 20, 5.0, np.random.default_rng(3))
    b = random_positions((64, 64), 20, 5.0, np.random.default_rng(3))
    c = random_positions((64, 64), 20, 5.0, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_positions_cover_the_image_uniformly():
    positions = random_positions((200, 200), 400, 2.0, np.random.default_rng(5))
    counts, _, _ = np.histogram2d(positions[:, 0], positions[:, 1], bins=2, range=[[0, 199], [0, 199]])
    assert counts.min() > 70  # 100 expected per quadrant


def test_count_is_capped_when_the_image_is_full():
    # A 32 x 32 image fits at most about (32 / 10 + 1)^2 ~ 20 points 10 px apart.
    start = time.perf_counter()
    positions = random_positions((32, 32), 500, 10.0, np.random.default_rng(6))
    assert time.perf_counter() - start < 2.0
    assert 4 <= len(positions) <= 25
    assert _pairwise_min_distance(positions) >= 10.0


def test_zero_min_distance_and_zero_count():
    rng = np.random.default_rng(7)
    assert random_positions((10, 10), 0, 3.0, rng).shape == (0, 2)
    positions = random_positions((10, 10), 50, 0.0, rng)
    assert positions.shape == (50, 2)
    assert positions.min() >= 0 and positions.max() <= 9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": -1}, "count"),
        ({"count": 2.5}, "count"),
        ({"min_distance": -1.0}, "min_distance"),
        ({"margin": -1.0}, "margin"),
        ({"margin": 6.0}, "margin"),
        ({"shape": (10,)}, "shape"),
    ],
)
def test_random_positions_rejects_bad_arguments(kwargs, match):
    args = {"shape": (10, 10), "count": 5, "min_distance": 1.0, "rng": np.random.default_rng(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        random_positions(**args)


# --- classify_by_size ---------------------------------------------------------------------------------------


def test_classify_by_size_bin_edges():
    diameters = np.array([10.0, 79.9, 80.0, 150.0, 300.0, 1000.0])
    np.testing.assert_array_equal(classify_by_size(diameters, [80.0, 300.0]), [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(classify_by_size(diameters, []), np.ones(6))


@pytest.mark.parametrize("bins", [[300.0, 80.0], [80.0, 80.0], [float("nan")]])
def test_classify_by_size_rejects_unordered_bins(bins):
    with pytest.raises(ValueError, match="bins_nm"):
        classify_by_size(np.array([100.0]), bins)


# --- random_mask --------------------------------------------------------------------------------------------


def test_random_mask_is_consistent_with_its_particles():
    result = random_mask(
        (96, 128), 30, min_distance=12.0, class_proportions=[1, 1, 1], radius=4.0, rng=np.random.default_rng(8)
    )
    assert isinstance(result, RandomMask)
    assert result.mask.shape == (96, 128) and result.mask.dtype == np.uint8
    assert result.positions.shape == (30, 2) and result.labels.shape == (30,)
    assert set(np.unique(result.labels)) <= {1, 2, 3}
    np.testing.assert_array_equal(result.mask, draw_blobs((96, 128), result.positions, result.labels, 4.0))
    for (y, x), label in zip(result.positions, result.labels, strict=True):
        assert result.mask[round(y), round(x)] == label


def test_random_mask_follows_class_proportions():
    # 3000 draws: the standard error of a proportion is at most sqrt(0.25 / 3000) ~ 0.009, so 0.03 is > 3 sigma.
    result = random_mask(
        (1000, 1000), 3000, min_distance=3.0, class_proportions=[2, 1, 0, 1], radius=1.0, rng=np.random.default_rng(9)
    )
    assert len(result.labels) == 3000
    fractions = np.bincount(result.labels, minlength=5)[1:] / 3000
    np.testing.assert_allclose(fractions, [0.5, 0.25, 0.0, 0.25], atol=0.03)


def test_random_mask_takes_proportions_whose_sum_overflows():
    result = random_mask(
        (64, 64), 20, min_distance=3.0, class_proportions=[1e308, 1e308], radius=1.0, rng=np.random.default_rng(9)
    )
    assert set(result.labels) == {1, 2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_proportions": []}, "class_proportions"),
        ({"class_proportions": [1, -1]}, "class_proportions"),
        ({"class_proportions": [0, 0]}, "class_proportions"),
        ({"radius": -2.0}, "radius"),
        ({"min_distance": -2.0}, "min_distance"),
        ({"rng": 0}, "rng"),
    ],
)
def test_random_mask_rejects_bad_arguments(kwargs, match):
    args = {
        "shape": (32, 32),
        "count": 5,
        "min_distance": 4.0,
        "class_proportions": [1.0],
        "radius": 2.0,
        "rng": np.random.default_rng(0),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        random_mask(**args)
