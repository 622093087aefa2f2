"""Each particle's signed peak contrast in an image, measured at its mask blob: the contrast channel's values.

A model with ``UNetConfig.contrast_channel`` is told each particle's signed peak contrast
(``diffusion.particle_contrast``). Training measures it on the very image the network learns to draw, normalised
as the network sees it: the value of largest magnitude of the background-subtracted image (``subtract_background``)
within ``reach_px`` of the particle's blob, with its sign (a particle's centre is dark or bright with its height
and the reference phase). A real image is measured the same way, so a lab's own data trains such a model too.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..diffusion.particle_contrast import DEFAULT_BACKGROUND_RADIUS_PX, ContrastPrior, paint_blobs, particle_blobs
from .detector import subtract_background

# A particle's peak is looked for this far (px) beyond its blob: a mask's blob marks the centre to within a pixel
# or two, and a PSF's central lobe is about 2 px wide at the simulator's optics (60 nm/px, 520 nm, NA 1.4).
REACH_PX = 2.0


def measure_peaks(
    image: np.ndarray,
    labels: np.ndarray,
    reach_px: float = REACH_PX,
    background_radius_px: float = DEFAULT_BACKGROUND_RADIUS_PX,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed peak contrasts of the particles of one image.

    Args:
        image: (H, W) image (any units; normalised in training).
        labels: (H, W) int label mask, 0 background, 1..K classes.
        reach_px: how far beyond its blob a particle's peak may lie (px, >= 0).
        background_radius_px: the PSF radius (px) whose 4-fold Gaussian is the smooth background subtracted first.

    Returns:
        ``(blobs, classes, peaks)``: ``particle_contrast.particle_blobs`` of the mask and each particle's signed
        peak (image units, background subtracted).
    """
    if not reach_px >= 0:
        raise ValueError(f"reach_px must be >= 0, got {reach_px}")
    blobs, classes = particle_blobs(labels)
    if not len(classes):
        return blobs, classes, np.zeros(0)
    flat = subtract_background(image, background_radius_px)
    reach = int(np.floor(reach_px))
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    # Touching particles' reaches overlap; there the later blob's number wins, which moves a boundary pixel only.
    grown = ndimage.grey_dilation(blobs, footprint=np.hypot(yy, xx) <= reach_px)
    grown = np.where(blobs > 0, blobs, grown)
    index = np.arange(1, len(classes) + 1)
    highest = np.asarray(ndimage.maximum(flat, grown, index))
    lowest = np.asarray(ndimage.minimum(flat, grown, index))
    return blobs, classes, np.where(-lowest > highest, lowest, highest)


def peak_map(image: np.ndarray, labels: np.ndarray, prior: ContrastPrior) -> np.ndarray:
    """(H, W) float32: each particle's signed peak (``measure_peaks`` with the prior's reach and background radius,
    image units) painted over its blob, 0 elsewhere; the contrast channel times ``prior.scale``."""
    blobs, _, peaks = measure_peaks(image, labels, prior.reach_px, prior.background_radius_px)
    return paint_blobs(blobs, peaks)
