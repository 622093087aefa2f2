"""The one denoiser interface that every sampler uses, and the wrapper that gives it to a discrete-time network.

A *denoiser* is any callable ``denoise(x, sigma) -> x0_hat`` where ``x`` (N, C, H, W) is a noisy
image in sigma space (``x = x0 + sigma * eps``), ``sigma`` (N,) its noise level, and ``x0_hat``
(N, C, H, W) the predicted clean image. Samplers see nothing else of the model, so every sampler
serves every network parameterisation and schedule (the design of k-diffusion's ``external.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .parameterization import Parameterization, to_x0_eps
from .schedules import DiscreteSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ConditionalDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DiscreteTimeDenoiser:
    """Wrap a network ``net(x_t, t, cond) -> prediction`` trained on a discrete VP schedule.

    Calling the wrapper as ``denoiser(x, sigma, cond)`` scales the sigma-space input to the
    network's variance-preserving input ``x_t = x / sqrt(1 + sigma^2)``, maps sigma to a continuous
    timestep, and converts the prediction (eps, v or x0) into ``x0_hat``. The network runs in the
    dtype of ``x``; the conversion is done in float32 at least.
    """

    def __init__(self, net: nn.Module, schedule: DiscreteSchedule, parameterization: Parameterization) -> None:
        self.net = net
        self.schedule = schedule
        self.parameterization = parameterization

    @property
    def sigma_min(self) -> float:
        """Smallest noise level the network was trained on."""
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        """Largest noise level the network was trained on."""
        return self.schedule.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predict x0 from x (N, C, H, W) at noise levels sigma (N,) given the condition cond (N, K+1, H, W)."""
        work_dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = sigma.to(device=x.device, dtype=work_dtype).reshape(-1, 1, 1, 1)
        alpha = (1.0 + sigma**2).rsqrt()
        noise_std = sigma * alpha
        x_t = x.to(work_dtype) * alpha
        t = self.schedule.sigma_to_t(sigma.reshape(-1))
        prediction = self.net(x_t.to(x.dtype), t, cond.to(x.dtype)).to(work_dtype)
        x0, _ = to_x0_eps(prediction, x_t, alpha, noise_std, self.parameterization)
        return x0.to(x.dtype)
