"""Classifier-free guidance (Ho and Salimans 2022) as one batched forward pass.

With guidance scale ``w`` the guided prediction is ``x0 = x0_uncond + w * (x0_cond - x0_uncond)``.
At a fixed ``x`` and ``sigma``, eps, v and x0 are affine in one another, so guiding x0 is the same
as guiding eps. ``w = 1`` runs the conditional branch only and ``w = 0`` the unconditional branch
only; any other ``w`` runs both branches as one batch of 2N.
"""

from __future__ import annotations

import torch

from .denoiser import ConditionalDenoiser, Denoiser


def guided_denoiser(
    cond_denoise: ConditionalDenoiser, cond: torch.Tensor, null_cond: torch.Tensor, scale: float
) -> Denoiser:
    """Bind a condition to a conditional denoiser, with classifier-free guidance.

    Args:
        cond_denoise: ``cond_denoise(x, sigma, cond) -> x0_hat``, for example a ``DiscreteTimeDenoiser``.
        cond: the condition (N, K+1, H, W).
        null_cond: the unconditional input of the same shape (see ``conditioning.null_condition``).
        scale: guidance scale w.

    Returns:
        A denoiser ``denoise(x, sigma) -> x0_hat`` for x (N, C, H, W) and sigma (N,).
    """
    if cond.shape != null_cond.shape:
        raise ValueError(f"cond and null_cond differ in shape: {tuple(cond.shape)} and {tuple(null_cond.shape)}")
    scale = float(scale)

    if scale == 1.0:

        def conditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return cond_denoise(x, sigma, cond)

        return conditional

    if scale == 0.0:

        def unconditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return cond_denoise(x, sigma, null_cond)

        return unconditional

    both = torch.cat([cond, null_cond])

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0_cond, x0_uncond = cond_denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return x0_uncond + scale * (x0_cond - x0_uncond)

    return guided
