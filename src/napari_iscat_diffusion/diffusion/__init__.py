"""The diffusion core: pure torch, no napari or Qt.

Schedules, parameterisations, samplers, classifier-free guidance, the conditional U-Net,
model configs, checkpoints and ``generate()``, the one entry point that the plugin, the command line and the
benchmarks call. Conventions: ``docs/diffusion-core.md``.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .conditioning import check_mask, encode_condition, null_condition, validate_mask
from .device import available_devices, resolve_device
from .generate import GenerationProgress, NonFiniteImageError, generate
from .loaded_model import LoadedModel
from .model_config import ModelConfig
from .samplers import SAMPLERS, SamplingCancelled, get_sampler, sampling_sigmas
from .schedules import DiscreteSchedule, cosine_schedule, karras_sigmas, linear_schedule, log_snr_sigmas
from .unet import ConditionalUNet, UNetConfig

__all__ = [
    "SAMPLERS",
    "CheckpointError",
    "ConditionalUNet",
    "DiscreteSchedule",
    "GenerationProgress",
    "LoadedModel",
    "ModelConfig",
    "NonFiniteImageError",
    "SamplingCancelled",
    "UNetConfig",
    "available_devices",
    "check_mask",
    "cosine_schedule",
    "encode_condition",
    "generate",
    "get_sampler",
    "karras_sigmas",
    "linear_schedule",
    "load_checkpoint",
    "log_snr_sigmas",
    "null_condition",
    "resolve_device",
    "sampling_sigmas",
    "save_checkpoint",
    "validate_mask",
]
