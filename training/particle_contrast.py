"""The prior of the particles' peak contrasts over a training set, for a network with ``model.contrast_channel``.

Each particle's peak is measured as the network sees its image (``evaluation.peaks.measure_peaks``); generation
draws from these distributions (``diffusion.particle_contrast.ContrastPrior``).
"""

from __future__ import annotations

import numpy as np

from napari_iscat_diffusion.diffusion.particle_contrast import ContrastPrior
from napari_iscat_diffusion.evaluation.peaks import REACH_PX, measure_peaks

from .datasets import IscatDataset


def measure_prior(
    dataset: IscatDataset, max_images: int = 200, seed: int = 0, reach_px: float = REACH_PX
) -> ContrastPrior:
    """The per-class distributions of peak contrast over training items as the network sees them (normalised,
    cropped, augmented: ``dataset[(index, 0)]``), at most ``max_images`` items chosen at random with ``seed``.

    Raises ValueError when the items hold no particle with a contrast.
    """
    if dataset.normalization is None:
        raise RuntimeError("measure_prior: set dataset.normalization first")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(dataset), size=min(max_images, len(dataset)), replace=False)
    samples: dict[int, list[float]] = {label: [] for label in range(1, dataset.num_classes + 1)}
    for index in sorted(int(i) for i in chosen):
        item = dataset[(index, 0)]
        if not item["has_mask"]:
            continue
        _, classes, peaks = measure_peaks(item["image"][0].numpy(), item["labels"].numpy(), reach_px)
        for label, peak in zip(classes, peaks, strict=True):
            samples[int(label)].append(float(peak))
    return ContrastPrior.from_samples(samples, reach_px)
