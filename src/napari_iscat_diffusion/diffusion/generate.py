"""``generate()``: label masks in, synthetic images out. The plugin, the command line and the benchmarks call this."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .conditioning import encode_condition, null_condition, validate_mask
from .denoiser import ConditionalDenoiser
from .device import resolve_device
from .guidance import (
    check_class_guidance,
    check_guidance_interval,
    check_guidance_scale,
    guidance_scale_map,
    guided_denoiser,
)
from .loaded_model import LoadedModel
from .model_config import ModelConfig
from .particle_contrast import ContrastPrior, blob_peaks, check_given_contrasts, paint_blobs, particle_blobs
from .samplers import SamplingCancelled, check_steps, get_sampler
from .tiling import auto_tile_size, check_tiling, needs_tiling, tiled_denoiser

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
# A torch.Generator takes seeds up to 2**64 - 1 but draws the same numbers for seed s and s + 2**63, so larger
# seeds would repeat smaller ones' images; a negative one would alias a large one.
LARGEST_SEED = 2**63 - 1


class NonFiniteImageError(ValueError):
    """Generation gave NaN or infinite pixels; the message names the likely cause. No such image is returned."""


@dataclass(frozen=True)
class GenerationProgress:
    """What ``generate`` reports after each sampler step.

    Attributes:
        completed: sampler steps done so far over all batches (1 after the first step).
        total: sampler steps over all batches.
        step: the step within the current batch (0-based).
        image_indices: the indices (into the input masks) of the images in the current batch.
        denoised: the current prediction of the clean images, (B, C, H, W), normalised units, on the device.
        mean, std: per-channel normalisation statistics, to turn ``denoised`` into physical units.
    """

    completed: int
    total: int
    step: int
    image_indices: range
    denoised: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def denoised_images(self) -> np.ndarray:
        """The predicted clean images of this batch in physical units, float32 numpy (B, C, H, W)."""
        return _to_physical(self.denoised, self.mean, self.std)


ProgressCallback = Callable[[GenerationProgress], "bool | None"]


def generate(
    mask: np.ndarray,
    model: LoadedModel,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    class_guidance: Mapping[int, float] | None = None,
    guidance_interval: tuple[float, float] | None = None,
    seed: int | Sequence[int] = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int = 4,
    callback: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    tile_size: int | str | None = "auto",
    tile_overlap: int | None = None,
    particle_contrast: np.ndarray | None = None,
) -> np.ndarray:
    """Sample synthetic images that follow label masks.

    Args:
        mask: label image (H, W) or batch (N, H, W); 0 = background, 1..K = particle classes.
        model: a checkpoint loaded with ``load_checkpoint``.
        sampler: one of ``samplers.SAMPLERS`` ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "euler",
            "heun"); None takes the model's default (``LoadedModel.default_sampler``).
        steps: sampler steps; None takes the model's default for the sampler (``LoadedModel.default_steps``).
        guidance: classifier-free guidance scale w (1 = conditional only, 0 = unconditional);
            None takes the model's default.
        class_guidance: per-class scales ``{label: w}`` that replace ``guidance`` around the particles of
            those classes (``guidance.guidance_scale_map``); None takes the model's
            ``default_class_guidance``, ``{}`` guides every pixel with ``guidance``.
        guidance_interval: (sigma_low, sigma_high), noise levels in the model's normalised units: guide only
            where ``sigma_low < sigma <= sigma_high`` and run the conditional branch alone at the other steps,
            which then cost one network pass instead of two (``guidance.guided_denoiser``); None takes the
            model's ``default_guidance_interval``, ``guidance.EVERY_NOISE_LEVEL`` guides every step.
        seed: an int (image i gets seed + i) or one seed per image. The same seed and mask give
            the same image whatever the batch size.
        device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".
        precision: "auto" (bf16 on CUDA, fp32 elsewhere), "fp32", "bf16" or "fp16" (network only;
            the sampler arithmetic stays in fp32).
        batch_size: images per forward pass (guidance doubles the pass internally).
        callback: called after every sampler step with a ``GenerationProgress``; returning True
            stops generation with ``SamplingCancelled``.
        should_stop: polled before every network call, so before every tile of a tiled mask; returning
            True stops generation with ``SamplingCancelled`` within one tile's forward pass rather than
            at the end of a sampler step, which on a CPU can take minutes for a large mask.
        tile_size: masks larger than this (in H or W) are denoised in overlapping tiles of this
            side, blended smoothly inside every denoiser call, so memory stays bounded at any mask
            size (see ``tiling.py``); "auto" picks it from the network (256 for the default model,
            see ``tiling.auto_tile_size``); None or 0 runs the whole image through the network at once.
        tile_overlap: pixels shared by neighbouring tiles, at most ``tile_size / 2``; None takes
            ``tile_size // 4``.
        particle_contrast: for a model with a contrast channel (``UNetConfig.contrast_channel``), each particle's
            signed peak contrast in the images' physical units (above the local background): an array of the mask's
            shape whose value of largest magnitude over a particle's blob is that particle's; a particle whose
            blob holds only NaN, and every particle where this is None, gets one drawn from the model's
            distribution for its class (``ModelConfig.particle_contrast``) with the image's seed. Guidance other
            than 1 extrapolates away from the unconditional branch, which knows no contrast, so guided particles
            come out brighter than given.

    Returns:
        float32 images in the physical units of the training data: (H, W) for a single (H, W) mask
        of a one-channel model, (N, H, W) for a batch; with C > 1 image channels (C, H, W) or
        (N, C, H, W).

    Raises:
        ValueError: for a bad mask, sampler, step count, guidance, seed list, device, precision, batch size or
            particle contrast.
        NonFiniteImageError: (a ValueError) when an image came out with NaN or infinite pixels, for example from a
            network that overflows in fp16 or a damaged checkpoint.
        SamplingCancelled: when the callback or ``should_stop`` asked to stop.
    """
    config = model.config
    labels = validate_mask(mask, config.num_classes)
    num_images = labels.shape[0]
    sampler, steps = model.sampler_and_steps(sampler, steps)
    info = get_sampler(sampler)
    check_steps(steps, model.schedule.num_timesteps)
    if guidance is None:
        guidance = check_guidance_scale(config.default_guidance, name="the checkpoint's default guidance")
    else:
        guidance = check_guidance_scale(guidance)
    class_scales = check_class_guidance(
        config.default_class_guidance if class_guidance is None else class_guidance, config.num_classes
    )
    interval = check_guidance_interval(
        config.default_guidance_interval if guidance_interval is None else guidance_interval
    )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tile_size == "auto":
        tile_size = auto_tile_size(config.unet)
    if tile_overlap is None:
        tile_overlap = tile_size // 4 if isinstance(tile_size, int) else 0
    check_tiling(tile_size, tile_overlap)
    seeds = _seeds_per_image(seed, num_images)
    prior = config.particle_contrast
    given_peaks = None if particle_contrast is None else _given_peaks(particle_contrast, labels, config)
    torch_device = resolve_device(device)
    precision = _resolve_precision(torch_device, precision)
    autocast = _autocast(torch_device, precision)

    sigmas = model.sampling_sigmas(sampler, steps)
    # Where guidance switches on or off, the prediction jumps; a multistep sampler must not extrapolate across.
    guides = guidance != 1.0 or any(scale != 1.0 for scale in class_scales.values())
    breaks = [level for level in interval if 0 < level < math.inf] if guides else []
    options = model.sampler_options(sampler)
    if info.multistep and breaks:
        options["breaks"] = breaks
    model.to(torch_device)
    finished = 0  # sampler steps finished in the current batch
    height, width = labels.shape[1:]

    cond_denoise: ConditionalDenoiser = model.denoiser()
    if should_stop is not None:
        cond_denoise = _stoppable(cond_denoise, should_stop, lambda: finished - 1)
    if needs_tiling(height, width, tile_size):
        align = 2 ** (len(config.unet.channel_mults) - 1)
        cond_denoise = tiled_denoiser(cond_denoise, tile_size, tile_overlap, align)
    mean = torch.tensor(config.normalization["mean"], dtype=torch.float32, device=torch_device).view(1, -1, 1, 1)
    std = torch.tensor(config.normalization["std"], dtype=torch.float32, device=torch_device).view(1, -1, 1, 1)
    channels = config.image_channels
    total = steps * math.ceil(num_images / batch_size)
    outputs = []
    completed = 0
    try:
        with torch.inference_mode(), autocast:
            for indices in _batches(num_images, batch_size):
                finished = 0
                first_non_finite = torch.tensor(-1, device=torch_device)
                generators = [torch.Generator().manual_seed(seeds[i]) for i in indices]
                noise = torch.stack([torch.randn(channels, height, width, generator=g) for g in generators])
                x = noise.to(torch_device) * math.sqrt(1.0 + float(sigmas[0]) ** 2)
                batch_labels = labels[indices.start : indices.stop]
                contrast = None
                if prior is not None:
                    given = None if given_peaks is None else given_peaks[indices.start : indices.stop]
                    contrast = _contrast_channel(batch_labels, prior, generators, given).to(torch_device)
                cond = encode_condition(
                    torch.from_numpy(batch_labels).to(torch_device), config.num_classes, contrast=contrast
                )
                null = null_condition(cond)
                scale_map = guidance_scale_map(batch_labels, guidance, class_scales)
                scale = guidance if scale_map is None else torch.from_numpy(scale_map).to(torch_device)
                denoise = guided_denoiser(cond_denoise, cond, null, scale, interval)

                def on_step(step: int, x_step: torch.Tensor, denoised: torch.Tensor, indices: range = indices) -> bool:
                    nonlocal completed, finished, first_non_finite
                    completed += 1
                    finished = step + 1
                    first_non_finite = _track_non_finite(first_non_finite, x_step, step)
                    if callback is None:
                        return False
                    report = GenerationProgress(completed, total, step, indices, denoised, mean, std)
                    return bool(callback(report))

                sample = info.function(denoise, x, sigmas, generators=generators, callback=on_step, **options)
                batch_images = _to_physical(sample, mean, std)
                bad = np.flatnonzero(~np.isfinite(batch_images).reshape(len(batch_images), -1).all(axis=1))
                if len(bad):
                    cause = _non_finite_cause(int(first_non_finite), precision, given_peaks is not None, config)
                    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                    raise NonFiniteImageError(
                        f"generation gave NaN or infinite pixels in image {indices[bad[0]]}{more} (sampler {sampler}, "
                        f"{steps} steps, guidance {guidance:g}, precision {precision}): {cause}"
                    )
                outputs.append(batch_images)
    finally:
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    images = np.concatenate(outputs)
    if channels == 1:
        images = images[:, 0]
    return images[0] if np.asarray(mask).ndim == 2 else images


def _given_peaks(particle_contrast: np.ndarray, labels: np.ndarray, config: ModelConfig) -> list[np.ndarray]:
    """Each image's particles' given peaks (``particle_blobs`` order) in normalised units, NaN where not given."""
    values = check_given_contrasts(particle_contrast, labels.shape, config.particle_contrast)
    # A peak above the local background: the normalisation's mean drops out, its scale does not.
    std = config.normalization["std"][0]
    return [blob_peaks(particle_blobs(mask)[0], image) / std for mask, image in zip(labels, values, strict=True)]


def _contrast_channel(
    labels: np.ndarray,
    prior: ContrastPrior,
    generators: list[torch.Generator],
    given: list[np.ndarray] | None,
) -> torch.Tensor:
    """The contrast channel (N, H, W) for int label masks (N, H, W), in the channel's units
    (``ContrastPrior.to_channel``): each particle's given peak (normalised units) where finite, else drawn from the
    prior with its image's generator (after the image's starting noise; every particle's number is drawn, so that
    giving some leaves the others as they were)."""
    maps = []
    for i, (mask, generator) in enumerate(zip(labels, generators, strict=True)):
        blobs, classes = particle_blobs(mask)
        peaks = prior.draw(classes, generator)
        if given is not None:
            peaks = np.where(np.isfinite(given[i]), given[i], peaks)
        maps.append(paint_blobs(blobs, prior.to_channel(peaks, classes)))
    return torch.from_numpy(np.stack(maps))


def _stoppable(
    cond_denoise: ConditionalDenoiser, should_stop: Callable[[], bool], last_step: Callable[[], int]
) -> ConditionalDenoiser:
    """``cond_denoise`` that first raises ``SamplingCancelled(last_step())`` when ``should_stop()`` is True.

    Wrapped inside the tiled denoiser it is polled before every tile, not only once per sampler step.
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if should_stop():
            raise SamplingCancelled(last_step())
        return cond_denoise(x, sigma, cond)

    return denoise


