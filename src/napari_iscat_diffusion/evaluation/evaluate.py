"""``evaluate_model``: all quality metrics of a checkpoint on held-out simulator data, and curves of them.

The reference set is simulated with the parameters the model was trained on (from the checkpoint's
training summary when it was trained on the simulator, else the simulator defaults), from seeds far
above the training seeds (0, 1, ...) and validation seeds (1e9, ...) of ``training/data.py``. The model
generates one image per reference mask; every metric compares the two sets (see docs/evaluation.md).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..diffusion.generate import generate
from ..diffusion.guidance import format_class_guidance, format_guidance_interval
from ..diffusion.samplers import SAMPLERS
from ..io.atomic import atomic_write_text
from ..iscat.simulate import SimulationParameters, simulate
from .c2st import repeated_two_sample_test
from .detector import DetectorSettings, detect_particles
from .diversity import sample_diversity
from .edits import edit_mask, edit_scores
from .matching import MaskParticles, fidelity_scores, mask_particles, match_image
from .statistics import (
    SURROUNDING_BANDS,
    background_noise,
    distribution_distance,
    largest_spectrum_ratio,
    line_pattern,
    peak_contrasts,
    radial_power_spectrum,
    relative_distance_standard_error,
    spectrum_distance,
    surroundings,
)

HELD_OUT_SEED = 3_000_000_000
# Held-out masks by default: with 64 two simulator sets differ by 7-8 % of the contrast spread and the C2ST
# interval is +-0.12 wide; with 288 its classifier trains on 144 images per set, enough to find differences that
# 48 images miss.
DEFAULT_N = 288
# Seeds of the second, independent simulator set that measures each physics metric's sampling floor.
FLOOR_SEED = 4_000_000_000
# Separate seed ranges (offsets from the generation seed) for the main, diversity and edited-mask samples.
_DIVERSITY_SEED_STRIDE = 1_000_000
_EDIT_SEED_OFFSET = 500_000

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ImageSet:
    """Images with the masks they follow.

    Attributes:
        images: (N, H, W) float32 contrast images.
        masks: (N, H, W) label masks.
        particles: the blobs of each mask.
    """

    images: np.ndarray
    masks: np.ndarray
    particles: list[MaskParticles]

    @classmethod
    def from_arrays(cls, images: np.ndarray, masks: np.ndarray) -> ImageSet:
        """Pair images (N, H, W) with their masks (N, H, W)."""
        images, masks = np.asarray(images, np.float32), np.asarray(masks)
        if images.ndim != 3 or images.shape != masks.shape:
            raise ValueError(f"images and masks must both be (N, H, W), got {images.shape} and {masks.shape}")
        return cls(images, masks, [mask_particles(m) for m in masks])


def simulated_set(params: SimulationParameters, n: int, seed: int = HELD_OUT_SEED) -> ImageSet:
    """``n`` simulator images with masks, image i from seed ``seed + i``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if len(params.focal_planes_nm) != 1:
        raise ValueError("the evaluation handles single-plane images; give one focal plane")
    results = [simulate(params, seed + i) for i in range(n)]
    return ImageSet.from_arrays(np.stack([r.image for r in results]), np.stack([r.mask for r in results]))


def detector_settings(params: SimulationParameters) -> DetectorSettings:
    """Detector settings for images simulated with ``params``."""
    return DetectorSettings.for_pixel_size(params.optics.airy_radius_nm, params.pixel_size_nm)


def fidelity(
    images: ImageSet, settings: DetectorSettings, tolerance_px: float, border_px: float = 0.0
) -> dict[str, Any]:
    """Detect particles in each image and match them to its mask's blobs; per-class precision, recall, F1.
    Blobs and spurious detections within ``border_px`` (px) of the image edge are not counted."""
    per_image = [
        match_image(
            detect_particles(image, settings).positions,
            blobs.positions,
            blobs.labels,
            tolerance_px,
            image_shape=image.shape,
            border_px=border_px,
        )
        for image, blobs in zip(images.images, images.particles, strict=True)
    ]
    return fidelity_scores(per_image)


