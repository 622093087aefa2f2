"""Label masks: validation and the condition tensor fed to the network.

A mask is a label image with 0 = background and 1..K = particle class. The network sees K one-hot
class channels plus one "mask given" channel, and a model with ``UNetConfig.contrast_channel`` one more: each
particle's peak contrast (``particle_contrast``). The unconditional (null) condition has every channel
at zero, so it differs from an empty mask (no particles), whose "mask given" channel is one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage

# Pixels within this distance (px) of a class's mask pixels lie fully in its zone (per-class guidance); the weight
# then falls linearly to zero over the same distance again, so that what changes at a zone's edge changes smoothly
# and leaves no seam. 4 px is one Airy radius at the simulator's optics (60 nm/px, 520 nm, NA 1.4): with the blob
# itself that covers a particle's core and first ring, where its peak contrast lies.
CLASS_ZONE_REACH_PX = 4.0


def validate_mask(mask: np.ndarray, num_classes: int, *, name: str = "mask") -> np.ndarray:
    """Check a label mask and return it as int64 labels of shape (N, H, W).

    Takes a mask of shape (H, W) or (N, H, W) with integer labels 0..num_classes (booleans and
    integer-valued floats are accepted). ``name`` is used in error messages (a file or layer name).
    Raises ValueError saying what is wrong and what is expected.
    """
    labels = check_mask(mask, num_classes, name=name).astype(np.int64)
    return labels[None] if labels.ndim == 2 else labels


def check_mask(mask: np.ndarray, num_classes: int, *, name: str = "mask") -> np.ndarray:
    """Check a label mask as :func:`validate_mask` does and return it as an array, without copying it (a widget or
    export checks a mask long before the work, and an int64 copy costs 8 bytes a pixel)."""
    expected = f"expected a label image of shape (H, W) or (N, H, W) with integer labels 0..{num_classes}"
    array = np.asarray(mask)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name}: data of type {array.dtype} is not a label image; {expected}")
    if array.ndim == 3 and array.shape[-1] in (3, 4) and min(array.shape[:2]) > 4:
        raise ValueError(f"{name}: shape {array.shape} looks like an RGB(A) image, not a label image; {expected}")
    if array.ndim not in (2, 3):
        raise ValueError(f"{name}: has {array.ndim} dimensions (shape {array.shape}); {expected}")
    if array.size == 0:
        raise ValueError(f"{name}: is empty (shape {array.shape}); {expected}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: contains NaN or infinite values; {expected}")
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"{name}: contains non-integer values (for example {_first_fraction(array)}); {expected}")
    low, high = array.min(), array.max()
    if low < 0:
        raise ValueError(f"{name}: contains negative labels (minimum {low}); {expected}")
    if high > num_classes:
        raise ValueError(
            f"{name}: contains label {high:g} but the model knows {num_classes} particle classes "
            f"(labels 1..{num_classes}, 0 = background); relabel the mask or choose a model with more classes"
        )
    return array


def _first_fraction(array: np.ndarray) -> float:
    values = array[array != np.round(array)]
    return float(values.flat[0])


def encode_condition(
    labels: torch.Tensor,
    num_classes: int,
    dtype: torch.dtype = torch.float32,
    contrast: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn int64 labels (N, H, W) into the network condition (N, K+1, H, W): K one-hot class channels, then ones.

    With ``contrast`` (N, H, W), the particles' peak contrasts in the channel's units (``ContrastPrior.scale``),
    it follows as channel K+2 (N, K+2, H, W).
    """
    one_hot = torch.nn.functional.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2)[:, 1:]
    given = torch.ones_like(labels).unsqueeze(1)
    channels = [one_hot.to(dtype), given.to(dtype)]
    if contrast is not None:
        channels.append(contrast.to(device=labels.device, dtype=dtype).unsqueeze(1))
    return torch.cat(channels, dim=1)


def null_condition(condition: torch.Tensor) -> torch.Tensor:
    """The unconditional input matching a condition tensor (N, K+1 or K+2, H, W): all channels zero."""
    return torch.zeros_like(condition)


def class_zone(labels: np.ndarray, classes: Iterable[int], reach_px: float = CLASS_ZONE_REACH_PX) -> np.ndarray:
    """Weights in [0, 1] around the particles of some classes in int label masks (N, H, W).

    A pixel within ``reach_px`` (px, > 0) of a pixel labelled with one of ``classes`` gets 1; the weight falls
    linearly to 0 at ``2 * reach_px``. Returns float64 (N, H, W), all zero for a mask without those classes.
    """
    if not reach_px > 0:
        raise ValueError(f"reach_px must be > 0, got {reach_px}")
    inside = np.isin(np.asarray(labels), list(classes))
    zone = np.zeros(inside.shape, np.float64)
    for i, mask in enumerate(inside):
        if mask.any():
            zone[i] = np.clip(2.0 - ndimage.distance_transform_edt(~mask) / reach_px, 0.0, 1.0)
    return zone
