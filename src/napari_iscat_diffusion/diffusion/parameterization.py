"""What a network predicts (epsilon, v or x0) and exact conversions between the three.

With ``x_t = alpha * x0 + sigma * eps`` and ``alpha^2 + sigma^2 = 1`` (variance preserving,
``alpha = sqrt(alpha_bar)``), the velocity is ``v = alpha * eps - sigma * x0`` (Salimans and Ho 2022).
Each of (eps, v, x0) together with ``x_t`` determines the other two:

- ``x0 = (x_t - sigma * eps) / alpha``,  ``eps = (x_t - alpha * x0) / sigma``,
- ``x0 = alpha * x_t - sigma * v``,      ``eps = sigma * x_t + alpha * v``.

``alpha`` and ``sigma`` broadcast against the images (for example shape (N, 1, 1, 1)).
"""

from __future__ import annotations

from typing import Literal

import torch

Parameterization = Literal["eps", "v", "x0"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "v", "x0")


def _check(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterisation {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def to_x0_eps(
    prediction: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    parameterization: Parameterization,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network prediction at ``x_t`` into the implied clean image and noise, ``(x0, eps)``."""
    _check(parameterization)
    if parameterization == "eps":
        eps = prediction
        return (x_t - sigma * eps) / alpha, eps
    if parameterization == "x0":
        x0 = prediction
        return x0, (x_t - alpha * x0) / sigma
    v = prediction
    return alpha * x_t - sigma * v, sigma * x_t + alpha * v


def target_from_x0_eps(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    parameterization: Parameterization,
) -> torch.Tensor:
    """The quantity a network with this parameterisation is trained to predict, given x0 and eps."""
    _check(parameterization)
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    return alpha * eps - sigma * x0


def convert_prediction(
    prediction: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    source: Parameterization,
    target: Parameterization,
) -> torch.Tensor:
    """Convert a prediction from one parameterisation to another at the same ``x_t``."""
    x0, eps = to_x0_eps(prediction, x_t, alpha, sigma, source)
    return target_from_x0_eps(x0, eps, alpha, sigma, target)