def physics_statistics(generated: ImageSet, reference: ImageSet, psf_radius_px: float) -> dict[str, Any]:
    """Peak contrast per class (Wasserstein distance, with its bootstrap standard error over images
    ``relative_to_spread_se``), background noise, line pattern (columns and rows), the surroundings of each
    class's particles (``statistics.surroundings``), radial power spectrum distance and the frequency where the two
    spectra differ most (``largest_ratio``)."""

    def contrasts(images: ImageSet) -> dict[int, list[np.ndarray]]:
        """Per class, the peak contrasts of each image (empty where an image has none of that class)."""
        measured = [
            (peak_contrasts(image, blobs.positions, psf_radius_px), blobs.labels)
            for image, blobs in zip(images.images, images.particles, strict=True)
        ]
        classes = {int(k) for _, labels in measured for k in np.unique(labels)}
        return {k: [values[labels == k] for values, labels in measured] for k in classes}

    def contrast_distance(generated_values: list[np.ndarray], reference_values: list[np.ndarray]) -> dict[str, Any]:
        distance = distribution_distance(np.concatenate(generated_values), np.concatenate(reference_values))
        se = relative_distance_standard_error(generated_values, reference_values)
        return {**distance, "relative_to_spread_se": se}

    def noise(images: ImageSet) -> float:
        return float(
            np.median(
                [
                    background_noise(i, b.positions, psf_radius_px)
                    for i, b in zip(images.images, images.particles, strict=True)
                ]
            )
        )

    def lines(images: ImageSet) -> np.ndarray:
        return np.median(
            [line_pattern(i, b.positions, psf_radius_px) for i, b in zip(images.images, images.particles, strict=True)],
            axis=0,
        )

    gen_contrast, ref_contrast = contrasts(generated), contrasts(reference)
    classes = sorted(set(gen_contrast) | set(ref_contrast))
    no_values = [np.zeros(0)]
    no_bands = [None] * len(SURROUNDING_BANDS)
    gen_noise, ref_noise = noise(generated), noise(reference)
    gen_lines, ref_lines = lines(generated), lines(reference)
    gen_around, ref_around = (
        surroundings(i.images, [(b.positions, b.labels) for b in i.particles], psf_radius_px)
        for i in (generated, reference)
    )
    frequencies, gen_power = radial_power_spectrum(generated.images)
    _, ref_power = radial_power_spectrum(reference.images)
    worst_bin, worst_ratio = largest_spectrum_ratio(gen_power, ref_power)
    return {
        "peak_contrast": {
            str(k): contrast_distance(gen_contrast.get(k, no_values), ref_contrast.get(k, no_values)) for k in classes
        },
        "background_noise": {"generated": gen_noise, "reference": ref_noise, "ratio": gen_noise / ref_noise},
        "line_pattern": {
            name: {"generated": float(g), "reference": float(r), "ratio": float(g / r)}
            for name, g, r in zip(("columns", "rows"), gen_lines, ref_lines, strict=True)
        },
        "surroundings": {
            "bands_psf_radii": [list(band) for band in SURROUNDING_BANDS],
            "per_class": {
                str(k): {
                    "generated": gen_around.get(k),
                    "reference": ref_around.get(k),
                    "ratio": [
                        None if g is None or r is None else g / r
                        for g, r in zip(gen_around.get(k, no_bands), ref_around.get(k, no_bands), strict=True)
                    ],
                }
                for k in sorted(set(gen_around) | set(ref_around))
            },
        },
        "power_spectrum": {
            "distance_decades": spectrum_distance(gen_power, ref_power),
            "largest_ratio": {"frequency_cycles_per_px": float(frequencies[worst_bin]), "ratio": worst_ratio},
            "frequency_cycles_per_px": frequencies.tolist(),
            "generated": gen_power.tolist(),
            "reference": ref_power.tolist(),
        },
    }


def reference_floor(
    reference: ImageSet,
    params: SimulationParameters,
    seed: int = FLOOR_SEED,
    *,
    c2st_seed: int | None = None,
    classifier_seeds: int = 1,
) -> dict[str, Any]:
    """Physics statistics of a second, independent simulator set (masks and images from seeds ``seed``, ...)
    against ``reference``: the values that sampling alone gives at this number of images, so that a model's
    distance reads against the smallest one it could reach (peak contrast per class, background noise
    ratio, spectrum distance in decades and largest spectrum ratio). With ``c2st_seed`` also the two-sample
    classifier's accuracy between the two simulator sets (``c2st``, trained with that seed and the
    ``classifier_seeds - 1`` after it, :func:`~.c2st.repeated_two_sample_test`), its chance level at this size."""
    other = simulated_set(params, len(reference.images), seed)
    stats = physics_statistics(other, reference, detector_settings(params).psf_radius_px)
    out = {
        "seeds": f"{seed}..{seed + len(reference.images) - 1}",
        "peak_contrast": stats["peak_contrast"],
        "background_noise": stats["background_noise"],
        "line_pattern": stats["line_pattern"],
        "surroundings": stats["surroundings"],
        "spectrum_distance_decades": stats["power_spectrum"]["distance_decades"],
        "spectrum_largest_ratio": stats["power_spectrum"]["largest_ratio"],
    }
    if c2st_seed is not None:
        out["c2st"] = repeated_two_sample_test(other.images, reference.images, seed=c2st_seed, repeats=classifier_seeds)
    return out


