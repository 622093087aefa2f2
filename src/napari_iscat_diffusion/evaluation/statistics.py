"""Physics statistics of a set of iSCAT contrast images, and distances between two sets.

- peak contrast of each particle: the largest magnitude of the background-subtracted image within one
  PSF radius of its centre (contrast units; the sign of an iSCAT particle depends on its phase, so the
  magnitude is what encodes its size);
- background noise: robust standard deviation of the background-subtracted image away from particles;
- line pattern: standard deviation of the column means and of the row means of that background (a
  camera's fixed-pattern noise runs along its columns, so in camera images the first exceeds the second);
- surroundings: root mean square of the background-subtracted image in distance bands around the particles of
  each class (a particle's rings, and for bright particles what they do to the texture around them);
- radial power spectrum: the azimuthally averaged ``|FFT|^2`` of the Hann-windowed images.

Distances between peak-contrast distributions come with a bootstrap standard error over images: the
particles of one image share its reference phase and noise, so images, not particles, are resampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import wasserstein_distance

from .detector import robust_std, subtract_background

# Pixels closer than this many PSF radii to a particle centre count as particle, not background: the first
# two rings of an in-focus PSF lie within 2.2 Airy radii.
_BACKGROUND_EXCLUSION = 3.0


def _distance_to_nearest(shape: tuple[int, int], positions: np.ndarray) -> np.ndarray:
    """(H, W) distance in px from each pixel centre to the nearest position (inf without positions)."""
    yy, xx = np.indices(shape, dtype=np.float64)
    nearest = np.full(shape, np.inf)
    for y, x in np.asarray(positions, dtype=np.float64).reshape(-1, 2):
        np.minimum(nearest, np.hypot(yy - y, xx - x), out=nearest)
    return nearest


def _background(image: np.ndarray, positions: np.ndarray, psf_radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The background-subtracted image and where it is more than 3 PSF radii from every particle (bool)."""
    flat = subtract_background(image, psf_radius_px)
    return flat, _distance_to_nearest(flat.shape, positions) > _BACKGROUND_EXCLUSION * psf_radius_px


def peak_contrasts(image: np.ndarray, positions: np.ndarray, psf_radius_px: float) -> np.ndarray:
    """Peak contrast magnitude (image units) of each particle at ``positions`` (n, 2) (y, x px): the largest
    ``|image - smooth background|`` within one PSF radius of the centre."""
    flat = np.abs(subtract_background(image, psf_radius_px))
    yy, xx = np.indices(flat.shape, dtype=np.float64)
    out = np.empty(len(positions))
    for i, (y, x) in enumerate(np.asarray(positions, dtype=np.float64).reshape(-1, 2)):
        near = np.hypot(yy - y, xx - x) <= psf_radius_px
        out[i] = flat[near].max() if near.any() else np.nan
    return out


def background_noise(image: np.ndarray, positions: np.ndarray, psf_radius_px: float) -> float:
    """Robust std (image units) of the background-subtracted image more than 3 PSF radii from every particle."""
    flat, away = _background(image, positions, psf_radius_px)
    if away.sum() < 16:
        raise ValueError("background_noise: fewer than 16 pixels are away from the particles; use larger images")
    return robust_std(flat[away])


def line_pattern(image: np.ndarray, positions: np.ndarray, psf_radius_px: float) -> tuple[float, float]:
    """Std (image units) of the column means and of the row means of the background-subtracted image, pixels
    within 3 PSF radii of a particle left out (lines with fewer than a quarter of their pixels left are
    skipped). Shot noise and speckle give both the same size; column fixed-pattern noise raises the first."""
    flat, away = _background(image, positions, psf_radius_px)

    def profile_std(axis: int) -> float:
        counts = away.sum(axis=axis)
        usable = counts >= away.shape[axis] / 4
        if usable.sum() < 4:
            raise ValueError("line_pattern: fewer than 4 lines are mostly away from the particles; use larger images")
        means = np.where(away, flat, 0.0).sum(axis=axis)[usable] / counts[usable]
        return float(np.std(means))

    return profile_std(0), profile_std(1)


# Bands of distance (PSF radii) from a particle's centre for ``surroundings``: the core (below 1) is its peak
# contrast, and beyond 10 the background, measured by ``background_noise`` (which starts at 3: a bright bead's
# outer rings reach into it).
SURROUNDING_BANDS: tuple[tuple[float, float], ...] = ((1, 2), (2, 3), (3, 4), (4, 6), (6, 10))


