"""``calibrate_contrast_channel``: the channel values that make a contrast model draw its classes' distributions.

A network with a contrast channel (``UNetConfig.contrast_channel``) follows the channel only part of the way: told
a particle's peak, it draws it closer to its class's typical peak (a slope of about 0.8 for the bundled model's
300 and 600 nm particles), so that peaks drawn from the prior come out in too narrow a distribution. The
calibration generates images for a set of masks with peaks drawn from the prior, measures each particle's peak as
training does (``peaks.measure_peaks``), and moves the channel magnitude that stands for each quantile of a class's
wanted peak magnitudes by the generated quantile's shortfall over the response's slope. A few rounds of this
quantile mapping bring the generated distribution to the prior's; the result is the prior's ``channel_map``.

Magnitudes, not signed peaks, are mapped: an iSCAT particle's centre is dark or bright with its height and the
reference phase, and the network gets the sign right for most particles; the sign passes through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..diffusion.particle_contrast import NUM_QUANTILE_LEVELS, ContrastPrior, paint_blobs, particle_blobs
from .calibration import CALIBRATION_SEED
from .evaluate import generated_images, simulated_set, simulation_parameters_for
from .peaks import measure_peaks
from .statistics import distribution_distance, median_ratio

# Quantile levels at which a class's map is fitted: its tails beyond 5 % rest on too few particles of a
# calibration set to be measured, and the map is proportional beyond its ends.
LEVELS = tuple(np.linspace(0.05, 0.95, 19))
# A class whose generated peaks correlate less with the channel is left unmapped: the network barely follows it
# (the 80 nm particles, whose peaks lie near the background's noise), and dividing by its slope would amplify noise.
MIN_CORRELATION = 0.5
# The step divides a quantile's shortfall by the response's slope, but never by less, so that one noisy slope
# cannot throw the map far out.
MIN_SLOPE = 0.5
# A channel magnitude never goes below this fraction of the wanted one: where the network draws a class's faintest
# particles too bright at any channel value (a floor in its response), the map would otherwise run to 0.
FLOOR = 0.1
# 192 masks of the simulator's hold about 240 particles of 600 nm, enough for the quantiles from 5 to 95 %. For the
# bundled model's 300 / 600 nm particles five rounds bring the held-out contrast distances (864 masks) to 0.087 /
# 0.040 of the spread, three rounds to 0.114 / 0.073.
DEFAULT_N = 192
DEFAULT_ROUNDS = 5
# The prior's distributions are piecewise linear in the level; magnitudes' quantiles are read off this many
# evenly spaced levels.
_FINE_LEVELS = 8193
# Image i's peaks are drawn from a generator seeded ``seed + _DRAW_SEED_OFFSET + i``: seeded ``seed + i`` like the
# image's starting noise, its first numbers would tie each particle's peak to the noise of the image's first pixels.
_DRAW_SEED_OFFSET = 1_000_000_007

Progress = Callable[[str, int, int], None]


def wanted_magnitudes(prior: ContrastPrior, label: int, levels: tuple[float, ...] = LEVELS) -> np.ndarray:
    """The quantiles at ``levels`` of the peak magnitudes (normalised units) of class ``label``'s distribution."""
    return np.quantile(np.abs(_fine_sample(prior, label)), levels)


def next_channel_magnitudes(wanted: np.ndarray, channel: np.ndarray, generated: np.ndarray, slope: float) -> np.ndarray:
    """One quantile-mapping step: the channel magnitudes (at the same levels as the wanted and generated magnitude
    quantiles, all normalised units) moved by ``(wanted - generated) / max(slope, MIN_SLOPE)``, kept at least
    ``FLOOR`` times the wanted ones and non-decreasing."""
    moved = np.asarray(channel) + (np.asarray(wanted) - np.asarray(generated)) / max(slope, MIN_SLOPE)
    return np.maximum.accumulate(np.maximum(moved, FLOOR * np.asarray(wanted)))


