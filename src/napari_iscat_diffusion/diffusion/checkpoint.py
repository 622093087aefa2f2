"""Model checkpoints: one ``.safetensors`` file with the network weights and a JSON config in its metadata.

The safetensors metadata (a ``dict[str, str]``) holds one key, ``METADATA_KEY``, whose value is a JSON
document ``{"format_version": 1, "versions": {...}, "config": ModelConfig.to_dict()}``. Nothing is
ever unpickled: a checkpoint cannot run code when it is loaded.

``load_checkpoint`` reads the file once, hashes those bytes (the provenance of what was loaded) and
checks everything before building the network; every failure raises ``CheckpointError`` with a
message that names the file, says what is wrong and what to do about it.

A crafted file costs no more than its own size: only a regular file of at most ``MAX_CHECKPOINT_BYTES`` is read
(never a FIFO or a device), its header is capped and parsed without deep recursion, every size in the config is
bounded (``unet.UNET_LIMITS`` and the limits here), and the names and shapes of the tensors the config asks for
are compared with the header's on the ``meta`` device, so that no network is allocated for a config that the
file's weights do not fill.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .. import __version__
from ..io.atomic import atomic_write_bytes, remove_stale_temporaries
from ..terminal import printable
from .denoiser import DiscreteTimeDenoiser
from .device import resolve_device
from .grid_fit import FITTED_SAMPLERS, fitted_sigmas
from .guidance import EVERY_NOISE_LEVEL, check_class_guidance, check_guidance_interval, check_guidance_scale
from .parameterization import PARAMETERIZATIONS
from .particle_contrast import ContrastPrior
from .samplers import DEFAULT_SAMPLER, SAMPLERS, check_steps, get_sampler, sampling_sigmas
from .schedules import DiscreteSchedule, schedule_from_config
from .unet import ConditionalUNet, UNetConfig

FORMAT_VERSION = 1
METADATA_KEY = "napari_iscat_diffusion"
STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_HEADER_DTYPES = ("F32", "F16", "BF16")  # STORAGE_DTYPES as safetensors names them
# The largest file read: the bundled model is 2.4 MB, and 4 GiB hold a billion float32 weights, far beyond any model
# this project trains.
MAX_CHECKPOINT_BYTES = 4 << 30

_REQUIRED_FIELDS = ("unet", "schedule", "parameterization", "normalization")
_OPTIONAL_FIELDS = (
    "pixel_size_nm",
    "training_size",
    "default_guidance",
    "default_class_guidance",
    "default_guidance_interval",
    "sampling_sigma_max",
    "sampling_density_range",
    "default_steps",
    "default_sampler",
    "sde_sigma_min",
    "class_names",
    "training",
    "particle_contrast",
)
# A checkpoint's header (tensor index and our metadata) is 28 kB for the bundled model and under 2 MB at the
# UNET_LIMITS with 255 classes; parsing 8 MiB of the worst JSON costs about 200 MB and 2 s, where safetensors' own
# limit of 100 MB could cost gigabytes.
_MAX_HEADER_BYTES = 8 << 20
_MAX_JSON_DEPTH = 32  # our metadata nests 5 deep; deeper JSON would overflow the stack in copies of it
_MAX_TIMESTEPS = 100_000  # guards against a crafted file allocating a huge schedule
_MAX_TRAINING_SIDE = 1 << 16  # px
# Physical units of iSCAT data are contrasts (~1e-3) or camera counts (~1e4); these bounds leave 15 orders of
# magnitude around them while keeping normalised * std + mean, and two normalisations' ratios, finite in float32.
_MAX_NORMALIZATION = 1e15
_MIN_STD = 1e-15
# Normalised units: the bundled model's spectral densities span 0.3-1500 (noise-free data may reach far lower) and
# its particles' peaks reach 72 with a channel scale of 46. Far beyond these bounds the fitted sigma grid fails
# (densities near 1e-300), or the contrast channel (peak / scale) leaves float32's range and the image becomes NaN.
_DENSITY_BOUNDS = (1e-30, 1e30)
_MAX_CONTRAST = 1e6
_CONTRAST_SCALE_BOUNDS = (1e-6, 1e6)
# From atomic spacing to a millimetre per pixel; below, the TIFF resolution written with each image overflows.
_PIXEL_SIZE_BOUNDS_NM = (0.01, 1e6)
_MESSAGE_CHARS = 1000  # of a problem quoted from a file in an error message
_LISTED = 5  # names shown per kind of problem in an error message
_RESAVE = "Export the model again with napari_iscat_diffusion.diffusion.checkpoint.save_checkpoint."


class CheckpointError(ValueError):
    """A file could not be loaded as a model checkpoint; the message says why and what to do."""


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _is_real(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _json_copy(name: str, value: object) -> dict:
    """A deep copy of a JSON-serialisable dict made of plain JSON types (tuples become lists)."""
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: must be JSON-serialisable (str keys, finite numbers): {err}") from err


def _checked_normalization(name: str, norm: object, channels: int) -> dict:
    """``{"mean": [C floats], "std": [C floats > 0]}`` as plain floats; ValueError naming ``name`` otherwise."""
    if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
        raise ValueError(f"{name}: must be a dict with exactly the keys 'mean' and 'std', got {norm!r}")
    for key in ("mean", "std"):
        values = norm[key]
        if not isinstance(values, (list, tuple)) or len(values) != channels:
            raise ValueError(
                f"{name}: {key} must list {channels} number(s), one per image channel, got {reprlib.repr(values)}"
            )
        if not all(_is_real(v) and abs(v) <= _MAX_NORMALIZATION for v in values):
            raise ValueError(
                f"{name}: {key} must hold finite numbers of magnitude at most {_MAX_NORMALIZATION:g}, "
                f"got {reprlib.repr(values)}"
            )
    if not all(s > 0 for s in norm["std"]):
        raise ValueError(f"{name}: every std must be > 0, got {norm['std']!r}")
    if not all(s >= _MIN_STD for s in norm["std"]):
        raise ValueError(f"{name}: every std must be at least {_MIN_STD:g}, got {norm['std']!r}")
    return {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}


@dataclass
class ModelConfig:
    """Everything besides the weights that is needed to use a trained model.

    Attributes:
        unet: the network architecture.
        schedule: the training noise schedule, ``DiscreteSchedule.to_config()``.
        parameterization: what the network predicts, ``"eps"``, ``"v"`` or ``"x0"``.
        normalization: ``{"mean": [C floats], "std": [C floats]}``; physical image = normalised * std + mean.
        pixel_size_nm: physical pixel size of the training images in nm, if known.
        training_size: (H, W) of the crops the model was trained on, in pixels, if known.
        default_guidance: classifier-free guidance scale used when the caller gives none.
        default_class_guidance: per-class scales ``{label: w}`` used around those classes' particles when the
            caller gives none (``guidance.guidance_scale_map``); empty: every class at ``default_guidance``.
        default_guidance_interval: ``(sigma_low, sigma_high)``, the noise levels (normalised units) at which the
            sampler guides when the caller does not say (``guidance.guided_denoiser``); None: every level. In
            JSON a high end of None stands for infinity.
        sampling_sigma_max: the noise level (normalised units) at which the samplers on a continuous sigma
            grid (DPM-Solver++, Euler, Heun) start; None: the schedule's highest. Above a few hundred times the
            data's largest features the image is pure noise and steps there are wasted. DDPM and DDIM step
            on the training timesteps and always start at the last one.
        sampling_density_range: ``(low, high)``, the power per spatial frequency of the normalised training
            images (normalised units^2, 1 = white noise of unit variance), from the noise floor to the strongest
            frequency; DPM-Solver++ 2M then steps on a grid fitted to keep Gaussian data of these densities
            exact (``grid_fit``; the iSCAT background is close to Gaussian), where its log-SNR grid widens
            them by 5-10 % at 10-20 steps. None: the log-SNR grid.
        default_steps: ``{sampler name: steps}``, the step count used with that sampler when the caller gives
            none; a sampler not named takes its own default (``samplers.SAMPLERS``). A checkpoint whose grid
            starts lower (``sampling_sigma_max``) reaches the same quality in fewer steps.
        default_sampler: the sampler used when the caller names none; None: DPM-Solver++ 2M (``DEFAULT_SAMPLER``).
        sde_sigma_min: the noise level (normalised units) at and below which the SDE samplers (DPM-Solver++ 2M
            SDE) follow the ODE instead of adding fresh noise; None: they add it on every step.
        class_names: one name per particle class (K names), optional.
        training: free-form JSON summary of the training run (steps, data, metrics).
        particle_contrast: the per-class distributions of particles' peak contrasts that generation draws each
            particle's from (``particle_contrast.ContrastPrior``); set exactly when ``unet.contrast_channel`` is.

    The fields are validated (and tuples or lists normalised) on construction; a bad value raises
    ValueError naming the field.
    """

    unet: UNetConfig
    schedule: dict
    parameterization: str
    normalization: dict
    pixel_size_nm: float | None = None
    training_size: tuple[int, int] | None = None
    default_guidance: float = 1.0
    default_class_guidance: dict[int, float] = field(default_factory=dict)
    default_guidance_interval: tuple[float, float] | None = None
    sampling_sigma_max: float | None = None
    sampling_density_range: tuple[float, float] | None = None
    default_steps: dict[str, int] = field(default_factory=dict)
    default_sampler: str | None = None
    sde_sigma_min: float | None = None
    class_names: list[str] | None = None
    training: dict = field(default_factory=dict)
    particle_contrast: ContrastPrior | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"unet: must be a UNetConfig, got {type(self.unet).__name__}")
        self.schedule = _json_copy("schedule", self.schedule)
        steps = self.schedule.get("num_timesteps", 1000)
        if type(steps) is not int or not 2 <= steps <= _MAX_TIMESTEPS:
            raise ValueError(f"schedule: num_timesteps must be an integer from 2 to {_MAX_TIMESTEPS}, got {steps!r}")
        try:
            schedule = schedule_from_config(self.schedule)
        except (ValueError, TypeError, ArithmeticError, RuntimeError) as err:
            raise ValueError(f"schedule: {err}") from err
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization: unknown parameterisation {self.parameterization!r}; "
                f"expected one of {PARAMETERIZATIONS}"
            )
        self.normalization = _checked_normalization("normalization", self.normalization, self.image_channels)
        if self.pixel_size_nm is not None:
            low, high = _PIXEL_SIZE_BOUNDS_NM
            if not _is_real(self.pixel_size_nm) or not low <= self.pixel_size_nm <= high:
                raise ValueError(
                    f"pixel_size_nm: must be a positive number from {low:g} to {high:g} or None, "
                    f"got {reprlib.repr(self.pixel_size_nm)}"
                )
            self.pixel_size_nm = float(self.pixel_size_nm)
        if self.training_size is not None:
            size = self.training_size
            if (
                not isinstance(size, (list, tuple))
                or len(size) != 2
                or not all(type(s) is int and 0 < s <= _MAX_TRAINING_SIDE for s in size)
            ):
                raise ValueError(
                    f"training_size: must be two integers (H, W) from 1 to {_MAX_TRAINING_SIDE} or None, "
                    f"got {reprlib.repr(size)}"
                )
            self.training_size = (size[0], size[1])
        self.default_guidance = check_guidance_scale(self.default_guidance, name="default_guidance:")
        self.default_class_guidance = check_class_guidance(
            self.default_class_guidance, self.num_classes, name="default_class_guidance"
        )
        self.default_guidance_interval = self._checked_guidance_interval()
        self.sampling_sigma_max = self._checked_sampling_sigma_max(schedule.sigma_min)
        self.sampling_density_range = self._checked_density_range()
        self.default_steps = self._checked_default_steps(schedule.num_timesteps)
        if self.default_sampler is not None and (
            not isinstance(self.default_sampler, str) or self.default_sampler not in SAMPLERS
        ):
            raise ValueError(
                f"default_sampler: unknown sampler {reprlib.repr(self.default_sampler)}; "
                f"expected one of {', '.join(SAMPLERS)}"
            )
        if self.sde_sigma_min is not None:
            if not _is_real(self.sde_sigma_min) or self.sde_sigma_min < 0:
                raise ValueError(
                    f"sde_sigma_min: must be a finite noise level >= 0 or None, got {self.sde_sigma_min!r}"
                )
            self.sde_sigma_min = float(self.sde_sigma_min)
        if self.class_names is not None:
            names = self.class_names
            if (
                not isinstance(names, (list, tuple))
                or len(names) != self.num_classes
                or not all(isinstance(n, str) and n for n in names)
            ):
                raise ValueError(
                    f"class_names: must be {self.num_classes} non-empty strings (one per class) or None, got {names!r}"
                )
            self.class_names = list(names)
        self.training = _json_copy("training", self.training)
        self.particle_contrast = self._checked_particle_contrast()

    def _checked_particle_contrast(self) -> ContrastPrior | None:
        if not self.unet.contrast_channel:
            if self.particle_contrast is not None:
                raise ValueError("particle_contrast: given for a network without unet.contrast_channel")
            return None
        if self.particle_contrast is None:
            raise ValueError("particle_contrast: a network with unet.contrast_channel needs the contrasts' prior")
        prior = ContrastPrior.from_dict(self.particle_contrast)
        prior.check_classes(self.num_classes)
        low, high = _CONTRAST_SCALE_BOUNDS
        if not low <= prior.scale <= high:
            raise ValueError(f"particle_contrast.scale: must be from {low:g} to {high:g}, got {prior.scale!r}")
        magnitudes = [v for values in prior.quantiles.values() for v in values]
        magnitudes += [v for pair in (prior.channel_map or {}).values() for values in pair for v in values]
        if max(abs(v) for v in magnitudes) > _MAX_CONTRAST:
            raise ValueError(
                f"particle_contrast: quantiles and channel_map must be contrasts of magnitude at most {_MAX_CONTRAST:g}"
            )
        return prior

    def _checked_guidance_interval(self) -> tuple[float, float] | None:
        interval = self.default_guidance_interval
        if interval is None:
            return None
        if isinstance(interval, (list, tuple)) and len(interval) == 2 and interval[1] is None:
            interval = (interval[0], math.inf)
        interval = check_guidance_interval(interval, name="default_guidance_interval")
        return None if interval == EVERY_NOISE_LEVEL else interval

    def _checked_sampling_sigma_max(self, sigma_min: float) -> float | None:
        start = self.sampling_sigma_max
        if start is None:
            return None
        if not _is_real(start) or start <= sigma_min:
            raise ValueError(
                f"sampling_sigma_max: must be a finite noise level above the schedule's lowest ({sigma_min:.3g}) "
                f"or None, got {start!r}"
            )
        return float(start)

    def _checked_density_range(self) -> tuple[float, float] | None:
        densities = self.sampling_density_range
        if densities is None:
            return None
        if (
            not isinstance(densities, (list, tuple))
            or len(densities) != 2
            or not all(_is_real(d) for d in densities)
            or not _DENSITY_BOUNDS[0] <= densities[0] < densities[1] <= _DENSITY_BOUNDS[1]
        ):
            raise ValueError(
                f"sampling_density_range: must be two finite numbers 0 < low < high or None, "
                f"from {_DENSITY_BOUNDS[0]:g} to {_DENSITY_BOUNDS[1]:g}, got {reprlib.repr(densities)}"
            )
        return (float(densities[0]), float(densities[1]))

    def _checked_default_steps(self, num_timesteps: int) -> dict[str, int]:
        steps = self.default_steps
        if not isinstance(steps, dict):
            raise ValueError(f"default_steps: must be a dict {{sampler name: steps}}, got {steps!r}")
        unknown = sorted(str(name) for name in steps if name not in SAMPLERS)
        if unknown:
            raise ValueError(
                f"default_steps: unknown sampler(s) {reprlib.repr(unknown)}; expected names from {', '.join(SAMPLERS)}"
            )
        for name, count in steps.items():
            try:
                check_steps(count, num_timesteps)
            except ValueError as err:
                raise ValueError(f"default_steps: {name}: {err}") from None
        return {name: steps[name] for name in SAMPLERS if name in steps}

    @property
    def num_classes(self) -> int:
        """Number of particle classes K (labels 1..K)."""
        return self.unet.num_classes

    @property
    def image_channels(self) -> int:
        """Number of image channels C."""
        return self.unet.image_channels

    def to_dict(self) -> dict:
        """A JSON-serialisable dict from which ``from_dict`` rebuilds an equal config."""
        data = {
            "unet": self.unet.to_dict(),
            "schedule": copy.deepcopy(self.schedule),
            "parameterization": self.parameterization,
            "normalization": copy.deepcopy(self.normalization),
            "pixel_size_nm": self.pixel_size_nm,
            "training_size": None if self.training_size is None else list(self.training_size),
            "default_guidance": self.default_guidance,
            "default_class_guidance": {str(k): w for k, w in self.default_class_guidance.items()},
            "default_guidance_interval": None
            if self.default_guidance_interval is None
            else [self.default_guidance_interval[0], _finite_or_none(self.default_guidance_interval[1])],
            "sampling_sigma_max": self.sampling_sigma_max,
            "sampling_density_range": None
            if self.sampling_density_range is None
            else list(self.sampling_density_range),
            "default_steps": dict(self.default_steps),
            "default_sampler": self.default_sampler,
            "sde_sigma_min": self.sde_sigma_min,
            "class_names": None if self.class_names is None else list(self.class_names),
            "training": copy.deepcopy(self.training),
        }
        if self.particle_contrast is not None:
            data["particle_contrast"] = self.particle_contrast.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build a config from ``to_dict`` output; unknown or missing keys and bad values raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}")
        missing = [key for key in _REQUIRED_FIELDS if key not in data]
        if missing:
            raise ValueError(f"model config: missing key(s) {missing}")
        try:
            unet = UNetConfig.from_dict(data["unet"])
        except ValueError as err:
            raise ValueError(f"unet: {err}") from err
        return cls(unet=unet, **{key: value for key, value in data.items() if key != "unet"})


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for sampling together with its config and provenance.

    Attributes:
        net: the network, in eval mode, float32, ``requires_grad`` off, on the requested device.
        config: the model config stored with the weights.
        path: the file it was loaded from (None for a model that was never saved).
        sha256: hex SHA-256 of the file's bytes.
        versions: ``{"format_version", "package", "torch", "safetensors"}`` as written in the file.
        storage_dtype: the dtype the file stores its floating-point weights in (float32 for a model that was
            never saved), so that a copy with new metadata keeps the file's size.
    """

    net: ConditionalUNet
    config: ModelConfig
    path: Path | None
    sha256: str
    versions: dict
    storage_dtype: torch.dtype = torch.float32

    def to(self, device: torch.device | str) -> LoadedModel:
        """Move the network to ``device``; returns self."""
        self.net.to(device)
        return self

    @property
    def schedule(self) -> DiscreteSchedule:
        """The training noise schedule, rebuilt from the config."""
        return schedule_from_config(self.config.schedule)

    @property
    def sampling_sigma_max(self) -> float:
        """The noise level (normalised units) where DPM-Solver++, Euler and Heun start: the schedule's highest,
        or ``config.sampling_sigma_max`` where that is lower."""
        top = self.schedule.sigma_max
        return top if self.config.sampling_sigma_max is None else min(top, self.config.sampling_sigma_max)

    @property
    def default_sampler(self) -> str:
        """The sampler used when the caller names none: ``config.default_sampler``, else ``DEFAULT_SAMPLER``."""
        return self.config.default_sampler or DEFAULT_SAMPLER

    def sampler_options(self, sampler: str) -> dict:
        """The keyword options this model sets for ``sampler`` (``noise_sigma_min`` for an SDE sampler when the
        config has ``sde_sigma_min``); raises ValueError for an unknown sampler."""
        if get_sampler(sampler).sde and self.config.sde_sigma_min is not None:
            return {"noise_sigma_min": self.config.sde_sigma_min}
        return {}

    def default_steps(self, sampler: str) -> int:
        """The step count used with ``sampler`` when none is given: ``config.default_steps[sampler]`` where the
        checkpoint names one, else the sampler's own default. Raises ValueError for an unknown sampler."""
        return self.config.default_steps.get(sampler, get_sampler(sampler).default_steps)

    def sampler_and_steps(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """``(sampler, steps)`` with the model's defaults where None: ``default_sampler`` and
        ``default_steps(sampler)``. Raises ValueError for an unknown sampler."""
        sampler = self.default_sampler if sampler is None else sampler
        return sampler, self.default_steps(sampler) if steps is None else int(steps)

    def sigma_grid(self, sampler: str) -> str:
        """The kind of sigma grid ``sampler`` steps on with this model: ``"fitted"`` (``grid_fit``) for
        DPM-Solver++ 2M when the config has ``sampling_density_range``, else the sampler's own."""
        if sampler in FITTED_SAMPLERS and self.config.sampling_density_range is not None:
            return "fitted"
        return get_sampler(sampler).grid

    def sampling_sigmas(self, sampler: str, steps: int) -> torch.Tensor:
        """The noise levels (normalised units, float64, decreasing, ending at 0) that ``sampler`` steps through
        in ``steps`` steps on this model's schedule, from :attr:`sampling_sigma_max` on a continuous grid
        (fitted where :meth:`sigma_grid` says so)."""
        schedule = self.schedule
        if self.sigma_grid(sampler) == "fitted":
            # A copy: the fitted grid is cached, and a caller may change its tensor in place.
            densities = self.config.sampling_density_range
            return fitted_sigmas(steps, schedule.sigma_min, self.sampling_sigma_max, densities).clone()
        return sampling_sigmas(sampler, steps, schedule.sigma_min, self.sampling_sigma_max, schedule=schedule)

    def denoiser(self) -> DiscreteTimeDenoiser:
        """A ``denoise(x, sigma, cond) -> x0_hat`` wrapper around the network."""
        return DiscreteTimeDenoiser(self.net, self.schedule, self.config.parameterization)

    def summary(self) -> str:
        """One line of human-readable facts about the model (classes, channels, sizes, checksum)."""
        config = self.config
        classes = f"{config.num_classes} class{'es' if config.num_classes != 1 else ''}"
        if config.class_names:
            classes += f" ({printable(', '.join(config.class_names))})"  # names from the file may hold escape codes
        channels = f"{config.image_channels} image channel{'s' if config.image_channels != 1 else ''}"
        size = "training size unknown"
        if config.training_size is not None:
            size = f"trained on {config.training_size[0]}x{config.training_size[1]} px"
        pixel = "pixel size unknown" if config.pixel_size_nm is None else f"{config.pixel_size_nm:g} nm/px"
        schedule = f"{config.parameterization}-prediction, {config.schedule['name']} schedule"
        if config.particle_contrast is not None:
            classes += ", each particle's contrast drawn or given"
            mapped = list(config.particle_contrast.channel_map or {})
            if mapped:
                classes += f" (calibrated for class{'es' if len(mapped) > 1 else ''} {', '.join(map(str, mapped))})"
        return f"{classes}, {channels}, {size}, {pixel}, {schedule}, sha256 {self.sha256[:12]}"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    net: ConditionalUNet,
    config: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
) -> str:
    """Write ``net``'s weights and ``config`` to one ``.safetensors`` file, atomically.

    Args:
        path: the file to write; an existing file is replaced only once the new one is complete.
        net: the network; its ``config`` must equal ``config.unet``.
        config: the model config stored in the file's metadata.
        dtype: storage dtype of the floating-point weights: None (as they are), torch.float32,
            torch.float16 (half the size, for a bundled model) or torch.bfloat16.

    Returns:
        the hex SHA-256 of the written file.

    Raises:
        ValueError: for a bad dtype, a config that does not match the network, or weights that are
            not finite (in the storage dtype).
    """
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be None or one of {STORAGE_DTYPES}, got {dtype}")
    if net.config != config.unet:
        raise ValueError(f"config.unet {config.unet} differs from the network's config {net.config}")
    # Round trip through the serialised form, so that a config mutated after construction is checked again.
    config_dict = ModelConfig.from_dict(config.to_dict()).to_dict()
    tensors = {}
    for name, tensor in net.state_dict().items():
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensors[name] = tensor.detach().to(device="cpu", dtype=target).contiguous()
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(
            f"weights hold NaN or Inf values{' after conversion to ' + str(dtype) if dtype else ''}: {bad}"
        )
    document = {
        "format_version": FORMAT_VERSION,
        "versions": {"package": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "config": config_dict,
    }
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(document, allow_nan=False)})
    remove_stale_temporaries(path)  # what an earlier save, killed while writing, left behind
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The checked model config stored in a checkpoint's metadata, without loading its weights.

    Raises:
        CheckpointError: as ``load_checkpoint`` for a file that cannot be read or whose metadata is not ours.
    """
    path = Path(path)
    return _parse_metadata(path, _parse_header(path, _read_bytes(path))[0])[0]


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load and check a checkpoint written by ``save_checkpoint``.

    Args:
        path: the ``.safetensors`` file.
        device: where to put the network: "cpu", "cuda", "cuda:N", "mps" or "auto".

    Returns:
        the network (float32, eval mode, no gradients) with its config, path, SHA-256 and versions.

    Raises:
        CheckpointError: the file is missing, unreadable, not a regular file, larger than ``MAX_CHECKPOINT_BYTES``,
            truncated, not a safetensors file, not a checkpoint of this package, of an unsupported format version,
            or its config or weights are invalid.
        ValueError: the device is not available here.
    """
    path = Path(path)
    torch_device = resolve_device(device)
    data = _read_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    metadata, stored = _parse_header(path, data)
    config, versions = _parse_metadata(path, metadata)
    _check_fit(path, _expected_shapes(config.unet), stored)
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, KeyError) as err:
        raise _error(path, f"it is a corrupt safetensors file ({err})", _RESAVE) from err
    bad = _non_finite(tensors)
    if bad:
        raise _error(
            path,
            f"the weights hold NaN or Inf values: {bad}",
            "The model diverged in training or the file is corrupt; use another checkpoint.",
        )
    storage_dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    net = ConditionalUNet(config.unet)
    net.load_state_dict(tensors)  # copies into the float32 parameters, so fp16 weights become float32
    net.requires_grad_(False).eval().to(torch_device)
    return LoadedModel(
        net=net,
        config=config,
        path=path.resolve(),
        sha256=sha256,
        versions=versions,
        storage_dtype=storage_dtype,
    )


