"""Training-set normalisation: one robust centre and scale per image channel, in physical units.

``physical = normalised * std + mean``, per channel. The statistics describe the whole training set
and are stored in the checkpoint (``ModelConfig.normalization``). They are never taken from each
image's own min/max or std: absolute contrast encodes particle mass, and a per-image scale would
erase it.

Centre: the median. Scale: the median absolute deviation times 1.4826, which equals the standard
deviation for Gaussian data (the background noise and speckle that make up almost every pixel) and
tolerates up to 50 % outliers, where an IQR-based estimate tolerates 25 %: bright particles, hot
pixels and saturated frames barely move either statistic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch

from napari_iscat_diffusion.io.pixel_values import robust_centre_scale

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


class RawImages(Protocol):
    """Anything that hands out raw (un-normalised) images (C, H, W) by index, e.g. ``IscatDataset``."""

    def __len__(self) -> int: ...

    def raw_image(self, index: int) -> np.ndarray: ...


def compute_normalization(
    data: RawImages | Sequence[np.ndarray] | np.ndarray,
    max_images: int = 200,
    seed: int = 0,
    *,
    pixels_per_image: int = 65_536,
) -> dict[str, list[float]]:
    """Robust per-channel statistics of raw training images, ``{"mean": [C floats], "std": [C floats]}``.

    Args:
        data: an object with ``raw_image(i)`` and ``len()`` (``IscatDataset``), or a sequence of raw
            images, each (H, W) or (C, H, W), in physical units.
        max_images: at most this many images are read, chosen at random without replacement.
        seed: seeds the choice of images and pixels, so the result is reproducible.
        pixels_per_image: at most this many pixels per image (drawn at random) enter the statistics,
            which bounds the memory used for large images.

    Returns:
        per channel, "mean" is the median and "std" the MAD scale (see the module docstring), both
        ignoring NaN and infinite pixels. Raises ValueError when there is no image, the images disagree
        on the number of channels, or a channel has no finite pixel or no spread at all.
    """
    if max_images < 1 or pixels_per_image < 1:
        raise ValueError(f"max_images and pixels_per_image must be >= 1, got {max_images} and {pixels_per_image}")
    rng = np.random.default_rng(seed)
    samples = [
        _pixel_sample(image, pixels_per_image, rng)
        for image in chosen_images(data, max_images, rng, "compute_normalization")
    ]
    channels = {len(sample) for sample in samples}
    if len(channels) > 1:
        raise ValueError(f"compute_normalization: the images have different numbers of channels {sorted(channels)}")
    pooled = np.concatenate(samples, axis=1)
    stats = [_robust_centre_scale(values, channel) for channel, values in enumerate(pooled)]
    return {"mean": [centre for centre, _ in stats], "std": [scale for _, scale in stats]}


def chosen_images(
    data: RawImages | Sequence[np.ndarray] | np.ndarray, max_images: int, rng: np.random.Generator, caller: str
) -> Iterator[np.ndarray]:
    """The raw images, each as (C, H, W) float64, of at most ``max_images`` images of ``data`` (an object with
    ``raw_image(i)`` or a sequence of images, each (H, W) or (C, H, W)), chosen with ``rng`` without
    replacement, in index order and read one at a time. Raises ValueError naming ``caller`` when there is no
    image or one has another shape."""
    count = len(data)
    if count == 0:
        raise ValueError(f"{caller}: there are no images to compute statistics from")
    chosen = np.sort(rng.choice(count, size=min(count, max_images), replace=False))
    read = data.raw_image if hasattr(data, "raw_image") else data.__getitem__
    for index in chosen:
        array = np.asarray(read(int(index)), dtype=np.float64)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"{caller}: image {index} has shape {array.shape}; expected (H, W) or (C, H, W)")
        yield array


def _pixel_sample(array: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``size`` pixels of one image (C, H, W) as (C, size)."""
    flat = array.reshape(len(array), -1)
    if flat.shape[1] <= size:
        return flat
    return flat[:, rng.choice(flat.shape[1], size=size, replace=False)]


def _robust_centre_scale(values: np.ndarray, channel: int) -> tuple[float, float]:
    try:
        return robust_centre_scale(values)
    except ValueError as err:
        raise ValueError(f"compute_normalization: channel {channel} in the images read: {err}") from err


def normalize(image: ArrayOrTensor, normalization: dict) -> ArrayOrTensor:
    """Physical units to normalised units for an image (..., C, H, W): ``(image - mean) / std`` per channel."""
    mean, std = _per_channel(image, normalization)
    return (image - mean) / std


def denormalize(image: ArrayOrTensor, normalization: dict) -> ArrayOrTensor:
    """Normalised units back to physical units for an image (..., C, H, W): ``image * std + mean`` per channel."""
    mean, std = _per_channel(image, normalization)
    return image * std + mean


def _per_channel(image: ArrayOrTensor, normalization: dict) -> tuple[ArrayOrTensor, ArrayOrTensor]:
    """Mean and std shaped (C, 1, 1) in the image's array type, dtype and device."""
    channels = image.shape[-3] if image.ndim >= 3 else 0
    if channels != len(normalization["mean"]) or channels != len(normalization["std"]):
        raise ValueError(
            f"normalisation statistics for {len(normalization['mean'])} channel(s) do not fit an image of shape "
            f"{tuple(image.shape)}; expected (..., C, H, W) with C = {len(normalization['mean'])}"
        )
    if isinstance(image, torch.Tensor):
        mean = torch.tensor(normalization["mean"], dtype=image.dtype, device=image.device)
        std = torch.tensor(normalization["std"], dtype=image.dtype, device=image.device)
    else:
        mean = np.asarray(normalization["mean"], dtype=image.dtype)
        std = np.asarray(normalization["std"], dtype=image.dtype)
    return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
