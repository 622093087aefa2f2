"""Diversity: how different are samples of the same mask drawn with different seeds?"""

from __future__ import annotations

import itertools

import numpy as np


def sample_diversity(samples: np.ndarray, reference_std: float) -> dict[str, float]:
    """Mean RMS pixel distance between samples of the same mask, over all pairs and masks.

    Args:
        samples: (M, S, H, W): S >= 2 samples for each of M masks (image units, e.g. contrast).
        reference_std: pixel standard deviation of reference images (same units).

    Returns:
        ``rms_distance`` (image units) and ``relative``: that distance over ``sqrt(2) * reference_std``, the
        RMS distance of two independent images with that std; near 0 means the seed hardly matters (mode
        collapse), near 1 means samples differ as much as unrelated images (the mask shared by the samples
        makes real data somewhat below 1).
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 4 or samples.shape[1] < 2:
        raise ValueError(f"sample_diversity: expected (M masks, S >= 2 seeds, H, W), got shape {samples.shape}")
    if not reference_std > 0:
        raise ValueError(f"reference_std must be positive, got {reference_std!r}")
    distances = [
        np.sqrt(np.mean((per_mask[i] - per_mask[j]) ** 2))
        for per_mask in samples
        for i, j in itertools.combinations(range(samples.shape[1]), 2)
    ]
    rms = float(np.mean(distances))
    return {"rms_distance": rms, "relative": rms / (np.sqrt(2.0) * reference_std)}
