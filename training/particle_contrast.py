"""The particles' peak contrasts in training images, for a network with ``model.contrast_channel``: the prior of
each class over a training set, and the condition channel of one item.

Each particle's peak is measured as the network sees its image (``evaluation.peaks.measure_peaks``); generation
draws from the per-class distributions (``diffusion.particle_contrast.ContrastPrior``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from napari_iscat_diffusion.diffusion.particle_contrast import DEFAULT_BACKGROUND_RADIUS_PX, ContrastPrior
from napari_iscat_diffusion.evaluation.peaks import REACH_PX, measure_peaks, peak_map

if TYPE_CHECKING:
    from .datasets import IscatDataset


def contrast_channel(image: torch.Tensor, labels: torch.Tensor, prior: ContrastPrior) -> torch.Tensor:
    """The condition's contrast channel (H, W) float32 for one normalised image (C, H, W) (its first channel is
    measured) and its int labels (H, W): each particle's peak over ``prior.scale``, on its blob."""
    peaks = peak_map(image[0].detach().float().cpu().numpy(), labels.cpu().numpy(), prior)
    return torch.from_numpy(peaks / np.float32(prior.scale))


def measure_prior(
    dataset: IscatDataset, max_images: int = 200, seed: int = 0, units: ContrastPrior | None = None
) -> ContrastPrior:
    """The per-class distributions of peak contrast over training items as the network sees them (normalised,
    cropped, augmented: ``dataset[(index, 0)]``), at most ``max_images`` items chosen at random with ``seed``.

    ``units``: a prior whose measurement (reach, background radius) and scale to keep, that of the checkpoint a
    fine-tune starts from, so that the channel goes on meaning what the network learned; None: ``REACH_PX``, the
    default background radius and this data's own scale. Raises ValueError when the items hold no particle with a
    contrast.
    """
    if dataset.normalization is None:
        raise RuntimeError("measure_prior: set dataset.normalization first")
    reach = REACH_PX if units is None else units.reach_px
    radius = DEFAULT_BACKGROUND_RADIUS_PX if units is None else units.background_radius_px
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(dataset), size=min(max_images, len(dataset)), replace=False)
    samples: dict[int, list[float]] = {label: [] for label in range(1, dataset.num_classes + 1)}
    for index in sorted(int(i) for i in chosen):
        item = dataset[(index, 0)]
        if not item["has_mask"]:
            continue
        _, classes, peaks = measure_peaks(item["image"][0].numpy(), item["labels"].numpy(), reach, radius)
        for label, peak in zip(classes, peaks, strict=True):
            samples[int(label)].append(float(peak))
    measured = ContrastPrior.from_samples(samples, reach, radius)
    if units is None:
        return measured
    return ContrastPrior(units.scale, reach, measured.quantiles, radius)
