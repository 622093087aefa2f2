"""A classical particle detector for iSCAT contrast images (numpy, scipy and scikit-image only).

An iSCAT particle is the interferometric cross term ``c Re(exp(i phi) h)`` of its PSF ``h`` with the
reference: depending on the phase ``phi`` and the defocus its centre is bright or dark, or dark inside a
bright ring. The detector therefore works on the *energy* of a band-passed image, which does not care
about the sign:

1. subtract the smooth background (a Gaussian of 4 PSF radii);
2. band-pass with a difference of Gaussians matched to the PSF core (0.35 and 1.5 PSF radii);
3. estimate the noise of the band-passed image robustly (MAD), ignoring pixels near strong signal;
4. local energy ``sqrt(G * dog^2) / noise`` at two scales: a narrow one (0.25 PSF radii) finds weak
   particles, a broad one (0.7 PSF radii) pulls the energy of a ring into its centre;
5. peaks of the narrow energy above ``threshold`` move uphill on the broad energy to the ring centre;
   peaks that land closer than ``min_distance_px`` merge;
6. a peak must be round: on a particle's ring the broad energy is a circular ridge, curved across the ring
   but flat along it, so a peak whose principal curvatures (Hessian eigenvalues) differ by more than
   ``1 / min_roundness`` is dropped (the edge test of SIFT detectors).

Lengths are in pixels; the PSF radius is the Airy radius ``0.61 lambda / NA_eff`` (first zero) in px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import hessian_matrix, hessian_matrix_eigvals, peak_local_max

# MAD of a normal distribution times this is its standard deviation.
MAD_TO_STD = 1.482602218505602
# Band-pass and energy scales in PSF radii: the inner Gaussian matches the PSF core (sigma ~ 0.35 Airy radii),
# the outer one removes speckle and illumination structure wider than the first ring.
_DOG_INNER, _DOG_OUTER = 0.35, 1.5
_BACKGROUND = 4.0
_NARROW_ENERGY, _BROAD_ENERGY = 0.25, 0.7
# Pixels within one PSF radius of a value above this many noise stds are left out of the noise estimate.
_NOISE_CLIP = 3.0
# Merge radius in PSF radii for images of known optics: fragments of a defocused particle's ring lie within
# 1.5 Airy radii of its centre, while two particles closer than that are not resolved anyway.
MERGE_RADIUS = 1.5


@dataclass(frozen=True)
class DetectorSettings:
    """Parameters of :func:`detect_particles`.

    Attributes:
        psf_radius_px: Airy radius (first zero of the in-focus PSF) in pixels; sets every filter scale.
        threshold: detection threshold on the local energy, in robust noise standard deviations.
        min_distance_px: detections closer than this (px) merge into the stronger one.
        min_roundness: smallest ratio of the weaker to the stronger principal curvature of the broad energy at a
            detection (1 = round peak, 0 = ridge); 0 keeps ring segments too.
    """

    psf_radius_px: float = 4.0
    threshold: float = 4.0
    min_distance_px: float = 3.0
    min_roundness: float = 0.2

    def __post_init__(self) -> None:
        for name in ("psf_radius_px", "threshold", "min_distance_px"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"DetectorSettings.{name} must be a positive number, got {value!r}")
        if not 0 <= self.min_roundness < 1:
            raise ValueError(f"DetectorSettings.min_roundness must be in [0, 1), got {self.min_roundness!r}")

    @classmethod
    def for_pixel_size(cls, airy_radius_nm: float, pixel_size_nm: float, **overrides: float) -> DetectorSettings:
        """Settings for images with this Airy radius and pixel size (both nm); detections closer than
        ``MERGE_RADIUS`` PSF radii merge unless ``min_distance_px`` is given."""
        radius = airy_radius_nm / pixel_size_nm
        return cls(**{"psf_radius_px": radius, "min_distance_px": MERGE_RADIUS * radius, **overrides})


@dataclass(frozen=True)
class Detections:
    """Particles found in one image.

    Attributes:
        positions: (n, 2) float64 centres (y, x) in pixels, strongest first.
        scores: (n,) local energy at each centre, in noise standard deviations.
        noise: robust standard deviation of the band-passed image (image units, e.g. contrast).
    """

    positions: np.ndarray
    scores: np.ndarray
    noise: float


def robust_std(values: np.ndarray) -> float:
    """Standard deviation estimated from the median absolute deviation (robust to a minority of outliers)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("robust_std: no values")
    return float(MAD_TO_STD * np.median(np.abs(values - np.median(values))))


