"""The training configuration: typed dataclasses, loaded from YAML, with ``key=value`` overrides.

Every section is a dataclass with defaults, so a YAML file lists only what differs. Overrides use
dotted keys (``optim.lr=1e-4 model.base_channels=32``); their values are parsed as YAML. Every value,
from the file or the command line, is checked against the field's type: an unknown key or a value of
the wrong type raises ``ConfigError`` naming the key, before any data is read or any training starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from napari_iscat_diffusion.diffusion.guidance import MAX_GUIDANCE
from napari_iscat_diffusion.diffusion.model_config import ModelConfig
from napari_iscat_diffusion.diffusion.particle_contrast import ContrastPrior
from napari_iscat_diffusion.diffusion.samplers import get_sampler
from napari_iscat_diffusion.diffusion.schedules import schedule_from_config
from napari_iscat_diffusion.diffusion.unet import UNetConfig
from napari_iscat_diffusion.io.output_paths import OutputPathError, check_output_folder

_FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """A bad training configuration; the message names the key and says what is expected."""


@dataclass
class DataConfig:
    """Where the training images come from and how they are cut.

    ``source``: "simulator", "tiff" (a folder of image/mask pairs; a pre-split tree's val/ is used for
    validation) or "hdf5" (``image_patches`` / ``mask_patches``). ``path``: the folder or file (not for
    the simulator); ``val_path``: a separate validation folder or file, else ``val_fraction`` of the
    items (the last ones) is held out. Sizes in pixels. ``normalization``: "compute" measures the mean and std
    of ``normalization_images`` training images; "init_from" keeps those of ``model.init_from`` (a fine-tune on
    data like the checkpoint's: the network goes on in the units it learned, and runs with different seeds
    compare without a 1-2 % difference in scale).
    """

    source: Literal["simulator", "tiff", "hdf5"] = "simulator"
    path: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.05
    crop_size: tuple[int, int] | None = (64, 64)
    frames_per_channel: int | None = None
    simulator: dict = field(default_factory=dict)
    simulator_train_items: int = 20000
    simulator_val_items: int = 64
    augment: dict = field(default_factory=dict)
    normalization_images: int = 200
    normalization: Literal["compute", "init_from"] = "compute"
    pixel_size_nm: float | None = None
    class_names: list[str] | None = None
    num_workers: int = 2
    validate: bool = False


# The architecture fields are UNetConfig's own (one list of them); the model section adds the diffusion setup.
_UNET_FIELDS = [
    (f.name, typing.get_type_hints(UNetConfig)[f.name], field(default=f.default))
    for f in dataclasses.fields(UNetConfig)
]
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [
        *_UNET_FIELDS,
        ("parameterization", Literal["eps", "v", "x0"], field(default="v")),
        ("schedule", dict, field(default_factory=lambda: {"name": "cosine", "num_timesteps": 1000})),
        ("init_from", str | None, field(default=None)),
    ],
)
ModelSection.__doc__ = (
    "The U-Net architecture (UNetConfig's fields), the parameterisation and the noise schedule; ``init_from``: "
    "a plugin checkpoint whose weights start the run (fine-tuning, see training/finetune.py), None: random."
)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule: linear warm-up over ``warmup_steps``, then cosine decay to
    ``lr * min_lr_ratio`` at the last step, or constant. ``grad_clip``: max global gradient norm, 0 = off."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 200
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    """The loop. ``batch_size`` is per process and micro-step: one optimiser step sees
    ``batch_size * grad_accum * world_size`` images. ``precision``: "auto" is bf16 autocast on CUDA, fp32 on CPU.
    ``particle_loss_weight``: pixels within ``particle_loss_radius_px`` (px) of a mask particle count
    ``1 + particle_loss_weight`` times in the loss (training and validation); 0 weighs every pixel the same.
    ``min_snr_gamma``, ``min_snr_floor``: the clean-image error weighs ``max(min(SNR, gamma), floor)`` (min-SNR
    weighting, Hang et al. 2023, with a floor for the high noise levels; gamma null: the plain target MSE).
    ``time_limit_minutes``: end the run (checkpoint, export) at the first step after this much training time
    (minutes of wall clock since ``fit`` began; null: no limit), e.g. inside a cluster job's time limit."""

    steps: int = 5000
    batch_size: int = 16
    grad_accum: int = 1
    cond_drop_prob: float = 0.1
    min_snr_gamma: float | None = 5.0
    min_snr_floor: float = 0.0
    particle_loss_weight: float = 0.0
    particle_loss_radius_px: int = 4
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_nonfinite: int = 10
    early_stopping_patience: int | None = None
    time_limit_minutes: float | None = None


