"""The training images' power per spatial frequency: the range DPM-Solver++ 2M's sigma grid is fitted to.

``grid_fit.fitted_sigmas`` places the sampler's noise levels so that Gaussian data keeps its variance for
every spectral density in a range (``ModelConfig.sampling_density_range``). The range that matters is the
data's own: from the white-noise floor of the normalised images (shot noise, in iSCAT) to their strongest
single frequency (speckle and large particles, at the lowest frequencies). Both are measured here on the raw
training images, normalised as the network sees them, with the periodogram ``|FFT(x)|^2 / (H W)``: white
noise of variance v has density v at every frequency, and a Gaussian image of spectral density P is what
``gaussian_variance_ratios`` models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from napari_iscat_diffusion.evaluation.statistics import radial_average

from .normalization import RawImages, chosen_images, normalize

# Annuli of the radial spectrum whose mean gives the floor: the same as the evaluation's spectra.
NUM_BINS = 32


def spectral_density_range(
    data: RawImages | Sequence[np.ndarray],
    normalization: dict,
    max_images: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """``(low, high)``: the spectral density range of raw images once normalised, in normalised units^2.

    Args:
        data: an object with ``raw_image(i)`` and ``len()`` (``IscatDataset``), or a sequence of raw images,
            each (H, W) or (C, H, W), in physical units; sizes may differ.
        normalization: ``{"mean": [C], "std": [C]}`` (``compute_normalization``).
        max_images: at most this many images are read, chosen at random without replacement.
        seed: seeds the choice of images.

    Returns:
        ``low``, the smallest value of the mean radial spectrum over the images (the noise floor), and
        ``high``, the largest power of any non-zero frequency in any one image, over every channel; ``low``
        rounded down and ``high`` up to two significant figures. Non-finite pixels count as the image's mean.
        Raises ValueError when there is no image or the images have no power at all.
    """
    rng = np.random.default_rng(seed)
    profiles: list[np.ndarray] = []
    high = 0.0
    for image in chosen_images(data, max_images, rng, "spectral_density_range"):
        for channel in normalize(image, normalization):
            finite = np.isfinite(channel)
            centred = np.where(finite, channel - channel[finite].mean() if finite.any() else 0.0, 0.0)
            power = np.abs(np.fft.fft2(centred)) ** 2 / centred.size
            high = max(high, float(power.max()))
            profiles.append(radial_average(power, NUM_BINS)[1][1:])
    # An annulus narrower than a small image's frequency spacing holds no frequency (0): left out of its mean.
    stacked = np.array(profiles)
    counts = (stacked > 0).sum(axis=0)
    means = stacked.sum(axis=0)[counts > 0] / counts[counts > 0]
    low = float(means.min()) if means.size else 0.0
    if not 0 < low < high:
        raise ValueError(f"spectral_density_range: the images have no spread in power (floor {low:g}, top {high:g})")
    return _two_figures(low, math.floor), _two_figures(high, math.ceil)


def _two_figures(value: float, direction: Callable[[float], int]) -> float:
    """``value`` rounded to two significant figures by ``direction`` (math.floor or math.ceil)."""
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{direction(round(value / step, 9)) * step:.2g}")
