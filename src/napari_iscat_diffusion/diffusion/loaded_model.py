"""A network ready for sampling with its config and provenance, and the sampling policy that its config sets:
the default sampler and step count, the SDE options, the sigma grid and the denoiser."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..terminal import printable
from .denoiser import DiscreteTimeDenoiser
from .grid_fit import FITTED_SAMPLERS, fitted_sigmas
from .model_config import ModelConfig
from .samplers import DEFAULT_SAMPLER, get_sampler, sampling_sigmas
from .schedules import DiscreteSchedule, schedule_from_config
from .unet import ConditionalUNet


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
