"""Each particle's peak contrast as a condition: the prior it is drawn from and the map the network sees.

A label mask says where particles are and of which class, not how bright each is; in iSCAT that is set by
each particle's height above the coverslip, its size and the phase of the reference, and a network that must
invent it draws the contrasts of a class too narrow. A model with
``UNetConfig.contrast_channel`` sees one more condition channel: each particle's signed peak contrast
(normalised units, divided by ``ContrastPrior.scale``) painted over its blob, 0 elsewhere. Training measures it
on each training image (``training.particle_contrast``); generation draws it per particle from the class's
distribution over the training set, stored in the checkpoint as quantiles (``ContrastPrior``), with the image's
own generator, so that the same seed and mask give the same image, or takes it from the caller.

A network follows the channel only part of the way (it draws each particle towards its class's typical peak), so
a prior may carry a calibrated ``channel_map`` (``evaluation.contrast_calibration``): per class, the channel
magnitude that makes the network draw a wanted peak magnitude. Drawn and given contrasts alike go through it.

A particle is a 4-connected blob of one label (touching blobs of different classes stay apart), as in the
evaluation's ``matching.mask_particles``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.measure import label as connected_components

# Quantile levels stored per class: 0, 1/128, ..., 1. Enough to keep a distribution's shape (its tails to
# within 1/128 of the particles) in a few kB of JSON.
NUM_QUANTILE_LEVELS = 129
# The PSF radius (px) that sets the background subtracted before a peak is measured: one Airy radius at the
# simulator's optics (60 nm/px, 520 nm, NA 1.4).
DEFAULT_BACKGROUND_RADIUS_PX = 4.0


@dataclass(frozen=True)
class ContrastPrior:
    """Per-class distributions of particles' signed peak contrast, and the units of the condition channel.

    Attributes:
        scale: normalised image units per unit of the condition channel (the 90th percentile of the training
            set's peak magnitudes, so that the channel is of order 1).
        reach_px: how far (px) beyond its blob a particle's peak was looked for when measured.
        quantiles: ``{label: values}``, for every class 1..K, ``NUM_QUANTILE_LEVELS`` non-decreasing signed peak
            contrasts (normalised units) at evenly spaced levels from 0 to 1.
        background_radius_px: the PSF radius (px) that set the smooth background subtracted before measuring
            (``evaluation.detector.subtract_background``: a Gaussian of 4 such radii).
        channel_map: ``{label: (wanted, channel)}`` for calibrated classes: two sequences of positive peak
            magnitudes (normalised units) of equal length >= 2, wanted increasing, channel non-decreasing; a
            particle whose peak should have magnitude ``wanted[i]`` gets ``channel[i]`` in the channel, with its
            sign (linear in between, proportional beyond the ends). Classes left out, or no map (None), get their
            peak as it is.
    """

    scale: float
    reach_px: float
    quantiles: Mapping[int, tuple[float, ...]]
    background_radius_px: float = DEFAULT_BACKGROUND_RADIUS_PX
    channel_map: Mapping[int, tuple[tuple[float, ...], tuple[float, ...]]] | None = None

    def __post_init__(self) -> None:
        if not _positive(self.scale):
            raise ValueError(f"particle_contrast.scale: must be a positive number, got {self.scale!r}")
        if not (_positive(self.reach_px) or (_number(self.reach_px) and self.reach_px == 0)):
            raise ValueError(f"particle_contrast.reach_px: must be a number >= 0, got {self.reach_px!r}")
        if not _positive(self.background_radius_px):
            raise ValueError(
                f"particle_contrast.background_radius_px: must be a positive number, got {self.background_radius_px!r}"
            )
        if not isinstance(self.quantiles, Mapping) or not self.quantiles:
            raise ValueError("particle_contrast.quantiles: must map each class label to its quantiles")
        checked = {}
        for key, values in self.quantiles.items():
            problem = (
                f"particle_contrast.quantiles[{key!r}]: must be {NUM_QUANTILE_LEVELS} finite non-decreasing numbers"
            )
            try:
                label, array = int(key), np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{problem} under an integer class label ({err})") from err
            if array.shape != (NUM_QUANTILE_LEVELS,) or not np.isfinite(array).all() or np.any(np.diff(array) < 0):
                raise ValueError(problem)
            checked[label] = tuple(float(v) for v in array)
        object.__setattr__(self, "quantiles", dict(sorted(checked.items())))
        if self.channel_map is not None:
            object.__setattr__(self, "channel_map", self._checked_channel_map(self.channel_map))
        for name in ("scale", "reach_px", "background_radius_px"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _checked_channel_map(self, channel_map: object) -> dict[int, tuple[tuple[float, ...], tuple[float, ...]]]:
        if not isinstance(channel_map, Mapping):
            raise ValueError("particle_contrast.channel_map: must map class labels to (wanted, channel) magnitudes")
        checked = {}
        for key, pair in channel_map.items():
            problem = (
                f"particle_contrast.channel_map[{key!r}]: must be a class of the prior with two sequences of "
                "positive finite magnitudes of equal length >= 2, wanted increasing and channel non-decreasing"
            )
            try:
                label = int(key)
                wanted, channel = (np.asarray(values, dtype=np.float64) for values in pair)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{problem} ({err})") from err
            valid = (
                label in self.quantiles
                and wanted.ndim == 1
                and wanted.shape == channel.shape
                and len(wanted) >= 2
                and all(np.isfinite(v).all() and (v > 0).all() for v in (wanted, channel))
                and (np.diff(wanted) > 0).all()
                and (np.diff(channel) >= 0).all()
            )
            if not valid:
                raise ValueError(problem)
            checked[label] = (tuple(float(v) for v in wanted), tuple(float(v) for v in channel))
        return dict(sorted(checked.items()))

    def to_channel(self, peaks: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The channel's values (n,) float64 for particles of ``classes`` (n,) int whose signed peaks should be
        ``peaks`` (n,) (normalised units): through ``channel_map`` where the class has one, over ``scale``."""
        peaks = np.asarray(peaks, dtype=np.float64)
        mapped = peaks.copy()
        for label, (wanted, channel) in (self.channel_map or {}).items():
            chosen = np.asarray(classes) == label
            magnitude = np.abs(peaks[chosen])
            inside = np.interp(magnitude, wanted, channel)
            below, above = magnitude * (channel[0] / wanted[0]), magnitude * (channel[-1] / wanted[-1])
            magnitude = np.where(magnitude < wanted[0], below, np.where(magnitude > wanted[-1], above, inside))
            mapped[chosen] = np.sign(peaks[chosen]) * magnitude
        return mapped / self.scale

    def check_classes(self, num_classes: int) -> None:
        """Raise ValueError unless the prior has a distribution for exactly the classes 1..``num_classes``."""
        if sorted(self.quantiles) != list(range(1, num_classes + 1)):
            raise ValueError(
                f"particle_contrast.quantiles: has classes {sorted(self.quantiles)}, the model 1..{num_classes}"
            )

    @classmethod
    def from_samples(
        cls,
        samples: Mapping[int, Sequence[float]],
        reach_px: float,
        background_radius_px: float = DEFAULT_BACKGROUND_RADIUS_PX,
    ) -> ContrastPrior:
        """The prior of signed peaks ``{label: values}`` (normalised units) measured with ``reach_px`` and
        ``background_radius_px`` (px); a class with no particle measured gets a distribution at 0 (its particles
        are then drawn without contrast). ValueError when no class has any."""
        levels = np.linspace(0.0, 1.0, NUM_QUANTILE_LEVELS)
        every = np.concatenate([np.asarray(v, dtype=np.float64) for v in samples.values()] or [np.empty(0)])
        if every.size == 0 or not np.any(every):
            raise ValueError("particle_contrast: no particle with a contrast was measured; a mask must mark some")
        quantiles = {
            label: np.quantile(values, levels) if len(values) else np.zeros(NUM_QUANTILE_LEVELS)
            for label, values in samples.items()
        }
        scale = float(np.quantile(np.abs(every), 0.9)) or float(np.abs(every).max())
        return cls(scale, reach_px, quantiles, background_radius_px)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (class labels as strings; ``channel_map`` only where set)."""
        data = {
            "scale": self.scale,
            "reach_px": self.reach_px,
            "background_radius_px": self.background_radius_px,
            "quantiles": {str(k): list(v) for k, v in self.quantiles.items()},
        }
        if self.channel_map is not None:
            data["channel_map"] = {str(k): [list(w), list(c)] for k, (w, c) in self.channel_map.items()}
        return data

    @classmethod
    def from_dict(cls, data: object) -> ContrastPrior:
        """Build a prior from ``to_dict`` output (or return a ``ContrastPrior`` as it is); ValueError if malformed."""
        if isinstance(data, ContrastPrior):
            return data
        required, optional = {"scale", "reach_px", "quantiles"}, {"background_radius_px", "channel_map"}
        if not isinstance(data, dict) or not required <= set(data) <= required | optional:
            raise ValueError(
                "particle_contrast: must be a dict with the keys scale, reach_px and quantiles (and optionally "
                "background_radius_px and channel_map)"
            )
        if not isinstance(data["quantiles"], dict):
            raise ValueError("particle_contrast.quantiles: must map class labels to quantiles")
        return cls(**data)

    def draw(self, classes: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Signed peak contrasts (n,) float64, normalised units, for particles of ``classes`` (n,) int: each drawn
        from its class's distribution with one uniform number of ``generator``, in order."""
        levels = torch.rand(len(classes), generator=generator, dtype=torch.float64).numpy()
        grid = np.linspace(0.0, 1.0, NUM_QUANTILE_LEVELS)
        return np.array([np.interp(u, grid, self.quantiles[int(c)]) for u, c in zip(levels, classes, strict=True)])


def check_given_contrasts(
    values: np.ndarray, labels_shape: tuple[int, ...], prior: ContrastPrior | None, name: str = "particle_contrast"
) -> np.ndarray:
    """Given particle contrasts (any float array) checked against int label masks of ``labels_shape`` (N, H, W) and
    a model's prior (None: the model has no contrast channel); returns them as float64 (N, H, W). Raises
    ValueError naming ``name`` (a file or layer) for a model without the channel, another shape or an infinity."""
    if prior is None:
        raise ValueError(
            f"{name}: this model has no contrast channel (it draws each particle's contrast itself); "
            "particle contrasts need a model trained with model.contrast_channel"
        )
    array = np.asarray(values, dtype=np.float64)
    array = array[None] if array.ndim == 2 else array
    if array.shape != tuple(labels_shape):
        shown = tuple(labels_shape[1:]) if array.ndim == 3 and labels_shape[0] == 1 else tuple(labels_shape)
        raise ValueError(f"{name}: has shape {np.shape(values)}, the mask {shown}; they must match")
    if np.isinf(array).any():
        raise ValueError(f"{name}: contains infinite values; give finite contrasts, or NaN to draw one")
    return array


def particle_blobs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The particles of an int label mask (H, W): blob numbers (H, W) int (0 background, 1..n in raster order of
    their first pixel) and each blob's class (n,) int64. ValueError for anything but a 2-D integer array."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected a 2-D integer label mask (H, W), got {labels.dtype} with shape {labels.shape}")
    # label() connects pixels of equal value only, so each blob keeps its own class.
    blobs = connected_components(labels, background=0, connectivity=1)
    count = int(blobs.max()) if blobs.size else 0
    classes = np.zeros(count, dtype=np.int64)
    classes[blobs[blobs > 0] - 1] = labels[blobs > 0]
    return blobs, classes


def blob_peaks(blobs: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The signed value of largest magnitude of ``image`` (H, W) over each blob's finite pixels (n,) float64, in
    ``particle_blobs`` order; NaN for a blob with none."""
    peaks = np.full(int(blobs.max(initial=0)), np.nan)
    for index, pixels in enumerate(ndimage.find_objects(blobs)):
        values = image[pixels][(blobs[pixels] == index + 1) & np.isfinite(image[pixels])]
        if values.size:
            peaks[index] = values[np.argmax(np.abs(values))]
    return peaks


def paint_blobs(blobs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(H, W) float32: blob i's pixels (``particle_blobs`` numbering) hold ``values[i - 1]``, the rest 0."""
    table = np.concatenate([[0.0], np.asarray(values, dtype=np.float64).ravel()])
    if len(table) != int(blobs.max(initial=0)) + 1:
        raise ValueError(f"got {len(table) - 1} values for {int(blobs.max(initial=0))} particles")
    return table[blobs].astype(np.float32)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _number(value) and value > 0
