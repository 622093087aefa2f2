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


def std_ratio(own: dict, target: dict) -> float:
    """The factor target std / own std of two normalisations (``{"mean": [C], "std": [C]}``), by which a noise level
    in ``target``'s units becomes one in ``own``'s; ValueError when the channels' factors differ."""
    ratios = [t / o for o, t in zip(own["std"], target["std"], strict=True)]
    if max(ratios) > min(ratios) * (1 + 1e-6):
        raise ValueError(f"the two normalisations scale the channels differently (std ratios {ratios})")
    return ratios[0]


def in_other_units(cond_denoise: ConditionalDenoiser, own: dict, target: dict) -> ConditionalDenoiser:
    """A conditional denoiser trained in the normalised units ``own`` (``{"mean": [C], "std": [C]}``), called in
    the units ``target``: inputs, noise levels and predictions are converted, so that two networks trained on
    the same data with slightly different normalisation statistics can share one sampler. Every channel's std
    must differ by the same factor (sigma is one number per image); ValueError otherwise."""
    ratio = std_ratio(own, target)
    shift = ((torch.tensor(target["mean"]) - torch.tensor(own["mean"])) / torch.tensor(own["std"])).view(1, -1, 1, 1)
    if ratio == 1.0 and not bool(shift.any()):
        return cond_denoise

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        offset = shift.to(device=x.device, dtype=x.dtype)
        x0_own = cond_denoise(x * ratio + offset, sigma * ratio, cond)
        return (x0_own - offset) / ratio

    return denoise


class NoiseLevelSwitch:
    """Two denoisers split by noise level, an ensemble of expert denoisers (Balaji et al. 2022, eDiff-I): ``high``
    denoises at ``sigma > sigma_switch`` (normalised units), ``low`` at and below, so that each network spends its
    capacity on part of the noise levels.

    With ``weight`` (N, 1, H, W), values in [0, 1] on the images' device, the prediction above the switch is
    ``low + weight * (high - low)``: the expert draws only where the weight is 1 (around the particles of some
    classes, ``conditioning.class_zone``) and both networks run there; ``weight`` None hands over every pixel,
    at one network pass per step. Extra arguments (a condition) are passed on to both denoisers.
    """

    def __init__(self, low: Callable, high: Callable, sigma_switch: float, weight: torch.Tensor | None = None) -> None:
        self.low, self.high, self.sigma_switch, self.weight = low, high, float(sigma_switch), weight
        # An all-zero zone (no particle of the expert's classes in these masks) never needs the expert.
        self._needs_high = weight is None or bool(weight.any())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """Predict x0 (N, C, H, W) from x (N, C, H, W) at noise levels sigma (N,)."""
        above = sigma.reshape(-1) > self.sigma_switch
        # A sampler step has one noise level for the whole batch; only a caller that mixes levels pays for both.
        if not self._needs_high or not bool(above.any()):
            return self.low(x, sigma, *cond)
        high = self.high(x, sigma, *cond)
        if self.weight is None and bool(above.all()):
            return high
        low = self.low(x, sigma, *cond)
        if self.weight is not None:
            high = low + self.weight.to(high.dtype) * (high - low)
        if bool(above.all()):
            return high
        return torch.where(above.to(x.device).view(-1, *[1] * (x.ndim - 1)), high, low)