def _error(path: Path, problem: str, advice: str) -> CheckpointError:
    # The problem and the advice may quote the file, and the message ends up on a terminal.
    shown, problem, advice = (printable(text, _MESSAGE_CHARS) for text in (str(path), problem, advice))
    return CheckpointError(f"Cannot load model checkpoint '{shown}': {problem}. {advice}")


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file of 1 to ``MAX_CHECKPOINT_BYTES`` bytes (never a FIFO or a
    device such as /dev/zero, which would hang or never end)."""
    if path.is_dir():
        raise _error(path, "it is a folder, not a file", "Choose the .safetensors checkpoint file inside it.")
    try:
        # Non-blocking: opening a FIFO would otherwise wait for a writer. The checks below are on what was opened.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as err:
        raise _error(path, "file not found", "Check the path and choose a .safetensors checkpoint file.") from err
    except OSError as err:
        raise _error(path, f"the file cannot be read ({err})", "Check that it exists and is readable.") from err
    with open(descriptor, "rb") as file:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise _error(path, "it is a folder, not a file", "Choose the .safetensors checkpoint file inside it.")
        if not stat.S_ISREG(info.st_mode):
            raise _error(
                path, "it is not a regular file (a device, FIFO or socket)", "Choose a .safetensors checkpoint file."
            )
        if info.st_size > MAX_CHECKPOINT_BYTES:
            raise _error(
                path,
                f"the file is {info.st_size} bytes, more than the {MAX_CHECKPOINT_BYTES >> 30} GiB a checkpoint may be",
                "Choose a checkpoint written by napari-iscat-diffusion.",
            )
        try:
            # No more than the size it had when opened (+1 to notice growth), whatever a special file system says.
            data = file.read(info.st_size + 1)
        except OSError as err:
            raise _error(path, f"the file cannot be read ({err})", "Check that it exists and is readable.") from err
    if not data:
        raise _error(path, "the file is empty (0 bytes)", "It was not written completely; save or download it again.")
    if len(data) > info.st_size:
        raise _error(path, "the file grew while it was read", "Load it again once it is written.")
    return data


def _parse_header(path: Path, data: bytes) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """The safetensors header's metadata and its tensors ``{name: (dtype, shape)}``, with clear errors for files
    that are not safetensors, are cut short or have an oversized or malformed header."""
    # A safetensors file starts with its header length (8 bytes, little-endian) and then "{": test that
    # first, since a header length whose low byte is 0x80 also starts like a pickle.
    looks_like_safetensors = len(data) >= 9 and data[8:9] == b"{"
    if not looks_like_safetensors and (data.startswith(b"PK\x03\x04") or data.startswith(b"\x80")):
        raise _error(
            path,
            "it is a pickle file (such as a PyTorch .pt/.pth/.ckpt from torch.save), not a safetensors file; "
            "pickle files can run arbitrary code and are never loaded",
            _RESAVE,
        )
    if len(data) < 8:
        raise _error(
            path, f"the file is only {len(data)} bytes long: truncated, or not a safetensors file", "Use another file."
        )
    header_size = int.from_bytes(data[:8], "little")
    if not looks_like_safetensors:
        raise _error(
            path, "it is not a safetensors file", "Choose a .safetensors checkpoint written by napari-iscat-diffusion."
        )
    if header_size > _MAX_HEADER_BYTES:
        raise _error(
            path,
            f"its header is {header_size} bytes, more than the {_MAX_HEADER_BYTES >> 20} MiB a checkpoint's may be",
            _RESAVE,
        )
    if 8 + header_size > len(data):
        raise _error(
            path,
            f"the file is truncated (its header needs {8 + header_size} bytes, the file has {len(data)})",
            "It was not written or downloaded completely; save or download it again.",
        )
    try:
        header = json.loads(data[8 : 8 + header_size], object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except (ValueError, RecursionError) as err:
        raise _error(path, f"it is not a safetensors file (bad header: {err})", _RESAVE) from err
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _error(path, "it is not a safetensors file (its metadata is not a map of strings)", _RESAVE)
    bad = [name for name, entry in header.items() if not _is_tensor_entry(entry)]
    if bad:
        raise _error(path, f"it is not a safetensors file (bad header entries: {_listing(bad)})", _RESAVE)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_size + end > len(data):
        raise _error(
            path,
            f"the file is truncated ({len(data)} of {8 + header_size + end} bytes)",
            "It was not written or downloaded completely; save or download it again.",
        )
    return metadata, {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; ValueError for a key given twice, which readers may resolve differently."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key is given twice")
    return result


def _bounded_int(text: str) -> int:
    """A JSON integer of at most 19 digits (beyond, numbers would overflow float and int64 conversions later)."""
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"the integer {text[:30]}... is too large")
    return int(text)


def _is_tensor_entry(entry: object) -> bool:
    """Whether a header entry is ``{"dtype": str, "shape": [ints >= 0], "data_offsets": [begin, end]}``."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return False
    shape, offsets = entry["shape"], entry["data_offsets"]
    return (
        isinstance(entry["dtype"], str)
        and isinstance(shape, list)
        and all(type(n) is int and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(n) is int for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def _json_depth(value: object) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar), without recursion."""
    depth, level = 0, [value]
    while level:
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        depth += 1
    return depth - 1


def _parse_metadata(path: Path, metadata: dict) -> tuple[ModelConfig, dict]:
    """The model config and the versions from our key of the safetensors metadata."""
    if METADATA_KEY not in metadata:
        raise _error(
            path,
            f"it is a safetensors file without a napari-iscat-diffusion model config (no {METADATA_KEY!r} "
            "metadata), perhaps the weights of another model",
            "Choose a checkpoint written by napari-iscat-diffusion.",
        )
    try:
        document = json.loads(metadata[METADATA_KEY], object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except (ValueError, RecursionError) as err:
        raise _error(path, f"its {METADATA_KEY!r} metadata is malformed JSON ({err})", _RESAVE) from err
    if _json_depth(document) > _MAX_JSON_DEPTH:
        raise _error(path, f"its {METADATA_KEY!r} metadata nests deeper than {_MAX_JSON_DEPTH} levels", _RESAVE)
    if not isinstance(document, dict) or set(document) != {"format_version", "versions", "config"}:
        keys = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise _error(
            path,
            f"its {METADATA_KEY!r} metadata is malformed (expected config, format_version and versions; got {keys})",
            _RESAVE,
        )
    version = document["format_version"]
    versions = document["versions"]
    writer = versions.get("package", "unknown") if isinstance(versions, dict) else "unknown"
    if type(version) is int and version > FORMAT_VERSION:
        raise _error(
            path,
            f"it uses checkpoint format {version}, newer than format {FORMAT_VERSION} that napari-iscat-diffusion "
            f"{__version__} reads; it was written by napari-iscat-diffusion {writer}",
            f"Upgrade napari-iscat-diffusion to {writer} or newer (pip install -U napari-iscat-diffusion).",
        )
    if type(version) is not int or version != FORMAT_VERSION:
        raise _error(
            path,
            f"it has an unknown checkpoint format version {version!r} (this version reads format {FORMAT_VERSION})",
            _RESAVE,
        )
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise _error(path, f"its recorded versions are malformed: {versions!r}", _RESAVE)
    try:
        config = ModelConfig.from_dict(_without_retired_fields(path, document["config"]))
    except ValueError as err:
        raise _error(path, f"its model config is invalid ({err})", _RESAVE) from err
    return config, {**versions, "format_version": version}  # the checked version, whatever else the file says


def _without_retired_fields(path: Path, data: object) -> object:
    """A stored model config without the fields that earlier versions wrote with a value that means nothing now
    (``"high_noise_expert": null``); CheckpointError for a file that needs such a field."""
    if not isinstance(data, dict) or "high_noise_expert" not in data:
        return data
    if data["high_noise_expert"] is not None:
        raise _error(
            path,
            "it holds a high-noise expert network, which this version no longer uses",
            "Load the checkpoint of its main network, the run the expert was combined with.",
        )
    return {key: value for key, value in data.items() if key != "high_noise_expert"}


def _expected_shapes(unet: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the state dict of a network of ``unet``, found without allocating its weights."""
    with torch.device("meta"):
        net = ConditionalUNet(unet)
    return {name: tuple(tensor.shape) for name, tensor in net.state_dict().items()}


def _check_fit(
    path: Path,
    expected: dict[str, tuple[int, ...]],
    stored: dict[str, tuple[str, tuple[int, ...]]],
) -> None:
    """Raise CheckpointError unless the stored tensors ``{name: (safetensors dtype, shape)}`` match the network's
    state dict ``{name: shape}`` in names and shapes and are stored in one of ``STORAGE_DTYPES``."""
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    mismatched = [
        f"{name} (file {stored[name][1]} {stored[name][0]}, network {want})"
        for name, want in expected.items()
        if name in stored and (stored[name][1] != want or stored[name][0] not in _HEADER_DTYPES)
    ]
    problems = [
        f"{len(names)} {kind}: {_listing(names)}"
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of the wrong shape or type", mismatched),
        )
        if names
    ]
    if problems:
        raise _error(
            path,
            "the weights do not fit the network described in its config (" + "; ".join(problems) + ")",
            "The file was edited or written by incompatible code. " + _RESAVE,
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _non_finite(tensors: dict[str, torch.Tensor]) -> str:
    """Names of the floating-point tensors holding NaN or Inf (a few), or "" when all are finite."""
    names = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return _listing(names) if names else ""