def surroundings(
    images: Sequence[np.ndarray], particles: Sequence[tuple[np.ndarray, np.ndarray]], psf_radius_px: float
) -> dict[int, list[float | None]]:
    """Root mean square (image units) of the background-subtracted images in the ``SURROUNDING_BANDS`` around
    each class's particles.

    Args:
        images: (H, W) contrast images.
        particles: per image, particle centres (n, 2) in px (y, x) and their class labels (n,).
        psf_radius_px: the PSF radius in px; the bands are in multiples of it.

    Returns:
        ``{label: [rms per band]}``; each pixel counts for the particle nearest to it, and a band without
        pixels gives None.
    """
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, np.ndarray] = {}
    for image, (positions, labels) in zip(images, particles, strict=True):
        if len(positions) == 0:
            continue
        squared = subtract_background(image, psf_radius_px) ** 2
        yy, xx = np.indices(image.shape, dtype=np.float64)
        centres = np.asarray(positions, dtype=np.float64).reshape(-1, 2)[:, :, None, None]
        distances = np.hypot(yy - centres[:, 0], xx - centres[:, 1]) / psf_radius_px  # (n, H, W)
        nearest_label = np.asarray(labels)[distances.argmin(axis=0)]
        distance = distances.min(axis=0)
        for label in np.unique(labels).tolist():
            own = nearest_label == label
            band_sums = sums.setdefault(label, np.zeros(len(SURROUNDING_BANDS)))
            band_counts = counts.setdefault(label, np.zeros(len(SURROUNDING_BANDS)))
            for b, (low, high) in enumerate(SURROUNDING_BANDS):
                inside = own & (distance >= low) & (distance < high)
                band_sums[b] += squared[inside].sum()
                band_counts[b] += inside.sum()
    return {
        label: [float(np.sqrt(t / c)) if c else None for t, c in zip(sums[label], counts[label], strict=True)]
        for label in sorted(sums)
    }


def radial_power_spectrum(images: np.ndarray, num_bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Mean radial power spectrum of images (N, H, W).

    Returns:
        (frequencies in cycles per pixel, bin centres from 0 to 0.5; power in image units^2 per frequency
        bin, mean over images and over each annulus).
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"radial_power_spectrum: expected images (N, H, W), got shape {images.shape}")
    height, width = images.shape[1:]
    window = np.outer(np.hanning(height), np.hanning(width))
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    power = np.mean(np.abs(np.fft.fft2(centred * window)) ** 2, axis=0) / window.sum() ** 2 * (height * width)
    return radial_average(power, num_bins)


