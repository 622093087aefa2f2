"""The trained model as the plugin loads it: EMA weights plus a ``ModelConfig`` in one ``.safetensors`` file."""

from __future__ import annotations

import os

import torch

from napari_iscat_diffusion.diffusion.checkpoint import ModelConfig, save_checkpoint
from napari_iscat_diffusion.diffusion.particle_contrast import ContrastPrior
from napari_iscat_diffusion.diffusion.unet import ConditionalUNet

from .config import TrainConfig


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


def export_model(
    path: str | os.PathLike, ema_net: ConditionalUNet, model_config: ModelConfig, *, fp16: bool = False
) -> str:
    """Write the EMA network and its config for the plugin (optionally fp16); returns the file's SHA-256."""
    return save_checkpoint(path, ema_net, model_config, dtype=torch.float16 if fp16 else None)
