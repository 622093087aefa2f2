"""Tiny networks for fast tests on the CPU."""

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