@dataclass
class EmaConfig:
    """EMA of the weights with a half-life in images (independent of batch size and world size) and a
    ramp-up: the half-life in use is ``min(half_life_images, images_seen * rampup_ratio)``."""

    half_life_images: float = 50_000.0
    rampup_ratio: float | None = 0.05


@dataclass
class LogConfig:
    """What rank 0 reports, every so many optimiser steps (0 = never)."""

    every: int = 50
    val_every: int = 500
    val_timesteps: int = 8
    sample_every: int = 1000
    num_samples: int = 8
    sampler: str = "dpmpp_2m"
    sample_steps: int = 20
    guidance: float = 1.0
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    """Resumable training state every ``every`` steps; the newest ``keep_last`` and the best by
    validation loss are kept. ``resume``: "auto" (newest valid one in run_dir, if any), "none" or a file."""

    every: int = 500
    keep_last: int = 3
    resume: str = "auto"


@dataclass
class ExportConfig:
    """The model file for the plugin (EMA weights), written at the end; ``path`` None is run_dir/model.safetensors.
    ``sampling_sigma_max`` (normalised units; None: the schedule's highest) is where the continuous-sigma
    samplers start (``ModelConfig.sampling_sigma_max``); ``sampling_density_range`` (``[low, high]``, the
    training images' power per frequency in normalised units^2; "auto": measured on the normalisation images,
    ``spectral_density.spectral_density_range``; None: the log-SNR grid) fits DPM-Solver++ 2M's
    grid to the data (``ModelConfig.sampling_density_range``); ``default_steps`` (``{sampler name: steps}``) the step
    counts used when a user gives none (``ModelConfig.default_steps``); ``default_sampler`` (None: DPM-Solver++ 2M)
    and ``sde_sigma_min`` (None: every step) go to the same-named ``ModelConfig`` fields, as do
    ``default_class_guidance`` (``{label: scale}``, e.g. from ``iscat-diffusion calibrate``) and
    ``default_guidance_interval`` (``[sigma_low, sigma_high]`` in normalised units; None: every step)."""

    path: str | None = None
    fp16: bool = False
    default_guidance: float = 1.0
    sampling_sigma_max: float | None = None
    sampling_density_range: tuple[float, float] | Literal["auto"] | None = "auto"
    default_steps: dict = field(default_factory=dict)
    default_sampler: str | None = None
    sde_sigma_min: float | None = None
    default_class_guidance: dict = field(default_factory=dict)
    default_guidance_interval: tuple[float, float] | None = None


