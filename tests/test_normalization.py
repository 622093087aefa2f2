"""Normalisation statistics: robust per-channel centre and scale over the training set, physical round trip."""

import numpy as np
import pytest
import torch
from training.normalization import compute_normalization, denormalize, normalize

CENTRES = (5.0, -0.02)
SCALES = (2.0, 0.003)


def _images(count=20, size=64, outlier_fraction=0.0, seed=0):
    """Gaussian images with known per-channel centre and scale, and a fraction of huge bright pixels."""
    rng = np.random.default_rng(seed)
    centre = np.array(CENTRES).reshape(2, 1, 1)
    scale = np.array(SCALES).reshape(2, 1, 1)
    images = centre + scale * rng.standard_normal((count, 2, size, size))
    hot = rng.random(images.shape) < outlier_fraction
    images[hot] = 1e6
    return list(images.astype(np.float32))


class _Counting:
    """A dataset-like object that records which raw images were read."""

    def __init__(self, images):
        self.images, self.read = images, []

    def __len__(self):
        return len(self.images)

    def raw_image(self, index):
        self.read.append(index)
        return self.images[index]


def test_recovers_the_centre_and_scale_of_each_channel():
    stats = compute_normalization(_images())
    assert set(stats) == {"mean", "std"}
    assert all(isinstance(value, float) for value in stats["mean"] + stats["std"])
    for channel in range(2):
        assert abs(stats["mean"][channel] - CENTRES[channel]) < 0.01 * SCALES[channel]
    np.testing.assert_allclose(stats["std"], SCALES, rtol=0.02)


def test_one_percent_huge_outliers_barely_move_the_statistics():
    clean = compute_normalization(_images())
    dirty = compute_normalization(_images(outlier_fraction=0.01))
    assert max(np.abs(_images(outlier_fraction=0.01)[0][0]).ravel()) == 1e6  # the outliers are there
    for channel in range(2):
        assert abs(dirty["mean"][channel] - clean["mean"][channel]) < 0.03 * SCALES[channel]
    np.testing.assert_allclose(dirty["std"], clean["std"], rtol=0.03)


def test_nans_are_ignored():
    images = _images()
    for image in images:
        image[:, :8] = np.nan
    stats = compute_normalization(images)
    np.testing.assert_allclose(stats["std"], SCALES, rtol=0.03)
    assert np.isfinite(stats["mean"]).all()


def test_images_are_subsampled_deterministically():
    images = _images(count=30)
    first, again, other = _Counting(images), _Counting(images), _Counting(images)
    stats = compute_normalization(first, max_images=7, seed=3)
    assert compute_normalization(again, max_images=7, seed=3) == stats
    compute_normalization(other, max_images=7, seed=4)
    assert len(set(first.read)) == len(first.read) == 7
    assert first.read == again.read != other.read


def test_pixel_subsampling_keeps_the_statistics():
    stats = compute_normalization(_images(count=4, size=128), pixels_per_image=2000)
    np.testing.assert_allclose(stats["std"], SCALES, rtol=0.05)


@pytest.mark.parametrize("to_array", [np.asarray, torch.from_numpy])
def test_physical_units_round_trip(to_array):
    stats = {"mean": list(CENTRES), "std": list(SCALES)}
    image = to_array(_images(count=1)[0])
    normalised = normalize(image, stats)
    assert abs(float(normalised[0].mean())) < 0.1 and abs(float(normalised[1].std()) - 1) < 0.1
    restored = denormalize(normalised, stats)
    np.testing.assert_allclose(np.asarray(restored), np.asarray(image), rtol=1e-5, atol=1e-6)
    batch = to_array(np.stack([_images(count=1)[0]] * 3))
    np.testing.assert_allclose(
        np.asarray(denormalize(normalize(batch, stats), stats)), np.asarray(batch), rtol=1e-5, atol=1e-6
    )


def test_statistics_that_do_not_fit_the_image_are_refused():
    with pytest.raises(ValueError, match="channel"):
        normalize(np.zeros((3, 4, 4), np.float32), {"mean": [0.0, 0.0], "std": [1.0, 1.0]})


def test_two_dimensional_images_are_one_channel():
    stats = compute_normalization([image[0] for image in _images()])
    assert len(stats["mean"]) == 1
    np.testing.assert_allclose(stats["std"], SCALES[:1], rtol=0.02)


def test_mostly_flat_data_falls_back_to_the_standard_deviation():
    images = [np.zeros((1, 16, 16), np.float32) for _ in range(4)]
    images[0][0, :4] = 1.0
    stats = compute_normalization(images)
    assert stats["mean"] == [0.0] and stats["std"][0] > 0


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "no images"),
        ([np.ones((1, 8, 8), np.float32)] * 3, "constant"),
        ([np.full((1, 8, 8), np.nan, np.float32)], "no finite"),
        ([np.zeros((1, 8, 8)), np.zeros((2, 8, 8))], "different numbers of channels"),
    ],
)
def test_unusable_data_is_refused(images, message):
    with pytest.raises(ValueError, match=message):
        compute_normalization(images)
