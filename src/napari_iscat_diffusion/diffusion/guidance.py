"""Classifier-free guidance (Ho and Salimans 2022) as one batched forward pass, optionally per particle class.

With guidance scale ``w`` the guided prediction is ``x0 = x0_uncond + w * (x0_cond - x0_uncond)``.
At a fixed ``x`` and ``sigma``, eps, v and x0 are affine in one another, so guiding x0 is the same
as guiding eps. ``w = 1`` runs the conditional branch only and ``w = 0`` the unconditional branch
only; any other ``w`` runs both branches as one batch of 2N.

Guidance may also be limited to an interval of noise levels (Kynkäänniemi et al. 2024, "Applying guidance in a
limited interval improves sample and distribution quality in diffusion models"): at the highest levels it narrows
the spread of what is drawn and at the lowest it adds little, while each guided step costs two network passes.
Outside the interval the conditional branch runs alone.

``w`` may also be a map, one scale per pixel (``guidance_scale_map``): around the particles of a class it
takes that class's scale. A small network under-draws some classes and over-draws others at any one scale
(docs/model-card.md); per-class scales let each class, and the background, be guided as much as it needs.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .conditioning import CLASS_ZONE_REACH_PX, class_zone
from .denoiser import ConditionalDenoiser, Denoiser

_ENTRY = re.compile(r"^\s*(\d+)\s*[=:]\s*([^,\s]+)\s*$")
# The largest guidance scale accepted: useful scales are 1-5, and far above this the guided prediction
# (x0_uncond + w * difference) runs out of float32's range and the image becomes NaN.
MAX_GUIDANCE = 100.0


def check_guidance_scale(value: object, *, name: str = "guidance") -> float:
    """``value`` as a float if it is a number from 0 to ``MAX_GUIDANCE``; ValueError naming ``name`` otherwise."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not 0 <= value <= MAX_GUIDANCE:  # False for NaN
        raise ValueError(f"{name} must be a finite number >= 0 and at most {MAX_GUIDANCE:g}, got {reprlib.repr(value)}")
    return float(value)


def check_class_guidance(class_scales: Mapping, num_classes: int, *, name: str = "class guidance") -> dict[int, float]:
    """Validate per-class guidance scales ``{label: w}`` for labels 1..``num_classes`` (0 to ``MAX_GUIDANCE``).

    Returns them as ``{int: float}`` sorted by label; string labels ("1") are accepted (JSON keys).
    Raises ValueError naming ``name`` and the bad entry.
    """
    if not isinstance(class_scales, Mapping):
        raise ValueError(f"{name}: must map class labels to guidance scales, got {type(class_scales).__name__}")
    checked: dict[int, float] = {}
    for key, value in class_scales.items():
        label = int(key) if isinstance(key, str) and key.strip().isdecimal() else key
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 1 <= label <= num_classes:
            raise ValueError(f"{name}: {reprlib.repr(key)} is not a particle class; expected labels 1..{num_classes}")
        checked[int(label)] = check_guidance_scale(value, name=f"{name}: the scale of class {label}")
    return dict(sorted(checked.items()))


def parse_class_guidance(text: str) -> dict[int, float]:
    """Parse per-class guidance scales written as ``"1=1.0, 3=2.0"`` (label=scale, comma separated).

    An empty string or ``"none"`` gives ``{}`` (every class at the one guidance scale). Labels are not checked
    against a model here (see ``check_class_guidance``). Raises ValueError quoting the entry it cannot read.
    """
    if text.strip().lower() in ("", "none"):
        return {}
    scales: dict[int, float] = {}
    for entry in text.split(","):
        match = _ENTRY.match(entry)
        if match is None:
            raise ValueError(f"class guidance: cannot read {entry.strip()!r}; write label=scale pairs like 1=1.0,3=2")
        label = int(match.group(1))
        try:
            scale = float(match.group(2))
        except ValueError:
            raise ValueError(f"class guidance: {match.group(2)!r} (class {label}) is not a number") from None
        if label in scales:
            raise ValueError(f"class guidance: class {label} is given twice")
        scales[label] = scale
    return scales


def format_class_guidance(class_scales: Mapping[int, float]) -> str:
    """``{1: 1.0, 3: 2.0}`` as ``"1=1, 3=2"``, the form ``parse_class_guidance`` reads ("" for none)."""
    return ", ".join(f"{label}={scale:g}" for label, scale in sorted(class_scales.items()))


EVERY_NOISE_LEVEL: tuple[float, float] = (0.0, math.inf)