def radial_average(power: np.ndarray, num_bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Mean of a 2-D spectrum (H, W) in ``np.fft.fft2`` order over annuli of spatial frequency.

    Returns:
        (bin centres in cycles per pixel, from 0 to 0.5; the mean of ``power`` over each annulus, 0 where an
        annulus holds no frequency). Frequencies beyond 0.5 cycles/px (the corners) are left out.
    """
    power = np.asarray(power, dtype=np.float64)
    if power.ndim != 2:
        raise ValueError(f"radial_average: expected a spectrum (H, W), got shape {power.shape}")
    height, width = power.shape
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij"))
    edges = np.linspace(0.0, 0.5, num_bins + 1)
    which = np.digitize(radius.ravel(), edges) - 1
    inside = (which >= 0) & (which < num_bins)
    sums = np.bincount(which[inside], weights=power.ravel()[inside], minlength=num_bins)
    counts = np.bincount(which[inside], minlength=num_bins)
    return (edges[:-1] + edges[1:]) / 2, sums / np.maximum(counts, 1)


def _spectrum_ratios(power: np.ndarray, reference_power: np.ndarray, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """``power / reference_power`` in the bins where both have power, and those bins' indices."""
    power, reference_power = np.asarray(power, np.float64), np.asarray(reference_power, np.float64)
    if power.shape != reference_power.shape:
        raise ValueError(f"spectra differ in shape: {power.shape} and {reference_power.shape}")
    usable = np.flatnonzero((power > 0) & (reference_power > 0))
    if usable.size == 0:
        raise ValueError(f"{caller}: no frequency bin has power in both spectra")
    return power[usable] / reference_power[usable], usable


def spectrum_distance(power: np.ndarray, reference_power: np.ndarray) -> float:
    """RMS of ``log10(power / reference_power)`` over the frequency bins, in decades (0 = same spectrum)."""
    ratios, _ = _spectrum_ratios(power, reference_power, "spectrum_distance")
    return float(np.sqrt(np.mean(np.log10(ratios) ** 2)))


def largest_spectrum_ratio(power: np.ndarray, reference_power: np.ndarray) -> tuple[int, float]:
    """The frequency bin where ``power / reference_power`` lies farthest from 1 in log terms: (bin index, ratio).

    The spectrum distance averages over all bins; this names the band a texture is most wrong in (a ratio
    of 1.15 at 0.2 cycles/px is 15 % too much power at a 5 px period)."""
    ratios, usable = _spectrum_ratios(power, reference_power, "largest_spectrum_ratio")
    worst = int(np.argmax(np.abs(np.log(ratios))))
    return int(usable[worst]), float(ratios[worst])


# The percentiles (%) that distribution_distance reports of both samples: where two distributions part.
PERCENTILE_LEVELS = (5, 10, 25, 50, 75, 90, 95)


def distribution_distance(values: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Wasserstein-1 distance between two samples (same units as the values), relative to the reference's
    spread (std) and median, with both medians, ``range_ratio``, the 10-90 % range of the values over that of
    the reference (below 1: drawn too narrow), and both samples' ``percentiles`` at ``PERCENTILE_LEVELS``
    (``{"levels", "values", "reference"}``); None where a sample is empty or the reference range is 0."""
    values = np.asarray(values, np.float64)
    reference = np.asarray(reference, np.float64)
    values, reference = values[np.isfinite(values)], reference[np.isfinite(reference)]
    out: dict[str, float | int | None] = {"count": int(values.size), "reference_count": int(reference.size)}
    if values.size == 0 or reference.size == 0:
        empty = ("wasserstein", "relative_to_spread", "relative_to_median", "range_ratio", "percentiles")
        return {**out, **dict.fromkeys(empty)}
    distance = float(wasserstein_distance(values, reference))
    spread, median = float(np.std(reference)), float(np.median(reference))
    reference_range = float(np.subtract(*np.percentile(reference, [90, 10])))
    return {
        **out,
        "wasserstein": distance,
        "relative_to_spread": distance / spread if spread > 0 else None,
        "relative_to_median": distance / abs(median) if median != 0 else None,
        "range_ratio": float(np.subtract(*np.percentile(values, [90, 10]))) / reference_range
        if reference_range > 0
        else None,
        "median": float(np.median(values)),
        "reference_median": median,
        "percentiles": {
            "levels": list(PERCENTILE_LEVELS),
            "values": np.percentile(values, PERCENTILE_LEVELS).tolist(),
            "reference": np.percentile(reference, PERCENTILE_LEVELS).tolist(),
        },
    }


def median_ratio(distance: dict[str, Any]) -> float | None:
    """The generated median over the reference's from a :func:`distribution_distance` result; None where a sample
    was empty or the reference median is 0."""
    median, reference = distance.get("median"), distance.get("reference_median")
    return median / reference if median is not None and reference else None


def relative_distance_standard_error(
    values_per_image: Sequence[np.ndarray],
    reference_per_image: Sequence[np.ndarray],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> float | None:
    """Bootstrap standard error of the Wasserstein distance over the reference spread (the
    ``relative_to_spread`` of :func:`distribution_distance`) between two sets of per-image samples.

    Each set's images are resampled with replacement, independently of the other's, ``resamples`` times
    (a two-sample bootstrap in which an image's values stay together). The resampled distances scatter
    around a value biased upwards (a distance is never negative), so this is a measure of how much the
    distance moves with the images drawn, not an interval for the true distance; compare the distance with
    that between two simulator sets for the bias. Returns None where either set has fewer than two images
    with finite values or the reference has no spread."""

    def flatten(per_image: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
        arrays = [np.asarray(v, np.float64).ravel() for v in per_image]
        group = np.concatenate([np.full(a.size, i) for i, a in enumerate(arrays)] or [np.zeros(0, int)])
        flat = np.concatenate(arrays or [np.zeros(0)])
        finite = np.isfinite(flat)
        return flat[finite], group[finite].astype(int), len(arrays)

    values, value_group, n_values = flatten(values_per_image)
    reference, reference_group, n_reference = flatten(reference_per_image)
    if len(np.unique(value_group)) < 2 or len(np.unique(reference_group)) < 2 or np.ptp(reference) == 0:
        return None
    rng = np.random.default_rng(seed)
    distances = []
    for _ in range(resamples):
        value_weights = np.bincount(rng.integers(0, n_values, n_values), minlength=n_values)[value_group]
        reference_weights = np.bincount(rng.integers(0, n_reference, n_reference), minlength=n_reference)[
            reference_group
        ]
        if value_weights.sum() == 0 or reference_weights.sum() == 0:
            continue
        mean = np.average(reference, weights=reference_weights)
        spread = np.sqrt(np.average((reference - mean) ** 2, weights=reference_weights))
        if spread > 0:
            distance = wasserstein_distance(values, reference, value_weights, reference_weights)
            distances.append(distance / spread)
    return float(np.std(distances, ddof=1)) if len(distances) > 1 else None