def subtract_background(image: np.ndarray, psf_radius_px: float) -> np.ndarray:
    """The image minus its smooth background (a Gaussian of 4 PSF radii), float64, in image units."""
    image = _check_image(image)
    return image - ndimage.gaussian_filter(image, _BACKGROUND * psf_radius_px, mode="reflect")


def band_pass(image: np.ndarray, psf_radius_px: float) -> np.ndarray:
    """Difference-of-Gaussians band-pass matched to the PSF core, after background subtraction (image units)."""
    flat = subtract_background(image, psf_radius_px)
    return ndimage.gaussian_filter(flat, _DOG_INNER * psf_radius_px) - ndimage.gaussian_filter(
        flat, _DOG_OUTER * psf_radius_px
    )


def detect_particles(image: np.ndarray, settings: DetectorSettings | None = None) -> Detections:
    """Find particles (bright, dark or ring-shaped) in a 2-D iSCAT contrast image; see the module docstring."""
    settings = settings or DetectorSettings()
    radius = settings.psf_radius_px
    dog = band_pass(image, radius)
    noise = _clipped_noise(dog, radius)
    energy = dog * dog
    narrow = np.sqrt(ndimage.gaussian_filter(energy, _NARROW_ENERGY * radius)) / noise
    broad = np.sqrt(ndimage.gaussian_filter(energy, _BROAD_ENERGY * radius)) / noise
    peaks = peak_local_max(
        narrow,
        min_distance=max(1, int(settings.min_distance_px)),
        threshold_abs=settings.threshold,
        exclude_border=False,
    )
    centres = _uphill(peaks, broad, max(1, round(radius)))
    centres = centres[_roundness(broad, centres) >= settings.min_roundness]
    scores = broad[centres[:, 0], centres[:, 1]]
    keep = _merge(centres.astype(np.float64), scores, settings.min_distance_px)
    return Detections(centres[keep].astype(np.float64), scores[keep], noise)


def _check_image(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D image (H, W), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("the image holds NaN or infinite values")
    return array


def _clipped_noise(dog: np.ndarray, radius: float) -> float:
    """Robust std of the band-passed image, leaving out the surroundings of strong signal (particles, rings)."""
    noise = robust_std(dog)
    reach = max(1, round(radius))
    for _ in range(3):
        busy = ndimage.binary_dilation(np.abs(dog) > _NOISE_CLIP * noise, iterations=reach)
        # Keep the last estimate when almost nothing is quiet (a crowded image).
        if busy.mean() > 0.95:
            break
        noise = robust_std(dog[~busy])
    # A constant image has no noise; a tiny floor keeps the scores finite.
    return max(noise, 1e-12)


def _uphill(peaks: np.ndarray, broad: np.ndarray, reach: int) -> np.ndarray:
    """Move each peak to the maximum of the broad energy within ``reach`` px (a ring's energy sits at its centre)."""
    moved = np.empty_like(peaks)
    height, width = broad.shape
    for i, (y, x) in enumerate(peaks):
        y0, x0 = max(0, y - reach), max(0, x - reach)
        window = broad[y0 : min(height, y + reach + 1), x0 : min(width, x + reach + 1)]
        dy, dx = np.unravel_index(np.argmax(window), window.shape)
        moved[i] = (y0 + dy, x0 + dx)
    return moved.reshape(-1, 2)


def _roundness(energy: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Ratio of the weaker to the stronger principal curvature of ``energy`` at each centre (0 where not a peak)."""
    if len(centres) == 0:
        return np.zeros(0)
    hessian = hessian_matrix(energy, sigma=1.0, order="rc", use_gaussian_derivatives=False)
    weaker, stronger = (e[centres[:, 0], centres[:, 1]] for e in hessian_matrix_eigvals(hessian))
    # At a maximum both eigenvalues are negative; ``stronger`` is the more negative one.
    return np.where(stronger < 0, weaker / np.where(stronger < 0, stronger, -1.0), 0.0)


def _merge(positions: np.ndarray, scores: np.ndarray, min_distance_px: float) -> np.ndarray:
    """Indices to keep, strongest first, so that no two kept positions are closer than ``min_distance_px``."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if kept and np.any(np.hypot(*(positions[kept] - positions[i]).T) < min_distance_px):
            continue
        kept.append(int(i))
    return np.array(kept, dtype=np.int64)
