"""The model config: everything besides the weights that is needed to use a trained model.

``ModelConfig`` checks every field on construction and raises ValueError naming the field, so that a config read
from a crafted file costs no more than the file's size: every size in it is bounded (``unet.UNET_LIMITS`` and the
limits here).
"""

from __future__ import annotations

import copy
import json
import math
import reprlib
from dataclasses import dataclass, field

from .guidance import EVERY_NOISE_LEVEL, check_class_guidance, check_guidance_interval, check_guidance_scale
from .parameterization import PARAMETERIZATIONS
from .particle_contrast import ContrastPrior
from .samplers import SAMPLERS, check_steps
from .schedules import schedule_from_config
from .unet import UNetConfig

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
