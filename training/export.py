"""The trained model as the plugin loads it: EMA weights plus a ``ModelConfig`` in one ``.safetensors`` file."""

from __future__ import annotations

import os

import torch

from napari_iscat_diffusion.diffusion.checkpoint import save_checkpoint
from napari_iscat_diffusion.diffusion.model_config import ModelConfig
from napari_iscat_diffusion.diffusion.unet import ConditionalUNet


def export_model(
    path: str | os.PathLike, ema_net: ConditionalUNet, model_config: ModelConfig, *, fp16: bool = False
) -> str:
    """Write the EMA network and its config for the plugin (optionally fp16); returns the file's SHA-256."""
    return save_checkpoint(path, ema_net, model_config, dtype=torch.float16 if fp16 else None)