def calibration_masks(model: Any, n: int, size: int) -> np.ndarray:
    """``n`` simulator masks (n, size, size) of the model's training classes, from the calibration seeds
    ``CALIBRATION_SEED`` on, which training and evaluation never use."""
    return simulated_set(simulation_parameters_for(model, size), n, CALIBRATION_SEED).masks


def calibrate_contrast_channel(
    model: Any,
    masks: np.ndarray,
    *,
    rounds: int = DEFAULT_ROUNDS,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[ContrastPrior, dict[str, Any]]:
    """Fit a contrast model's ``channel_map`` so that its generated peak magnitudes follow its prior's, unguided.

    Args:
        model: a checkpoint with a contrast channel, loaded with ``load_checkpoint``.
        masks: (N, H, W) int label masks like the training set's (N >= 4); each round generates one image per mask.
        rounds: map updates (>= 1); the images are generated ``rounds + 1`` times, the last to measure the map
            that is returned.
        sampler: sampler name (None: the model's default).
        steps: sampler steps (None: the model's default for the sampler).
        seed: image i's generation seed (``seed + i``) and the seed of its drawn peaks, the same in every round.
        device: "auto", "cpu", "cuda", ...
        precision: "auto", "fp32", "bf16" or "fp16" (the network's arithmetic).
        batch_size: images per forward pass.
        progress: called with (stage, done, total) during generation.

    Returns:
        ``(prior, report)``: the model's prior with the fitted ``channel_map`` (None where no class qualifies), and a
        JSON-ready report: ``settings``; ``rounds``, a list of ``{class: {"correlation", "slope",
        "relative_to_spread", "median_ratio", "range_ratio"}}`` of the generated magnitudes against the prior's,
        per round (round 0 without a map); ``mapped`` classes and ``left`` ``{class: correlation}`` unmapped;
        ``floored`` ``{class: levels}`` whose channel magnitude the last round held at ``FLOOR`` times the wanted
        one (the network drew them too bright whatever the channel said).

    Raises:
        ValueError: for a model without a contrast channel, too few masks or rounds, or masks without particles.
    """
    prior = model.config.particle_contrast
    if prior is None:
        raise ValueError("this model has no contrast channel (model.contrast_channel); there is nothing to calibrate")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    masks = np.asarray(masks).astype(np.int64)
    if masks.ndim != 3 or len(masks) < 4:
        raise ValueError(f"masks must be (N, H, W) with N >= 4, got shape {masks.shape}")
    std = float(model.config.normalization["std"][0])
    numbered = [particle_blobs(mask) for mask in masks]
    classes = np.concatenate([image_classes for _, image_classes in numbered])
    if not len(classes):
        raise ValueError("the masks hold no particle; calibration needs masks like the training set's")
    peaks = [
        prior.draw(image_classes, torch.Generator().manual_seed(seed + _DRAW_SEED_OFFSET + i))
        for i, (_, image_classes) in enumerate(numbered)
    ]
    given = np.stack([paint_blobs(blobs, values * std) for (blobs, _), values in zip(numbered, peaks, strict=True)])
    peaks = np.concatenate(peaks)
    labels = [int(label) for label in np.unique(classes)]
    # Each class's whole distribution of magnitudes, the reference every round is measured against.
    reference = {label: np.abs(_fine_sample(prior, label)) for label in labels}
    wanted = {label: wanted_magnitudes(prior, label) for label in labels}
    channel = {label: wanted[label].copy() for label in labels}
    # Round 0 runs without a map; the classes it shows the network following (``_mappable``) get one from then on.
    mapped, left, history, floored = [], {}, [], {}
    options = {
        "sampler": sampler,
        "steps": steps,
        "guidance": 1.0,
        "class_guidance": {},
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
        "particle_contrast": given,
    }
    seeds = [seed + i for i in range(len(masks))]
    candidate = prior
    for round_index in range(rounds + 1):
        channel_map = {label: (tuple(wanted[label]), tuple(channel[label])) for label in mapped} or None
        candidate = dataclasses.replace(prior, channel_map=channel_map)
        trial = dataclasses.replace(model, config=dataclasses.replace(model.config, particle_contrast=candidate))
        images = generated_images(trial, masks, seeds, options, f"round {round_index}", progress)
        generated = np.concatenate(
            [
                measure_peaks(image, mask, prior.reach_px, prior.background_radius_px)[2] / std
                for image, mask in zip(images, masks, strict=True)
            ]
        )
        if not np.isfinite(generated).all():
            raise ValueError(
                f"round {round_index}: the generated images hold non-finite values at some particles; calibrate with "
                "precision fp32"
            )
        inputs = candidate.to_channel(peaks, classes) * prior.scale
        measured = {}
        for label in labels:
            chosen = classes == label
            distance = distribution_distance(np.abs(generated[chosen]), reference[label])
            slope, correlation = _slope_and_correlation(inputs[chosen], generated[chosen])
            measured[str(label)] = {
                "correlation": correlation,
                "slope": slope,
                "relative_to_spread": distance["relative_to_spread"],
                "median_ratio": median_ratio(distance),
                "range_ratio": distance["range_ratio"],
            }
        history.append(measured)
        if round_index == 0:
            left = {
                str(k): measured[str(k)]["correlation"] for k in labels if not _mappable(wanted[k], measured[str(k)])
            }
            mapped = [label for label in labels if str(label) not in left]
        if round_index < rounds:
            floored = {}
            for label in mapped:
                chosen = classes == label
                # Against the quantiles of the peaks actually drawn, so that the draw's own sampling error does not
                # enter the map; the map's axis stays the prior's quantiles, which these estimate.
                drawn = np.quantile(np.abs(peaks[chosen]), LEVELS)
                generated_quantiles = np.quantile(np.abs(generated[chosen]), LEVELS)
                slope = measured[str(label)]["slope"] or MIN_SLOPE
                channel[label] = next_channel_magnitudes(drawn, channel[label], generated_quantiles, slope)
                at_floor = [level for level, c, d in zip(LEVELS, channel[label], drawn, strict=True) if c <= FLOOR * d]
                if at_floor:
                    floored[str(label)] = at_floor
    report = {
        "settings": {
            "n": len(masks),
            "image_size": list(masks.shape[1:]),
            "sampler": sampler,
            "steps": steps,
            "seed": seed,
            "rounds": rounds,
            "levels": list(LEVELS),
        },
        "rounds": history,
        "mapped": [str(label) for label in mapped],
        "left": left,
        "floored": floored,
    }
    return candidate, report


def _fine_sample(prior: ContrastPrior, label: int) -> np.ndarray:
    """Class ``label``'s signed peaks at evenly spaced levels, a stand-in for its whole distribution."""
    grid = np.linspace(0.0, 1.0, NUM_QUANTILE_LEVELS)
    return np.interp(np.linspace(0.0, 1.0, _FINE_LEVELS), grid, prior.quantiles[label])


def _mappable(wanted: np.ndarray, measured: dict[str, Any]) -> bool:
    """Whether a class can be mapped: increasing positive wanted magnitudes, and generated peaks that follow the
    channel (correlation at least ``MIN_CORRELATION``)."""
    correlation = measured["correlation"]
    increasing = wanted[0] > 0 and bool(np.all(np.diff(wanted) > 0))
    return increasing and correlation is not None and correlation >= MIN_CORRELATION


def _slope_and_correlation(inputs: np.ndarray, generated: np.ndarray) -> tuple[float | None, float | None]:
    """Least-squares slope of generated over input peaks and their correlation; None for fewer than 3 particles or
    constant inputs."""
    if len(inputs) < 3 or np.ptp(inputs) == 0 or np.ptp(generated) == 0:
        return None, None
    return float(np.polyfit(inputs, generated, 1)[0]), float(np.corrcoef(inputs, generated)[0, 1])