def check_guidance_interval(
    interval: Sequence[float] | None, *, name: str = "guidance interval"
) -> tuple[float, float]:
    """Validate a guidance interval ``(sigma_low, sigma_high)``: noise levels in the model's normalised units with
    ``0 <= sigma_low < sigma_high`` (``sigma_high`` may be ``inf``). None means every level, ``EVERY_NOISE_LEVEL``.

    Returns the pair as floats; raises ValueError naming ``name`` and the bad value.
    """
    if interval is None:
        return EVERY_NOISE_LEVEL
    try:
        if isinstance(interval, str):
            raise TypeError
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected two noise levels (low, high), got {interval!r}") from None
    if not (math.isfinite(low) and low >= 0 and high > low) or math.isnan(high):
        raise ValueError(f"{name}: expected 0 <= low < high, got ({low:g}, {high:g})")
    return low, high


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """Parse a guidance interval written as ``"2,45"`` (sigma_low, sigma_high); ``"all"`` or ``"none"`` give
    ``EVERY_NOISE_LEVEL``. Raises ValueError quoting what it cannot read."""
    if text.strip().lower() in ("all", "none"):
        return EVERY_NOISE_LEVEL
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise ValueError(f"guidance interval: cannot read {text.strip()!r}; write low,high like 2,45 or 'all'")
    return check_guidance_interval(values)


def format_guidance_interval(interval: Sequence[float] | None) -> str:
    """``(2, 45)`` as ``"2,45"``, the form ``parse_guidance_interval`` reads; every level as ``"all"``."""
    low, high = check_guidance_interval(interval)
    return "all" if (low, high) == EVERY_NOISE_LEVEL else f"{low:g},{high:g}"


def guidance_scale_map(
    labels: np.ndarray,
    scale: float,
    class_scales: Mapping[int, float],
    reach_px: float = CLASS_ZONE_REACH_PX,
) -> np.ndarray | None:
    """Per-pixel guidance scales for label masks.

    Args:
        labels: int label masks (N, H, W); 0 = background, 1..K = particle classes.
        scale: guidance scale of the background and of classes not in ``class_scales``.
        class_scales: ``{label: w}``; pixels within ``reach_px`` of that label take ``w``, and the weight falls
            linearly to 0 at ``2 * reach_px`` (px). Where the zones of several classes overlap, their scales
            are averaged by weight.
        reach_px: distance in pixels (> 0).

    Returns:
        float32 (N, 1, H, W) scales, or None when every pixel would get ``scale`` (no class zone differs).
    """
    labels = np.asarray(labels)
    differing = {k: w for k, w in class_scales.items() if w != scale and np.any(labels == k)}
    if not differing:
        return None
    weighted = np.zeros(labels.shape, np.float64)
    weights = np.zeros(labels.shape, np.float64)
    for label, class_scale in differing.items():
        weight = class_zone(labels, [label], reach_px)
        weighted += weight * class_scale
        weights += weight
    # Inside a zone the class scales take over; on its ramp the background's share is what is left.
    background = np.clip(1.0 - weights, 0.0, None)
    scales = (weighted + background * scale) / np.maximum(weights + background, 1e-12)
    return scales[:, None].astype(np.float32)


def guided_denoiser(
    cond_denoise: ConditionalDenoiser,
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    scale: float | torch.Tensor,
    interval: tuple[float, float] = EVERY_NOISE_LEVEL,
) -> Denoiser:
    """Bind a condition to a conditional denoiser, with classifier-free guidance.

    Args:
        cond_denoise: ``cond_denoise(x, sigma, cond) -> x0_hat``, for example a ``DiscreteTimeDenoiser``.
        cond: the condition (N, K+1, H, W).
        null_cond: the unconditional input of the same shape (see ``conditioning.null_condition``).
        scale: guidance scale w, or per-pixel scales (N, 1, H, W) on the condition's device
            (``guidance_scale_map``).
        interval: (sigma_low, sigma_high): guide only at noise levels ``sigma_low < sigma <= sigma_high`` (the
            model's normalised units) and run the conditional branch alone elsewhere.

    Returns:
        A denoiser ``denoise(x, sigma) -> x0_hat`` for x (N, C, H, W) and sigma (N,).
    """
    if cond.shape != null_cond.shape:
        raise ValueError(f"cond and null_cond differ in shape: {tuple(cond.shape)} and {tuple(null_cond.shape)}")
    low, high = check_guidance_interval(interval)
    everywhere = (low, high) == EVERY_NOISE_LEVEL
    if isinstance(scale, torch.Tensor):
        expected = (cond.shape[0], 1, *cond.shape[2:])
        if tuple(scale.shape) != expected:
            raise ValueError(f"a guidance map must have shape {expected}, got {tuple(scale.shape)}")
    else:
        scale = float(scale)

        if scale == 1.0:

            def conditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return cond_denoise(x, sigma, cond)

            return conditional

        if scale == 0.0 and everywhere:

            def unconditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return cond_denoise(x, sigma, null_cond)

            return unconditional

    both = torch.cat([cond, null_cond])

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # Every level guided: no test of sigma, whose bool() would wait for the device at every step.
        inside = None if everywhere else (sigma > low) & (sigma <= high)
        if inside is not None and not bool(inside.any()):
            return cond_denoise(x, sigma, cond)
        x0_cond, x0_uncond = cond_denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        x0 = x0_uncond + scale * (x0_cond - x0_uncond)
        if inside is None or bool(inside.all()):
            return x0
        return torch.where(inside.view(-1, *[1] * (x.ndim - 1)), x0, x0_cond)

    return guided
