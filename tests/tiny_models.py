"""Tiny networks for fast tests on the CPU."""

import numpy as np
import torch

from napari_iscat_diffusion.diffusion import ConditionalUNet, ModelConfig, linear_schedule, save_checkpoint
from napari_iscat_diffusion.diffusion.particle_contrast import NUM_QUANTILE_LEVELS, ContrastPrior
from napari_iscat_diffusion.diffusion.unet import UNetConfig

TINY_UNET = {
    "base_channels": 8,
    "channel_mults": (1, 2),
    "num_res_blocks": 1,
    "attention_levels": (1,),
    "num_heads": 2,
    "norm_groups": 4,
}


def tiny_unet_config(**overrides) -> UNetConfig:
    """A two-level U-Net config with 8 base channels (about 30k parameters); keyword arguments override fields."""
    return UNetConfig(**{"num_classes": 2, **TINY_UNET, **overrides})


def save_tiny_checkpoint(
    path, *, training: dict | None = None, perturbed: bool = False, config_fields: dict | None = None, **unet_overrides
) -> str:
    """Save a tiny model (v-prediction, 60 nm/px, std 0.01) at ``path``, with ``training`` as its training summary and
    ``config_fields`` overriding ``ModelConfig`` fields; untrained, or with ``perturbed_net``'s weights. Returns its
    sha256."""
    unet = tiny_unet_config(**unet_overrides)
    config = ModelConfig(
        unet=unet,
        schedule=linear_schedule(1000).to_config(),
        parameterization="v",
        **{
            "normalization": {"mean": [0.0], "std": [0.01]},
            "pixel_size_nm": 60.0,
            "training": training or {},
            **(config_fields or {}),
        },
    )
    torch.manual_seed(0)
    return save_checkpoint(path, perturbed_net(unet) if perturbed else ConditionalUNet(unet), config)


def perturbed_net(unet: UNetConfig, seed: int = 0) -> ConditionalUNet:
    """The network of ``unet`` with every parameter perturbed (seeded), so that its zero-initialised output is not
    trivial; in eval mode."""
    torch.manual_seed(seed)
    net = ConditionalUNet(unet)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return net.eval()


def uniform_contrast_prior(ranges: dict[int, tuple[float, float]], scale: float = 2.0) -> ContrastPrior:
    """A particle-contrast prior uniform between ``(low, high)`` (normalised units) for each class label."""
    return ContrastPrior(scale, 2.0, {k: np.linspace(lo, hi, NUM_QUANTILE_LEVELS) for k, (lo, hi) in ranges.items()})
