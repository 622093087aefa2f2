"""The training images' spectral density range: the white-noise floor and the strongest single frequency,
in normalised units^2, measured as the fitted sigma grid expects them."""

from __future__ import annotations

import numpy as np
import pytest
from training.spectral_density import spectral_density_range

from napari_iscat_diffusion.evaluation.statistics import radial_average

IDENTITY = {"mean": [0.0], "std": [1.0]}


def _noise(count: int, shape: tuple[int, ...], std: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, std, shape) for _ in range(count)]


def test_white_noise_gives_its_variance_as_the_floor_whatever_the_image_size() -> None:
    images = _noise(30, (64, 64), 3.0) + _noise(30, (48, 80), 3.0, seed=1)
    low, high = spectral_density_range(images, IDENTITY)
    # Variance 9 at every frequency; the floor is the smallest of 31 annulus means, each over >= 60 images.
    assert 7.5 <= low <= 9.0, low
    # The largest of ~240k exponential periodogram values of mean 9: about 9 ln(240k) = 111.
    assert 80 <= high <= 160, high


def test_small_images_do_not_pull_the_floor_down_with_annuli_they_lack() -> None:
    large = spectral_density_range(_noise(40, (128, 128), 1.0), IDENTITY)
    # A 12 px image has a frequency every 1/12 cycles/px: most of the 1/64-wide annuli hold none of its frequencies.
    mixed = spectral_density_range(_noise(40, (128, 128), 1.0) + _noise(40, (12, 12), 1.0, seed=2), IDENTITY)
    assert 0.85 <= mixed[0] <= 1.0 and mixed[0] >= large[0] - 0.1, (mixed, large)


def test_the_normalisation_is_applied_per_channel_before_measuring() -> None:
    images = [np.stack([1000 + 50 * a, -2 + 0.1 * a]) for a in _noise(20, (32, 32), 1.0)]
    per_channel = spectral_density_range(images, {"mean": [1000.0, -2.0], "std": [50.0, 0.1]})
    assert per_channel == spectral_density_range([a[:1] for a in images], {"mean": [1000.0], "std": [50.0]})
    # Left in physical units the first channel's variance is 2500 times larger.
    low, _ = spectral_density_range([a[:1] for a in images], {"mean": [0.0], "std": [1.0]})
    assert low > 1000


def test_a_sinusoid_sets_the_top_at_its_periodogram_power_rounded_up() -> None:
    size, amplitude = 64, 10.0
    xx = np.arange(size)[None, :]
    waves = [amplitude * np.cos(2 * np.pi * 5 * xx / size) + noise for noise in _noise(4, (size, size), 0.1)]
    low, high = spectral_density_range(waves, IDENTITY)
    # A cosine of amplitude A puts (A H W / 2)^2 / (H W) = A^2 H W / 4 = 102400 into each of its two frequencies.
    assert high == pytest.approx(110_000.0)
    assert low <= 0.01 and f"{low:.2g}" == repr(low)  # rounded down to two significant figures


def test_pixels_that_are_not_finite_count_as_the_mean() -> None:
    images = _noise(8, (32, 32), 1.0)
    images[3][5, 7] = np.nan
    images[4][0, 0] = np.inf
    low, high = spectral_density_range(images, IDENTITY)
    assert np.isfinite(low) and np.isfinite(high) and 0 < low < 1 < high < 30


def test_bad_images_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no images"):
        spectral_density_range([], IDENTITY)
    with pytest.raises(ValueError, match="no spread in power"):
        spectral_density_range([np.full((16, 16), 3.0)] * 3, IDENTITY)
    with pytest.raises(ValueError, match=r"image 1 has shape \(2, 3, 4, 5\)"):
        spectral_density_range([np.zeros((4, 5)), np.zeros((2, 3, 4, 5))], IDENTITY)


def test_radial_average_means_each_annulus_of_frequencies() -> None:
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(40), indexing="ij"))
    frequencies, means = radial_average(radius, num_bins=8)
    assert np.allclose(frequencies, np.arange(8) / 16 + 1 / 32)
    inside = (means > 0) & (frequencies > 0.1)
    # The mean radius of an annulus lies within it.
    assert np.all(np.abs(means[inside] - frequencies[inside]) <= 1 / 32)
    with pytest.raises(ValueError, match=r"expected a spectrum \(H, W\)"):
        radial_average(np.zeros((2, 3, 4)))