@dataclass
class TrainConfig:
    """The whole configuration; ``run_dir`` holds checkpoints, logs, samples and the exported model."""

    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    ema: EmaConfig = field(default_factory=EmaConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def unet_config(self) -> UNetConfig:
        """The model section's architecture as a ``UNetConfig`` (raises ConfigError for a bad one)."""
        values = {name: getattr(self.model, name) for name, _, _ in _UNET_FIELDS}
        try:
            return UNetConfig(**values)
        except ValueError as err:
            raise ConfigError(f"model.{err}") from err

    def to_dict(self) -> dict:
        """A JSON/YAML-ready dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def build_model_config(
    config: TrainConfig,
    normalization: dict,
    *,
    pixel_size_nm: float | None = None,
    class_names: list[str] | None = None,
    summary: dict | None = None,
    measured_density_range: tuple[float, float] | None = None,
    particle_contrast: ContrastPrior | None = None,
) -> ModelConfig:
    """The ``ModelConfig`` of a run: architecture, schedule, parameterisation, normalisation
    (``compute_normalization`` of the training set), pixel size (nm), crop size, class names and a
    JSON training summary. ``measured_density_range`` (``spectral_density_range`` of the training set) is
    the sampling density range where ``export.sampling_density_range`` is "auto"; ValueError if it is
    missing there. ``particle_contrast`` (``particle_contrast.measure_prior``) is needed with
    ``model.contrast_channel``."""
    density_range = config.export.sampling_density_range
    if density_range == "auto":
        if measured_density_range is None:
            raise ValueError("export.sampling_density_range is 'auto' but no measured range was given")
        density_range = measured_density_range
    return ModelConfig(
        unet=config.unet_config(),
        schedule=config.model.schedule,
        parameterization=config.model.parameterization,
        normalization=normalization,
        pixel_size_nm=pixel_size_nm,
        training_size=None if config.data.crop_size is None else tuple(config.data.crop_size),
        default_guidance=config.export.default_guidance,
        default_class_guidance=config.export.default_class_guidance,
        default_guidance_interval=config.export.default_guidance_interval,
        sampling_sigma_max=config.export.sampling_sigma_max,
        sampling_density_range=density_range,
        default_steps=config.export.default_steps,
        default_sampler=config.export.default_sampler,
        sde_sigma_min=config.export.sde_sigma_min,
        class_names=class_names,
        training=summary or {},
        particle_contrast=particle_contrast,
    )


# The config key behind each ModelConfig field that a config value sets.
_MODEL_CONFIG_KEYS = {
    "schedule": "model.schedule",
    "parameterization": "model.parameterization",
    "pixel_size_nm": "data.pixel_size_nm",
    "training_size": "data.crop_size",
    "class_names": "data.class_names",
    # The export section's keys are named after the ModelConfig fields they set.
    **{
        key.name: f"export.{key.name}"
        for key in dataclasses.fields(ExportConfig)
        if key.name in {model_field.name for model_field in dataclasses.fields(ModelConfig)}
    },
}


def _check_model_config_values(config: TrainConfig) -> None:
    """Raise ConfigError naming the key for a value that the exported model's ``ModelConfig`` would refuse at the
    end of the run: a trial ModelConfig is built now, with placeholders for what the data will give."""
    channels = config.model.image_channels
    try:
        build_model_config(
            config,
            {"mean": [0.0] * channels, "std": [1.0] * channels},
            pixel_size_nm=config.data.pixel_size_nm,
            class_names=config.data.class_names,
            measured_density_range=(1.0, 2.0),
        )
    except ValueError as err:
        field_name, _, problem = str(err).partition(": ")
        # Other fields (the contrast prior, checked last) come from the data: they are checked once measured.
        if field_name in _MODEL_CONFIG_KEYS:
            raise ConfigError(f"{_MODEL_CONFIG_KEYS[field_name]}: {problem}") from err


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _one_line(error: Exception) -> str:
    # YAML's messages point at the fault over several lines; an error is reported in one.
    return " ".join(str(error).split())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (None: all defaults) and apply ``key=value`` overrides; returns a checked TrainConfig.

    Raises ConfigError for an unreadable file, an unknown key or a value of the wrong type.
    """
    import yaml

    data: dict = {}
    if path is not None:
        if Path(path).exists() and not Path(path).is_file():  # a FIFO or a device would block or never end
            raise ConfigError(f"cannot read the config file {path}: not a regular file")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read the config file {path}: {_one_line(err)}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key=value with a dotted key, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(text)
        except (RecursionError, yaml.YAMLError) as err:
            raise ConfigError(f"{key}: cannot parse the value {text!r}: {_one_line(err)}") from err
        _set_dotted(data, key.split("."), value, key)
    config = _build(TrainConfig, data, "")
    config.unet_config()  # architecture errors (say norm_groups vs base_channels) surface here, not mid-run
    _check_values(config)
    return config


# (key, test, what a good value is): values of the right type that would fail only later, mid-run.
_RANGES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("data.val_fraction", lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    ("data.crop_size", lambda v: v is None or min(v) >= 1, "positive pixels (h, w) or null"),
    ("data.frames_per_channel", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("data.simulator_val_items", lambda v: 1 <= v <= 10**9, "1..1e9"),
    ("data.normalization_images", lambda v: v >= 1, ">= 1"),
    # Bounds far above any real run, so that a typo (1e9) is refused rather than exhausting memory or processes.
    ("data.num_workers", lambda v: 0 <= v <= 256, "from 0 to 256"),
    # AdamW moves every weight by about lr per step: above 1 no network trains, the loss only turns NaN.
    ("optim.lr", lambda v: 0 < v <= 1, "a positive number up to 1"),
    ("optim.betas", lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim.weight_decay", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("optim.grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.batch_size", lambda v: 1 <= v <= 2**16, "from 1 to 65536"),
    ("train.grad_accum", lambda v: 1 <= v <= 2**16, "from 1 to 65536"),
    ("train.cond_drop_prob", lambda v: 0 <= v <= 1, "a probability between 0 and 1"),
    ("train.min_snr_gamma", lambda v: v is None or v > 0, "a positive number or null"),
    ("train.min_snr_floor", lambda v: 0 <= v < math.inf, ">= 0 (0 = min-SNR as published)"),
    ("train.particle_loss_weight", lambda v: 0 <= v < math.inf, ">= 0 (0 = every pixel weighs the same)"),
    ("train.particle_loss_radius_px", lambda v: v >= 0, ">= 0 pixels"),
    ("train.max_nonfinite", lambda v: v >= 1, ">= 1"),
    ("train.early_stopping_patience", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("train.time_limit_minutes", lambda v: v is None or 0 < v < math.inf, "a positive number of minutes or null"),
    ("ema.half_life_images", lambda v: 0 < v < math.inf, "a positive, finite number of images"),
    ("ema.rampup_ratio", lambda v: v is None or v > 0, "a positive number or null"),
    ("log.every", lambda v: v >= 0, ">= 0 (0 = never)"),
    ("log.val_every", lambda v: v >= 0, ">= 0 (0 = never)"),
    ("log.val_timesteps", lambda v: v >= 1, ">= 1"),
    ("log.sample_every", lambda v: v >= 0, ">= 0 (0 = never)"),
    ("log.num_samples", lambda v: v >= 1, ">= 1"),
    ("log.sample_steps", lambda v: v >= 1, ">= 1"),
    (
        "log.guidance",
        lambda v: 0 <= v <= MAX_GUIDANCE,
        f"from 0 to {MAX_GUIDANCE:g} (the sample grids' guidance scale)",
    ),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("checkpoint.every", lambda v: v >= 0, ">= 0 (0 = only at the end and at a new best)"),
    ("checkpoint.keep_last", lambda v: v >= 1, ">= 1 (the newest state is what a restart resumes from)"),
]


def _check_values(config: TrainConfig) -> None:
    """Raise ConfigError for a value of the right type that is out of range, an unknown sampler or schedule."""
    for key, test, expected in _RANGES:
        *section, name = key.split(".")
        value = getattr(getattr(config, section[0]) if section else config, name)
        if not test(value):
            raise ConfigError(f"{key}: must be {expected}, got {value!r}")
    train = config.train
    if train.min_snr_floor > 0 and (train.min_snr_gamma is None or train.min_snr_floor >= train.min_snr_gamma):
        raise ConfigError(
            f"train.min_snr_floor: a floor of {train.min_snr_floor} needs train.min_snr_gamma above it "
            f"(got {train.min_snr_gamma}); the floor bounds the min-SNR weight from below"
        )
    if config.data.normalization == "init_from" and not config.model.init_from:
        raise ConfigError(
            "data.normalization: init_from takes the normalisation of model.init_from; set model.init_from"
        )
    if not config.log.val_every and config.train.early_stopping_patience is not None:
        # It acts on validation results: without validations it would silently never act.
        raise ConfigError("train.early_stopping_patience: acts on validation losses; set log.val_every > 0")
    for key, check, value in (
        ("log.sampler", get_sampler, config.log.sampler),
        ("model.schedule", schedule_from_config, config.model.schedule),
    ):
        try:
            check(value)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from err
    # After the schedule check, so that a bad schedule is reported as such.
    timesteps = schedule_from_config(config.model.schedule).num_timesteps
    if config.log.sample_steps > timesteps:
        raise ConfigError(
            f"log.sample_steps: must be from 1 to {timesteps} (model.schedule's timesteps), "
            f"got {config.log.sample_steps}"
        )
    _check_model_config_values(config)
    if config.optim.lr * config.optim.weight_decay >= 1:
        raise ConfigError(
            "optim.weight_decay: lr * weight_decay must be below 1 (AdamW multiplies every weight by "
            f"1 - lr * weight_decay each step), got {config.optim.lr} * {config.optim.weight_decay}"
        )
    _check_output_path("run_dir", config.run_dir, folder=True)
    if config.export.path is not None:
        _check_output_path("export.path", config.export.path, folder=False)


def _check_output_path(key: str, value: str, *, folder: bool) -> None:
    """ConfigError when ``value`` cannot become a folder (``folder``) or a file: empty, a folder where a file goes,
    below a file, or in a folder that takes no new file. Found now, not after hours of training."""
    if not value:
        raise ConfigError(f"{key}: must not be empty")
    path = Path(value)
    if not folder and path.is_dir():
        raise ConfigError(f"{key}: {value} is a folder; expected a file")
    try:
        check_output_folder(path if folder else path.parent, f"{key}:")
    except OutputPathError as err:
        raise ConfigError(str(err)) from None


def _set_dotted(data: dict, parts: list[str], value: Any, key: str) -> None:
    for part in parts[:-1]:
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        data = child
    data[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """A dataclass instance from a dict, every value checked against the field's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}"
            + (f" (and {', '.join(prefix + u for u in unknown[1:])})" if len(unknown) > 1 else "")
            + f"; known keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    values = {name: _coerce(hints[name], data[name], prefix + name) for name in names if name in data}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` converted to the type ``hint``, or ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: must be a list of {len(args)} values, got {value!r}")
            return tuple(
                _coerce(arg, item, f"{key}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True))
            )
        items = [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return value
    return _scalar(hint, value, key)


def _scalar(hint: type, value: Any, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # torch, numpy and C code take 64-bit integers
            raise ConfigError(f"{key}: must be an integer of at most 19 digits, got {value!r}")
        return value
    if hint is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string: accept any text that Python reads as a number.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        # Values go into float32 tensors and into the exported model's JSON, which holds finite numbers only.
        if not abs(value) <= _FLOAT32_MAX:
            raise ConfigError(
                f"{key}: must be a finite number (at most {_FLOAT32_MAX:.3g} in magnitude), got {value!r}"
            )
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")  # a programming error in this module
