"""Synthetic images for masks with planes and samples, iSCAT contrast limits and provenance.

Pure numpy and the diffusion core (no napari or Qt): the plugin's widgets, batch export and the
command line share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from . import __version__
from .diffusion import GenerationProgress, LoadedModel, generate, validate_mask
from .diffusion.guidance import (
    check_class_guidance,
    check_guidance_interval,
    format_class_guidance,
    format_guidance_interval,
)
from .diffusion.particle_contrast import check_given_contrasts

# Robust half-width of the displayed range: this percentile of |image - median| keeps a few bright
# particles from washing out the background while the range stays symmetric (iSCAT contrast has both signs).
_CONTRAST_PERCENTILE = 99.5


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler (None: the model's default), steps (None: the model's default for the sampler), guidance,
    per-class guidance ``{label: w}`` and the noise levels ``(sigma_low, sigma_high)`` that are guided (None: the
    model's), first seed, device, precision, batch size."""

    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    class_guidance: Mapping[int, float] | None = None
    guidance_interval: tuple[float, float] | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 4

    def resolved(self, model: LoadedModel) -> SamplerSettings:
        """These settings with the defaults filled in (the values that provenance records)."""
        sampler, steps = model.sampler_and_steps(self.sampler, self.steps)
        guidance = model.config.default_guidance if self.guidance is None else float(self.guidance)
        class_guidance = model.config.default_class_guidance if self.class_guidance is None else self.class_guidance
        class_guidance = check_class_guidance(class_guidance, model.config.num_classes)
        interval = check_guidance_interval(
            model.config.default_guidance_interval if self.guidance_interval is None else self.guidance_interval
        )
        return dataclasses.replace(
            self,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            class_guidance=class_guidance,
            guidance_interval=interval,
        )


def provenance(model: LoadedModel, settings: SamplerSettings, *, seed: int, source: str) -> dict:
    """What made an image: seed, checkpoint sha256 and file, sampler settings, package version, source mask."""
    settings = settings.resolved(model)
    return {
        "seed": int(seed),
        "checkpoint_sha256": model.sha256,
        "checkpoint": "" if model.path is None else model.path.name,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "class_guidance": format_class_guidance(settings.class_guidance),
        "guidance_interval": format_guidance_interval(settings.guidance_interval),
        "precision": settings.precision,
        "package_version": __version__,
        "source_mask": source,
    }


@dataclass(frozen=True)
class Synthesis:
    """Images for one mask.

    Attributes:
        images: float32; the mask's shape (H, W) or (P, H, W), with a leading samples axis when more than one
            sample was asked for and an image-channel axis before (H, W) for multi-channel models.
        denoising_steps: (steps, [C,] H, W) predicted clean image of the first image after each step, or None.
    """

    images: np.ndarray
    denoising_steps: np.ndarray | None


def synthesize(
    mask: np.ndarray,
    model: LoadedModel,
    settings: SamplerSettings,
    *,
    samples: int = 1,
    keep_steps: bool = False,
    callback: Callable[[GenerationProgress], bool | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    name: str = "mask",
    particle_contrast: np.ndarray | None = None,
    contrast_name: str = "particle contrast",
) -> Synthesis:
    """Generate ``samples`` images for a 2-D mask (H, W) or one per plane of a 3-D mask (P, H, W).

    Sample ``s`` of plane ``p`` gets seed ``settings.seed + s * P + p``. ``callback`` is ``generate``'s
    (return True to cancel after a step), and so is ``should_stop`` (return True to cancel before the next
    tile). ``particle_contrast``, of the mask's shape, sets particles' peak contrasts for a model with a
    contrast channel (``generate``'s), the same for every sample. Raises ValueError for a bad mask (``name``
    identifies it), bad settings or bad contrasts (``contrast_name`` identifies them), SamplingCancelled when
    cancelled.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    array = np.asarray(mask)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{name}: has {array.ndim} dimensions (shape {array.shape}); expected (H, W) or a stack (Z or T, H, W)"
        )
    planes = validate_mask(array, model.config.num_classes, name=name)  # (P, H, W)
    batch = np.concatenate([planes] * samples)
    contrasts = None
    if particle_contrast is not None:
        given = check_given_contrasts(particle_contrast, planes.shape, model.config.particle_contrast, contrast_name)
        contrasts = np.concatenate([given] * samples)
    steps: list[np.ndarray] = []

    def on_step(progress: GenerationProgress) -> bool:
        if keep_steps and progress.image_indices.start == 0:
            first = progress.denoised_images()[0]  # (C, H, W)
            steps.append(first[0] if len(first) == 1 else first)
        return bool(callback(progress)) if callback is not None else False

    s = settings
    images = generate(
        batch,
        model,
        sampler=s.sampler,
        steps=s.steps,
        guidance=s.guidance,
        class_guidance=s.class_guidance,
        guidance_interval=s.guidance_interval,
        seed=s.seed,
        device=s.device,
        precision=s.precision,
        batch_size=s.batch_size,
        callback=on_step,
        should_stop=should_stop,
        particle_contrast=contrasts,
    )
    images = images.reshape(samples, len(planes), *images.shape[1:])
    if array.ndim == 2:
        images = images[:, 0]
    if samples == 1:
        images = images[0]
    return Synthesis(images, np.stack(steps) if keep_steps else None)


def contrast_limits(image: np.ndarray) -> tuple[float, float]:
    """Display range symmetric around the median, half-width a robust percentile of the deviations."""
    values = np.asarray(image, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    centre = float(np.median(values))
    half = float(np.percentile(np.abs(values - centre), _CONTRAST_PERCENTILE))
    if half <= 0:  # a flat image: any non-empty range shows it
        half = max(abs(centre) * 1e-3, 1e-6)
    return (centre - half, centre + half)
