"""The particle-free part of an iSCAT image: static speckle, illumination envelope and the camera.

Intensities here are relative to the local reference intensity: the detected intensity is
``photons_per_pixel * envelope * |1 + S + A|^2`` with ``S`` the speckle field and ``A`` the particles' field.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .optics import Optics, pupil


@lru_cache(maxsize=8)
def _speckle_pupil(optics: Optics, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices, weights and ``k_z - k_m`` (rad/nm) of the frequencies inside the pupil of a ``shape`` image."""
    weights, kz_offset = pupil(optics, shape)
    inside = np.flatnonzero(weights > 0)
    return inside, weights.ravel()[inside], kz_offset.ravel()[inside]


def speckle_field(
    optics: Optics, shape: tuple[int, int], strength: float, focus_nm: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Static speckle from coverslip roughness: a complex Gaussian field band-limited by the pupil.

    The roughness scatterers sit on the interface (height 0), so the same random spectrum is seen defocused by
    ``-f`` in each focal plane ``f``.

    Args:
        optics: the microscope.
        shape: (H, W) image size (px).
        strength: standard deviation of the speckle in the contrast image (``2 Re S``), dimensionless.
        focus_nm: (Z,) focal-plane heights (nm).
        rng: random generator.

    Returns:
        (Z, H, W) complex64 field relative to the reference.
    """
    height, width = shape
    inside, weights, kz_offset = _speckle_pupil(optics, shape)
    noise = rng.standard_normal((2, len(inside)))
    spectrum = (noise[0] + 1j * noise[1]) * weights
    # ifft2 of complex normals (E|x|^2 = 2) times weights w has E|S|^2 = 2 sum(w^2) / (H W)^2 per pixel;
    # E|S|^2 = strength^2 / 2 makes Var(2 Re S) = strength^2.
    scale = strength * height * width / (2 * math.sqrt(np.sum(weights**2)))
    out = np.empty((len(focus_nm), height, width), dtype=np.complex64)
    full = np.zeros(height * width, dtype=np.complex64)
    for i, focus in enumerate(focus_nm):
        full[inside] = scale * spectrum * np.exp(-1j * kz_offset * focus)
        out[i] = np.fft.ifft2(full.reshape(height, width))
    return out


def illumination_envelope(shape: tuple[int, int], waist_px: float, centre_px: tuple[float, float]) -> np.ndarray:
    """Gaussian-beam intensity ``exp(-2 r^2 / w^2)`` around ``centre_px`` (y, x) with waist ``waist_px``.

    An infinite waist gives a flat envelope. Returns (H, W) float32 with peak value 1.
    """
    y = (np.arange(shape[0]) - centre_px[0]) / waist_px
    x = (np.arange(shape[1]) - centre_px[1]) / waist_px
    return (np.exp(-2 * y**2)[:, None] * np.exp(-2 * x**2)[None, :]).astype(np.float32)


def expose(
    relative_intensity: np.ndarray,
    envelope: np.ndarray,
    column_gain: np.ndarray,
    *,
    photons_per_pixel: float,
    read_noise_e: float,
    gain_adu_per_e: float,
    offset_adu: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Camera counts for an image of relative intensity ``|1 + S + A|^2``.

    Photo-electrons are Poisson with mean ``photons_per_pixel * envelope * relative_intensity`` (quantum
    efficiency folded into the photon budget); Gaussian read noise ``read_noise_e`` (electrons rms) is added;
    each column is amplified by its own gain ``gain_adu_per_e * column_gain`` (fixed-pattern noise), offset by
    ``offset_adu`` and rounded to whole ADU. No saturation is applied.

    Args:
        relative_intensity: (..., H, W) intensity relative to the local reference.
        envelope: (H, W) illumination envelope.
        column_gain: (W,) relative gain of each column (1 = nominal).
        photons_per_pixel: detected photons per pixel of the bare reference at the envelope's peak.
        read_noise_e: read noise (electrons rms).
        gain_adu_per_e: conversion gain (ADU per electron).
        offset_adu: camera offset (ADU).
        rng: random generator.

    Returns:
        float32 counts (ADU) shaped like ``relative_intensity``.
    """
    expected = (photons_per_pixel * envelope) * relative_intensity.astype(np.float64)
    electrons = rng.poisson(expected).astype(np.float64)
    if read_noise_e > 0:
        electrons += read_noise_e * rng.standard_normal(electrons.shape)
    counts = offset_adu + (gain_adu_per_e * column_gain) * electrons
    return np.rint(counts).astype(np.float32)


def counts_to_contrast(
    counts: np.ndarray, envelope: np.ndarray, *, photons_per_pixel: float, gain_adu_per_e: float, offset_adu: float
) -> np.ndarray:
    """Background-normalised contrast ``I / I_background - 1`` of camera counts (float32).

    ``I_background`` is the smooth particle-free illumination (what a flat-field estimate holds), so static
    speckle and column patterns stay in the contrast image, as they do after a flat-field correction.
    """
    background = (gain_adu_per_e * photons_per_pixel) * envelope
    return ((counts - offset_adu) / background - 1).astype(np.float32)