def compare_image_sets(
    generated: ImageSet,
    reference: ImageSet,
    params: SimulationParameters,
    *,
    seed: int = 0,
    c2st: bool = True,
    classifier_seeds: int = 1,
) -> dict[str, Any]:
    """Mask fidelity of both sets (the reference's is the detector's ceiling), physics statistics and C2ST
    (classifier seeds ``seed``, ..., ``seed + classifier_seeds - 1``; see :func:`~.c2st.repeated_two_sample_test`)."""
    settings = detector_settings(params)
    # Matching tolerance and border strip: one PSF radius each.
    tolerance = border = settings.psf_radius_px
    out: dict[str, Any] = {
        "detector": {**settings.__dict__, "tolerance_px": tolerance, "border_px": border},
        "fidelity": fidelity(generated, settings, tolerance, border),
        "reference_fidelity": fidelity(reference, settings, tolerance, border),
        "physics": physics_statistics(generated, reference, settings.psf_radius_px),
    }
    if c2st:
        out["c2st"] = repeated_two_sample_test(generated.images, reference.images, seed=seed, repeats=classifier_seeds)
    return out


def simulation_parameters_for(model: Any, size: int | tuple[int, int] | None = None) -> SimulationParameters:
    """The simulator parameters a model was trained on (defaults when it was not trained on the simulator),
    with ``image_size`` replaced by ``size`` (px) when given; the classes must match the model's."""
    data = model.config.training.get("config", {}).get("data", {})
    values = dict(data.get("simulator") or {}) if data.get("source") == "simulator" else {}
    if size is not None:
        values["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
    if "pixel_size_nm" not in values and model.config.pixel_size_nm is not None:
        values["pixel_size_nm"] = model.config.pixel_size_nm
    params = SimulationParameters.from_dict(values)
    if params.num_labels != model.config.num_classes:
        raise ValueError(
            f"the model has {model.config.num_classes} mask classes but the simulator parameters give "
            f"{params.num_labels}; evaluate a model trained on simulator-like classes"
        )
    return params


def generated_images(
    model: Any, masks: np.ndarray, seeds: list[int], options: dict, stage: str, progress: Progress | None
) -> np.ndarray:
    """``generate`` for masks (N, H, W) with one seed each and keyword ``options``, reporting ``progress`` as
    ``stage``; float32 (N, H, W). ValueError for a model with more than one image channel."""

    def report(update: Any) -> None:
        if progress is not None:
            progress(stage, update.completed, update.total)

    images = generate(masks, model, seed=seeds, callback=report, **options)
    if images.ndim != 3:
        raise ValueError(f"the evaluation handles one-channel models; this one gives images of shape {images.shape}")
    return images


def evaluate_model(
    model: Any,
    *,
    n: int = DEFAULT_N,
    size: int | tuple[int, int] = 128,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    class_guidance: dict[int, float] | None = None,
    guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 8,
    diversity_masks: int = 8,
    diversity_seeds: int = 4,
    edited_masks: int = 16,
    c2st: bool = True,
    classifier_seeds: int = 1,
    floor: bool = True,
    params: SimulationParameters | None = None,
    reference: ImageSet | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Generate images for ``n`` held-out simulator masks and return every metric as a JSON-ready dict.

    Args:
        model: a checkpoint loaded with ``load_checkpoint``.
        n: masks (and reference images).
        size: image side or (H, W) in px.
        sampler: sampler name (see ``diffusion.samplers.SAMPLERS``; None: the model's default).
        steps: sampler steps (None: the model's default for the sampler, ``LoadedModel.default_steps``).
        guidance: guidance scale (None: the model's default).
        class_guidance: per-class guidance ``{label: w}`` (None: the model's default, ``{}``: none).
        guidance_interval: the guided noise levels (sigma_low, sigma_high) (None: the model's default,
            ``guidance.EVERY_NOISE_LEVEL``: every step).
        device: "auto", "cpu", "cuda", ...
        precision: "auto", "fp32", "bf16" or "fp16" (the network's arithmetic).
        batch_size: images per forward pass.
        seed: generation seed (image i gets ``seed + i``; diversity and edits use separate ranges).
        diversity_masks: masks for the diversity metric (0 skips it).
        diversity_seeds: seeds per mask for the diversity metric (at least 2).
        edited_masks: masks to edit (2 blobs moved, 2 added) and generate again (0 skips it).
        c2st: run the classifier two-sample test.
        classifier_seeds: run it with this many classifier seeds (``seed``, ``seed + 1``, ...) and report their
            spread (``c2st.over_seeds``), for the model and the two simulator sets; the first is ``c2st`` itself.
        floor: also measure the physics statistics of a second simulator set against the reference
            (:func:`reference_floor`), the values a perfect model would get at this ``n``.
        params: simulator parameters; None takes :func:`simulation_parameters_for`.
        reference: a precomputed reference set for ``params`` (curves reuse one).
        progress: called with (stage, done, total) during generation.
    """
    if classifier_seeds < 1:
        raise ValueError(f"classifier_seeds must be at least 1, got {classifier_seeds}")
    sampler, steps = model.sampler_and_steps(sampler, steps)
    grid = model.sigma_grid(sampler)
    params = params or simulation_parameters_for(model, size)
    reference = reference or simulated_set(params, n)
    n = len(reference.images)
    options = {
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "class_guidance": class_guidance,
        "guidance_interval": guidance_interval,
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
    }
    images = generated_images(model, reference.masks, [seed + i for i in range(n)], options, "generate", progress)
    generated = ImageSet(images, reference.masks, reference.particles)
    result = {
        "settings": {
            "n": n,
            "image_size": list(reference.images.shape[1:]),
            "sampler": sampler,
            "steps": steps,
            "sigma_grid": grid,
            "sigma_start": float(model.sampling_sigmas(sampler, steps)[0]),
            "sampler_options": model.sampler_options(sampler),
            "guidance": model.config.default_guidance if guidance is None else guidance,
            "class_guidance": format_class_guidance(
                model.config.default_class_guidance if class_guidance is None else class_guidance
            ),
            "guidance_interval": format_guidance_interval(
                model.config.default_guidance_interval if guidance_interval is None else guidance_interval
            ),
            "seed": seed,
            "classifier_seeds": classifier_seeds if c2st else 0,
            "reference_seeds": f"{HELD_OUT_SEED}..{HELD_OUT_SEED + n - 1}",
            "simulation": params.to_dict(),
        },
        **compare_image_sets(generated, reference, params, seed=seed, c2st=c2st, classifier_seeds=classifier_seeds),
    }
    if floor:
        result["reference_floor"] = reference_floor(
            reference, params, c2st_seed=seed if c2st else None, classifier_seeds=classifier_seeds
        )
    count = min(diversity_masks, n)
    if count > 0 and diversity_seeds >= 2:
        extra = [seed + s * _DIVERSITY_SEED_STRIDE + i for s in range(1, diversity_seeds) for i in range(count)]
        masks = np.concatenate([reference.masks[:count]] * (diversity_seeds - 1))
        more = generated_images(model, masks, extra, options, "diversity", progress)
        samples = np.concatenate([images[None, :count], more.reshape(diversity_seeds - 1, count, *images.shape[1:])])
        result["diversity"] = sample_diversity(samples.transpose(1, 0, 2, 3), float(np.std(reference.images)))
    count = min(edited_masks, n)
    if count > 0:
        result["edited_masks"] = _edited_mask_metrics(model, reference, params, count, seed, options, progress)
    return result


def _edited_mask_metrics(
    model: Any,
    reference: ImageSet,
    params: SimulationParameters,
    count: int,
    seed: int,
    options: dict,
    progress: Progress | None,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    edits = [
        edit_mask(m, rng, min_distance_px=2 * params.min_distance, num_classes=params.num_labels)
        for m in reference.masks[:count]
    ]
    masks = np.stack([e.mask for e in edits])
    seeds = [seed + _EDIT_SEED_OFFSET + i for i in range(count)]
    images = generated_images(model, masks, seeds, options, "edits", progress)
    settings = detector_settings(params)
    detections = [detect_particles(image, settings).positions for image in images]
    edited = ImageSet.from_arrays(images, masks)
    return {
        **edit_scores(detections, edits, settings.psf_radius_px),
        "fidelity": fidelity(edited, settings, settings.psf_radius_px, settings.psf_radius_px),
    }


CURVE_METRICS: tuple[str, ...] = ("f1_all", "c2st_accuracy", "noise_ratio", "spectrum_distance_decades")


def _curve_point(result: dict[str, Any]) -> dict[str, Any]:
    physics = result["physics"]
    point = {
        "f1_all": result["fidelity"]["all"]["f1"],
        "c2st_accuracy": result.get("c2st", {}).get("accuracy"),
        "noise_ratio": physics["background_noise"]["ratio"],
        "spectrum_distance_decades": physics["power_spectrum"]["distance_decades"],
    }
    for k, scores in result["fidelity"]["per_class"].items():
        point[f"f1_class_{k}"] = scores["f1"]
    for k, distance in physics["peak_contrast"].items():
        point[f"contrast_w_rel_class_{k}"] = distance["relative_to_spread"]
    return point


def metric_curves(
    model: Any,
    *,
    samplers: Sequence[str] | None = None,
    steps: Sequence[int] = (5, 10, 20, 50),
    guidances: Sequence[float] = (0.0, 1.0, 1.5, 2.0, 3.0),
    guidance_sampler: str | None = None,
    guidance_steps: int | None = None,
    n: int = 16,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 8,
    c2st: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Metrics against steps for each sampler and against guidance scale, on one shared reference set.

    The steps curves use the model's guidance (with its per-class guidance); the guidance curve guides every
    pixel with the one scale (no per-class guidance), so that it shows how each class responds to it. The
    guidance curve runs ``guidance_sampler`` at ``guidance_steps`` (None: the model's default sampler and its
    default steps for it)."""
    guidance_sampler, guidance_steps = model.sampler_and_steps(guidance_sampler, guidance_steps)
    params = simulation_parameters_for(model, size)
    reference = simulated_set(params, n)
    common = {
        "n": n,
        "seed": seed,
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
        "diversity_masks": 0,
        "edited_masks": 0,
        "c2st": c2st,
        "floor": False,
        "params": params,
        "reference": reference,
        "progress": progress,
    }
    by_steps = {
        name: [{"steps": s, **_curve_point(evaluate_model(model, sampler=name, steps=s, **common))} for s in steps]
        for name in (samplers or list(SAMPLERS))
    }
    by_guidance = [
        {
            "guidance": g,
            **_curve_point(
                evaluate_model(
                    model, sampler=guidance_sampler, steps=guidance_steps, guidance=g, class_guidance={}, **common
                )
            ),
        }
        for g in guidances
    ]
    return {
        "settings": {"n": n, "image_size": list(reference.images.shape[1:]), "seed": seed},
        "reference_floor": reference_floor(reference, params),
        "steps": by_steps,
        "guidance": {"sampler": guidance_sampler, "steps": guidance_steps, "points": by_guidance},
    }


def write_curves(curves: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``curves.json``, a markdown table ``curves.md`` and two labelled figures, ``steps.png`` (every metric
    against steps, a line per sampler) and ``guidance.png`` (against the guidance scale); returns the files written."""
    from .plots import write_curve_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "curves.json"]
    atomic_write_text(written[0], _to_json(curves))
    series = {f"steps_{name}": ("steps", points) for name, points in curves["steps"].items()}
    series["guidance"] = ("guidance", curves["guidance"]["points"])
    lines = ["# Metrics against sampler steps and guidance", ""]
    if "reference_floor" in curves:
        floor = curves["reference_floor"]
        contrast = ", ".join(f"class {k} {_cell(v['relative_to_spread'])}" for k, v in floor["peak_contrast"].items())
        lines += [
            "A second simulator set against the reference (what sampling alone gives at this n): "
            f"contrast W / spread {contrast}; noise ratio {_cell(floor['background_noise']['ratio'])}; "
            f"spectrum distance {_cell(floor['spectrum_distance_decades'])} decades.",
            "",
        ]
    for title, (axis, points) in series.items():
        metrics = [key for key in points[0] if key != axis]
        lines += [f"## {title}", "", "| " + " | ".join([axis, *metrics]) + " |", "|" + "---|" * (len(metrics) + 1)]
        lines += ["| " + " | ".join(_cell(p[key]) for key in [axis, *metrics]) + " |" for p in points]
        lines.append("")
    atomic_write_text(out / "curves.md", "\n".join(lines))
    written.append(out / "curves.md")
    return written + write_curve_figures(curves, out)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _to_json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def run_metadata() -> dict[str, Any]:
    """Commit (``git describe``, None outside a git checkout), package version and machine description."""
    import torch

    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "commit": described,
        "package_version": __version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "gpus": gpus,
        },
    }
