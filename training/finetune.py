"""Start a run from the weights of a trained model (fine-tuning), e.g. the bundled default model.

``model.init_from`` names a plugin checkpoint (``.safetensors``, as exported by a run); its weights are
copied into the freshly built network before training. The checkpoint must match the config's architecture,
parameterisation and noise schedule, so that the weights mean the same thing; anything else raises ConfigError
naming the file and the fields that differ. One difference is allowed: a network with ``model.contrast_channel``
may start from one without; the new input channel's weights start at zero, so the network starts out drawing what
the checkpoint draws and learns to use each particle's contrast. A resumable training state in the run directory
takes precedence, because it continues this same run.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from napari_iscat_diffusion.diffusion.checkpoint import CheckpointError, load_checkpoint, read_model_config
from napari_iscat_diffusion.diffusion.model_config import ModelConfig
from napari_iscat_diffusion.diffusion.particle_contrast import ContrastPrior
from napari_iscat_diffusion.diffusion.schedules import schedule_from_config

from .config import ConfigError, TrainConfig

log = logging.getLogger("training")

# The first convolution, whose input channels are the image's and then the condition's (the contrast channel last).
_INPUT_WEIGHT = "conv_in.weight"


def load_initial_weights(model: torch.nn.Module, config: TrainConfig) -> str:
    """Copy the weights of the checkpoint ``config.model.init_from`` into ``model`` (in place).

    Returns:
        the hex SHA-256 of the checkpoint file (the run's provenance).

    Raises:
        ConfigError: the file cannot be loaded or does not fit the configured model.
    """
    path = config.model.init_from
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"model.init_from: {err}") from err
    differences = _differences(config, loaded.config)
    if differences:
        raise ConfigError(
            f"model.init_from: the checkpoint {path} does not fit the configured model: "
            + "; ".join(differences)
            + ". Set the model section to the checkpoint's values (iscat-diffusion info CHECKPOINT prints them)."
        )
    state = loaded.net.state_dict()
    if config.unet_config().contrast_channel and not loaded.config.unet.contrast_channel:
        log.info("%s has no contrast channel: its input weights for that channel start at zero", path)
        weight = state[_INPUT_WEIGHT]
        state[_INPUT_WEIGHT] = torch.cat([weight, weight.new_zeros(weight.shape[0], 1, *weight.shape[2:])], dim=1)
    with torch.no_grad():
        model.load_state_dict(state)
    return loaded.sha256


def initial_normalization(config: TrainConfig, channels: int) -> dict:
    """The normalisation (``{"mean": [C], "std": [C]}``, physical units) stored in ``config.model.init_from``.

    Raises:
        ConfigError: the file cannot be loaded or holds another number of channels than ``channels``.
    """
    path = config.model.init_from
    try:
        normalization = read_model_config(path).normalization
    except CheckpointError as err:
        raise ConfigError(f"model.init_from: {err}") from err
    if len(normalization["std"]) != channels:
        raise ConfigError(
            f"data.normalization: init_from: {path} is normalised for {len(normalization['std'])} channel(s), "
            f"the images have {channels}"
        )
    return normalization


def initial_contrast_prior(config: TrainConfig) -> ContrastPrior | None:
    """The particle-contrast prior stored in ``config.model.init_from`` (None for a file without a contrast channel).

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        return read_model_config(config.model.init_from).particle_contrast
    except CheckpointError as err:
        raise ConfigError(f"model.init_from: {err}") from err


def _differences(config: TrainConfig, stored: ModelConfig) -> list[str]:
    wanted = dataclasses.asdict(config.unet_config())
    found = dataclasses.asdict(stored.unet)
    differences = [
        f"model.{name} is {wanted[name]!r} in the config but {found[name]!r} in the checkpoint"
        for name in wanted
        if wanted[name] != found[name] and not (name == "contrast_channel" and wanted[name])
    ]
    if config.model.parameterization != stored.parameterization:
        differences.append(
            f"model.parameterization is {config.model.parameterization!r} in the config "
            f"but {stored.parameterization!r} in the checkpoint"
        )
    if schedule_from_config(config.model.schedule).to_config() != schedule_from_config(stored.schedule).to_config():
        differences.append(
            f"model.schedule is {config.model.schedule!r} in the config but {stored.schedule!r} in the checkpoint"
        )
    return differences