def _track_non_finite(first: torch.Tensor, x: torch.Tensor, step: int) -> torch.Tensor:
    """``first``, the first step (-1: none yet) after which the images ``x`` held NaN or infinity, brought up to date
    after ``step``; on the device, so that no step waits for it."""
    return torch.where((first < 0) & ~torch.isfinite(x).all(), step, first)


def _non_finite_cause(step: int, precision: str, contrasts_given: bool, config: ModelConfig) -> str:
    """The likely cause of non-finite images whose sampler first went non-finite after ``step`` (-1: never, so the
    normalisation to physical units overflowed)."""
    if step < 0:
        norm = config.normalization
        return (
            f"the checkpoint's normalisation (mean {norm['mean']}, std {norm['std']}) takes the images beyond "
            "float32's range; the checkpoint is damaged or its normalisation is wrong"
        )
    where = f"the sampler's images became NaN or infinite at step {step + 1}"
    if precision == "fp16":
        return f"{where}: the network overflows fp16's range; use precision fp32 or bf16"
    if contrasts_given:
        return f"{where}: the given particle contrasts may be far too large for this model"
    return f"{where}: the network's predictions overflowed; the checkpoint may be damaged or its training diverged"


def _to_physical(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    return (images.float() * std + mean).cpu().numpy().astype(np.float32, copy=False)


def _seeds_per_image(seed: int | Sequence[int], num_images: int) -> list[int]:
    if isinstance(seed, (int, np.integer)):
        seeds = [int(seed) + i for i in range(num_images)]
    else:
        seeds = [int(s) for s in seed]
    if len(seeds) != num_images:
        raise ValueError(f"got {len(seeds)} seeds for {num_images} masks; give one seed per mask or a single int")
    wrong = next((i for i, s in enumerate(seeds) if not 0 <= s <= LARGEST_SEED), None)
    if wrong is not None:
        raise ValueError(
            f"seed {seeds[wrong]} of image {wrong} is out of range; seeds are whole numbers from 0 to 2**63 - 1"
        )
    return seeds


def _resolve_precision(device: torch.device, precision: str) -> str:
    """The precision that "auto" stands for on ``device`` (bf16 on CUDA where supported, else fp32), or the one
    given; ValueError for an unknown name."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (``_resolve_precision``) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu":
        raise ValueError(f"precision {precision!r} is not supported on the CPU (it is far slower there); use 'fp32'")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(num_images: int, batch_size: int) -> Iterator[range]:
    for first in range(0, num_images, batch_size):
        yield range(first, min(first + batch_size, num_images))
