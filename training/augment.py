"""Data augmentation that keeps an image and its label mask aligned.

Geometric transforms (flips, 90° rotations, small rotations) move the image and the labels together;
gain and noise change the image only. Pure torch: every random number comes from the caller's
generator, so the result is fixed by the generator's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Random numbers drawn per call, always all of them, so the generator advances the same way whatever the config.
_DRAWS = 10


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (0..1) and ranges of each augmentation.

    Attributes:
        hflip: probability of a left-right flip.
        vflip: probability of an up-down flip.
        rot90: probability of a rotation by 90, 180 or 270 degrees (180 only for non-square images,
            whose shape must not change). Off by default: a camera's fixed-pattern noise runs along its
            columns, and a model trained on rotated images draws that pattern in no direction at all.
            Turn it on for images without such a pattern.
        rotate: probability of a small rotation by an angle uniform in [-max_degrees, max_degrees].
            Off by default: bilinear interpolation smooths the pixel noise, and a generative model
            would learn that smoothing as part of the iSCAT noise texture.
        max_degrees: largest small-rotation angle, in degrees.
        gain: probability of multiplying the (normalised) image by a factor uniform in ``gain_range``,
            which scales contrast around the training-set median. Off by default: absolute contrast
            encodes particle mass.
        gain_range: (low, high) gain factors, > 0.
        noise: probability of adding Gaussian noise with a std uniform in ``noise_std_range``.
        noise_std_range: (low, high) noise std, in normalised units.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.0
    rotate: float = 0.0
    max_degrees: float = 10.0
    gain: float = 0.0
    gain_range: tuple[float, float] = (0.9, 1.1)
    noise: float = 0.0
    noise_std_range: tuple[float, float] = (0.0, 0.05)

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "rot90", "rotate", "gain", "noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name}: a probability must be in [0, 1], got {value!r}")
        if not 0.0 <= self.max_degrees <= 180.0:
            raise ValueError(f"AugmentConfig.max_degrees: must be in [0, 180] degrees, got {self.max_degrees!r}")
        _check_range("gain_range", self.gain_range, low_bound=0.0, strict=True)
        _check_range("noise_std_range", self.noise_std_range, low_bound=0.0, strict=False)


def _check_range(name: str, value: tuple[float, float], *, low_bound: float, strict: bool) -> None:
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"AugmentConfig.{name}: must be (low, high) finite numbers with low <= high, got {value!r}")
    if low < low_bound or (strict and low == low_bound):
        relation = ">" if strict else ">="
        raise ValueError(f"AugmentConfig.{name}: values must be {relation} {low_bound}, got {value!r}")


def augment(
    image: torch.Tensor, labels: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transform a normalised image (C, H, W) float and its labels (H, W) int the same way.

    ``generator`` must live on the tensors' device. Returns new tensors of the input shapes and dtypes.
    Small rotations resample the image bilinearly and the labels by nearest neighbour through the same
    sampling grid, and fill the corners by reflection in both, so a particle reflected into a corner
    of the image stays labelled.
    """
    if image.ndim != 3 or labels.shape != image.shape[1:]:
        raise ValueError(f"augment: expected image (C, H, W) and labels (H, W), got {image.shape} and {labels.shape}")
    u = torch.rand(_DRAWS, generator=generator, device=generator.device, dtype=torch.float64).tolist()
    height, width = labels.shape
    if u[0] < config.hflip:
        image, labels = image.flip(-1), labels.flip(-1)
    if u[1] < config.vflip:
        image, labels = image.flip(-2), labels.flip(-2)
    if u[2] < config.rot90:
        k = 1 + int(u[3] * 3) if height == width else 2
        image, labels = torch.rot90(image, k, dims=(-2, -1)), torch.rot90(labels, k, dims=(-2, -1))
    if u[4] < config.rotate:
        image, labels = _rotate(image, labels, (2 * u[5] - 1) * config.max_degrees)
    if u[6] < config.gain:
        low, high = config.gain_range
        image = image * (low + (high - low) * u[7])
    if u[8] < config.noise:
        low, high = config.noise_std_range
        noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=image.dtype)
        image = image + (low + (high - low) * u[9]) * noise
    return image.contiguous(), labels.contiguous()


def _rotate(image: torch.Tensor, labels: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate about the image centre by ``degrees`` (positive = counterclockwise as displayed, y down)."""
    channels, height, width = image.shape
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid works in coordinates normalised to [-1, 1] per axis; the aspect factors make the
    # rotation a true rotation in pixels for non-square images. Rows map output to input positions.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]], dtype=image.dtype, device=image.device
    )
    grid = F.affine_grid(theta[None], [1, channels, height, width], align_corners=False)
    rotated = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    # Labels go through float exactly (integers below 2**24) and nearest sampling never mixes two labels.
    as_float = labels[None, None].to(image.dtype)
    moved = F.grid_sample(as_float, grid, mode="nearest", padding_mode="reflection", align_corners=False)[0, 0]
    return rotated, moved.round().to(labels.dtype)
