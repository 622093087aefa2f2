"""The denoising training loss, matched to the sampler side through one schedule and one parameterisation."""

from __future__ import annotations

import torch
from torch import nn

from napari_iscat_diffusion.diffusion.conditioning import null_condition
from napari_iscat_diffusion.diffusion.parameterization import Parameterization, target_from_x0_eps
from napari_iscat_diffusion.diffusion.schedules import DiscreteSchedule


def diffusion_loss(
    net: nn.Module,
    schedule: DiscreteSchedule,
    parameterization: Parameterization,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    cond_drop_prob: float = 0.1,
    min_snr_gamma: float | None = None,
    min_snr_floor: float = 0.0,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    particle_weight: float = 0.0,
    particle_radius_px: int = 4,
) -> torch.Tensor:
    """Mean denoising loss of ``net`` on a batch of clean images.

    Args:
        net: the network, called as ``net(x_t, t, cond)``.
        schedule: the discrete schedule the network is trained on.
        parameterization: what the network predicts ("eps", "v" or "x0").
        x0: clean normalised images (N, C, H, W).
        cond: conditions (N, K+1, H, W) from ``encode_condition``; rows that are all zero are
            already unconditional (images without masks).
        cond_drop_prob: probability of replacing an image's condition by the null condition, which
            trains the unconditional branch for classifier-free guidance.
        min_snr_gamma: if given, weight each image's loss by min(SNR, gamma) / SNR expressed for the
            chosen target (Hang et al. 2023); None gives the plain mean squared error of the target.
        min_snr_floor: with ``min_snr_gamma``, the weight of the clean-image error is
            ``max(min(SNR, gamma), floor)``: noise levels above sigma = floor^-1/2 (in units of the signal)
            count as much as that level instead of 1 / sigma^2. 0 is Hang et al.'s min-SNR.
        generator: random generator for timesteps, noise and condition dropout (on x0's device).
        timesteps: int64 timesteps (N,) to use instead of random ones (a fixed grid for validation).
        particle_weight: extra weight of the pixels within ``particle_radius_px`` (px, square neighbourhood)
            of a labelled pixel of the condition the network sees: those pixels count ``1 + particle_weight``
            times, and each image's loss is the weighted mean. 0 gives every pixel the same weight.
        particle_radius_px: how far around the mask the extra weight reaches (px).

    Returns:
        a scalar float32 loss. Noise, targets and the loss are computed in float32 whatever the
        network's autocast precision.
    """
    n = x0.shape[0]
    device = x0.device
    x0 = x0.float()
    if timesteps is None:
        t = torch.randint(0, schedule.num_timesteps, (n,), device=device, generator=generator)
    else:
        t = timesteps.to(device=device, dtype=torch.long)
    alpha_bar = schedule.alphas_cumprod.to(device)[t].float().view(-1, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    eps = torch.randn(x0.shape, device=device, generator=generator)
    x_t = alpha * x0 + sigma * eps
    drop = torch.rand(n, device=device, generator=generator) < cond_drop_prob
    cond = torch.where(drop.view(-1, 1, 1, 1), null_condition(cond), cond)
    prediction = net(x_t, t.float(), cond).float()
    target = target_from_x0_eps(x0, eps, alpha, sigma, parameterization)
    squared = (prediction - target).pow(2)
    if particle_weight > 0:
        # Particles cover a few per cent of an iSCAT image, so a plain mean spends the network's capacity on
        # background speckle and noise. The weight depends only on the condition the network is given, so the
        # best prediction at every pixel is still the conditional mean: the weighting moves effort, not the target.
        weight = 1 + particle_weight * particle_neighbourhood(cond, particle_radius_px)
        per_image = (weight * squared).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * squared.shape[1])
    else:
        per_image = squared.mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        per_image = per_image * _min_snr_weight(alpha_bar.view(-1), min_snr_gamma, parameterization, min_snr_floor)
    return per_image.mean()


def particle_neighbourhood(cond: torch.Tensor, radius_px: int) -> torch.Tensor:
    """(N, 1, H, W) float map, 1 at pixels within ``radius_px`` (px, square neighbourhood) of a labelled pixel of
    the condition (N, K+1, H, W) and 0 elsewhere; all 0 for null conditions."""
    labelled = cond[:, :-1].amax(dim=1, keepdim=True).float()
    return torch.nn.functional.max_pool2d(labelled, kernel_size=2 * radius_px + 1, stride=1, padding=radius_px)


def _min_snr_weight(
    alpha_bar: torch.Tensor, gamma: float, parameterization: Parameterization, floor: float = 0.0
) -> torch.Tensor:
    # min(SNR, gamma) is the weight of the x0 loss; eps and v losses are that x0 loss scaled by SNR and SNR + 1.
    # Without a floor the x0 loss at high noise weighs SNR = 1 / sigma^2, which leaves the levels at which the
    # particles' contrasts are decided (sigma 30-80 for 300-600 nm particles in normalised units) almost untrained.
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(min=floor, max=gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "v":
        return clipped / (snr + 1)
    return clipped
