"""``calibrate_class_guidance``: the guidance scale at which each particle class's contrast matches the physics.

One guidance scale rarely suits every class of a small model: it draws some classes too faint and others too
bright (docs/model-card.md). The calibration generates one simulator set, held apart from the training,
validation and evaluation seeds, at several uniform guidance scales and measures the peak-contrast distance
of each class to the simulator's images. Particles of different classes lie apart, so each class's contrast
depends on the scale around it only; the best scale per class becomes the model's per-class guidance
(``ModelConfig.default_class_guidance``, applied by ``guidance.guidance_scale_map``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..diffusion.guidance import check_guidance_interval, format_guidance_interval
from .evaluate import (
    ImageSet,
    detector_settings,
    generated_images,
    physics_statistics,
    reference_floor,
    simulated_set,
    simulation_parameters_for,
)
from .statistics import median_ratio

# Seeds of the calibration set: above the training (0, ...) and validation (1e9, ...) seeds of training/data.py
# and below the evaluation's held-out (3e9) and floor (4e9) sets, so the evaluation stays independent of it.
CALIBRATION_SEED = 2_000_000_000

# 144 images: with 48, the distance's scatter between two simulator sets (reference_floor) reached 0.33 of the
# reference spread for the bundled model's 600 nm class, and two of its best scales moved by 0.5 against 144 images.
# Half steps from 0.5 to 3 bracket that model's best scales (1-2) on both sides.
DEFAULT_N = 144
DEFAULT_SCALES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def calibrate_class_guidance(
    model: Any,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    n: int = DEFAULT_N,
    size: int | tuple[int, int] = 128,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 8,
    progress: Any = None,
) -> dict[str, Any]:
    """Per-class peak-contrast distance at each uniform guidance scale, and the best scale of each class.

    Args:
        model: a checkpoint loaded with ``load_checkpoint``, trained on simulator-like classes.
        scales: uniform guidance scales to try (at least one, each >= 0).
        n: masks (and simulator images) of the calibration set, from seeds ``CALIBRATION_SEED``, ...
        size: image side or (H, W) in px.
        sampler: sampler name (see ``diffusion.samplers.SAMPLERS``; None: the model's default).
        steps: sampler steps (None: the model's default for the sampler, ``LoadedModel.default_steps``).
        guidance_interval: noise levels (sigma_low, sigma_high) at which to guide (None: the model's default;
            ``guidance.EVERY_NOISE_LEVEL``: every step). Calibrate with the interval the scales will be used with.
        seed: generation seed (image i gets ``seed + i``, at every scale).
        device: "auto", "cpu", "cuda", ...
        precision: "auto", "fp32", "bf16" or "fp16" (the network's arithmetic).
        batch_size: images per forward pass.
        progress: called with (stage, done, total) during generation.

    Returns:
        JSON-ready dict: ``settings``; ``contrast_w_rel`` ``{class: [W / reference spread per scale]}``;
        ``median_ratio`` ``{class: [generated / reference median per scale]}``; ``range_ratio`` ``{class: [generated
        / reference 10-90 % range per scale]}``; ``best`` ``{class: scale}``
        with the smallest distance (a class without particles in the set is left out); ``at_grid_edge``: the
        classes whose best scale is the smallest or largest one tried (their optimum may lie outside the grid);
        ``reference_floor`` ``{class: W / reference spread}`` between a second simulator set and the reference,
        the scatter of the distance at this ``n``: scales whose distances differ by less are not told apart.
    """
    scales = [float(s) for s in scales]
    if not scales or any(not s >= 0 for s in scales):
        raise ValueError(f"scales must be one or more guidance scales >= 0, got {scales}")
    if n < 4:
        raise ValueError(f"n must be at least 4, got {n}")
    sampler, steps = model.sampler_and_steps(sampler, steps)
    interval = check_guidance_interval(
        model.config.default_guidance_interval if guidance_interval is None else guidance_interval
    )
    params = simulation_parameters_for(model, size)
    reference = simulated_set(params, n, seed=CALIBRATION_SEED)
    radius = detector_settings(params).psf_radius_px
    options = {
        "sampler": sampler,
        "steps": steps,
        "class_guidance": {},
        "guidance_interval": interval,
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
    }
    distances: dict[str, list[float | None]] = {}
    medians: dict[str, list[float | None]] = {}
    ranges: dict[str, list[float | None]] = {}
    seeds = [seed + i for i in range(n)]
    for scale in scales:
        uniform = {**options, "guidance": scale}
        images = generated_images(model, reference.masks, seeds, uniform, f"w={scale:g}", progress)
        contrast = physics_statistics(ImageSet(images, reference.masks, reference.particles), reference, radius)
        for label, distance in contrast["peak_contrast"].items():
            distances.setdefault(label, []).append(distance["relative_to_spread"])
            ratio = median_ratio(distance) if distance["relative_to_spread"] is not None else None
            medians.setdefault(label, []).append(ratio)
            ranges.setdefault(label, []).append(distance["range_ratio"])
    best = {
        label: scales[min((d, i) for i, d in enumerate(values) if d is not None)[1]]
        for label, values in distances.items()
        if any(d is not None for d in values)
    }
    edges = (min(scales), max(scales)) if len(scales) > 1 else ()
    floor = reference_floor(reference, params)["peak_contrast"]
    return {
        "settings": {
            "n": n,
            "image_size": list(reference.images.shape[1:]),
            "sampler": sampler,
            "steps": steps,
            "guidance_interval": format_guidance_interval(interval),
            "seed": seed,
            "reference_seeds": f"{CALIBRATION_SEED}..{CALIBRATION_SEED + n - 1}",
            "scales": scales,
        },
        "contrast_w_rel": distances,
        "median_ratio": medians,
        "range_ratio": ranges,
        "best": best,
        "at_grid_edge": [label for label, scale in best.items() if scale in edges],
        "reference_floor": {label: distance["relative_to_spread"] for label, distance in floor.items()},
    }
