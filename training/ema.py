"""Exponential moving average of the weights, with a half-life in images and a ramp-up (EDM style).

After each optimiser step that saw ``batch_images`` images (over all ranks and micro-steps):

    half_life = min(half_life_images, images_seen * rampup_ratio)   # images_seen: before this step
    beta = 0.5 ** (batch_images / max(half_life, 1e-8))
    ema = beta * ema + (1 - beta) * weights

so the average forgets half of its past every ``half_life`` images, whatever the batch or world size;
the ramp-up keeps early, random weights from lingering. The EMA is a copy of the unwrapped module
(never the DDP or ``torch.compile`` wrapper, whose parameter names carry ``module.`` or ``_orig_mod.``
prefixes); DDP keeps the weights identical on every rank, so every rank's EMA is identical too.
``images_seen`` is part of the state, so a resumed run continues the ramp-up exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def ema_beta(batch_images: int, images_seen: int, half_life_images: float, rampup_ratio: float | None) -> float:
    """The EMA decay for one step of ``batch_images`` images taken after ``images_seen`` images."""
    half_life = half_life_images
    if rampup_ratio is not None:
        half_life = min(half_life, images_seen * rampup_ratio)
    return 0.5 ** (batch_images / max(half_life, 1e-8))


class Ema:
    """The EMA of a model's parameters (buffers are copied, not averaged).

    Args:
        model: the trained model, possibly wrapped in DDP or ``torch.compile``.
        half_life_images: the half-life in images.
        rampup_ratio: ramp-up ratio (see the module docstring), None for none.
    """

    def __init__(self, model: nn.Module, half_life_images: float, rampup_ratio: float | None) -> None:
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.half_life_images = half_life_images
        self.rampup_ratio = rampup_ratio
        self.images_seen = 0

    @torch.no_grad()
    def update(self, model: nn.Module, batch_images: int) -> float:
        """Blend in the model's current weights after a step of ``batch_images`` images; returns beta."""
        beta = ema_beta(batch_images, self.images_seen, self.half_life_images, self.rampup_ratio)
        source = unwrap(model)
        for ema_param, param in zip(self.module.parameters(), source.parameters(), strict=True):
            ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - beta)
        for ema_buffer, buffer in zip(self.module.buffers(), source.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.images_seen += batch_images
        return beta

    def skip(self, batch_images: int) -> None:
        """Count the images of a step that was skipped (non-finite loss) without changing the average."""
        self.images_seen += batch_images

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights by plain parameter names (no wrapper prefixes)."""
        return self.module.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor], images_seen: int) -> None:
        """Restore the averaged weights and the image counter of a saved run."""
        self.module.load_state_dict(weights)
        self.images_seen = images_seen
