"""Sigma grids fitted so that DPM-Solver++ 2M keeps Gaussian data's variance in few steps.

For Gaussian data of variance P the probability-flow ODE is exact: started from the exact marginal, a
perfect solver ends with variance P. DPM-Solver++ 2M on a grid uniform in log-SNR ends 5-10 % wider at
10-20 steps (``benchmarks/sampler_gaussian_bias.py``): its linear extrapolation of the prediction
overshoots where a frequency's prediction turns from noise to signal (at sigma about sqrt(P)). An iSCAT
background (shot noise and speckle) is close to Gaussian, frequency by frequency, so that error is a
background drawn a few per cent too strong, which a two-sample classifier sees at once.

The fitted grid keeps the log-SNR grid's ends and moves its inner noise levels so that the solver's output
variance matches P over a range of spectral densities (least squares on ``log(output / P)``): the idea of
Sabour et al. 2024 ("Align Your Steps"), with the exact Gaussian solution as the target. The range is the
model's (``ModelConfig.sampling_density_range``): the power per frequency of its normalised training
images, from the white noise floor to the strongest low frequencies.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from scipy.optimize import least_squares

from .samplers import get_sampler, log_snr_sigmas

# The samplers whose grid is fitted: deterministic, so that their output on Gaussian data is a fixed multiple of
# the start, and second order; of those, DPM-Solver++ 2M, the default, at one network pass per step (Heun is
# within 3 % from 40 steps on the log-SNR grid and costs two passes per step). A first-order step (Euler, DDIM)
# keeps a Gaussian's scale as the mean of 1 and sigma' / sigma weighted by P / (P + sigma^2), where the exact flow
# keeps their root mean square: by Jensen's inequality every step loses variance, on every grid, so no placement
# of the steps recovers it.
FITTED_SAMPLERS: tuple[str, ...] = ("dpmpp_2m",)
# Spectral densities the fit checks, log-spaced over the range.
NUM_DENSITIES = 41
# Bounds of the fit's parameters (log-steps proportional to their softplus): the longest step is at most 4.5
# times the shortest. Unbounded, the fit puts two noise levels almost together, and the multistep
# extrapolation that follows divides by that tiny step, amplifying the network's small errors.
_RAW_BOUNDS = (-0.5, 2.0)


def gaussian_variance_ratios(
    sampler: str,
    sigmas: torch.Tensor,
    densities: np.ndarray,
    *,
    samples: int | None = None,
    seed: int = 0,
    options: dict | None = None,
) -> np.ndarray:
    """Output variance over P for Gaussian data of each variance P in ``densities`` (normalised units^2),
    sampled by ``sampler`` on the grid ``sigmas`` (descending, ending at 0) with the exact denoiser
    ``P / (P + sigma^2) x`` from the exact marginal at ``sigmas[0]``. 1 everywhere is exact.

    The deterministic samplers are linear in x for a linear denoiser, so their ratio is computed without
    random numbers. A stochastic sampler (DDPM, the SDE) needs ``samples``, the number of Monte Carlo draws per
    density (standard error about ``sqrt(2 / samples)``), seeded by ``seed``; ``options`` are extra keyword
    arguments of the sampler (``noise_sigma_min``). The samplers of the discrete training grid step on
    ``sigmas`` like the others (``LoadedModel.sampling_sigmas`` gives their grid)."""
    info = get_sampler(sampler)
    if info.stochastic and (samples is None or samples < 2):
        raise ValueError(f"{sampler!r} adds fresh noise: give samples >= 2 for a Monte Carlo estimate")
    variance = torch.as_tensor(np.asarray(densities, dtype=np.float64)).reshape(-1, 1, 1, 1)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return variance / (variance + sigma.reshape(-1, 1, 1, 1) ** 2) * x

    start = (variance + float(sigmas[0]) ** 2).sqrt()
    if not info.stochastic:
        out = info.function(denoise, start, sigmas.to(torch.float64))
        return (out**2 / variance).reshape(-1).numpy()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(variance))]
    draws = torch.stack([torch.randn(1, 1, samples, generator=g, dtype=torch.float64) for g in generators])
    # Scaled to exactly unit mean square, so that only the sampler's own noise is left to the estimate's error.
    start = start * draws / (draws**2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    out = info.function(denoise, start, sigmas.to(torch.float64), generators=generators, **(options or {}))
    return ((out**2).mean(dim=(1, 2, 3)) / variance.reshape(-1)).numpy()


def _grid(raw: np.ndarray, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The grid from sigma_max to sigma_min whose log-sigma steps are proportional to softplus(raw), then 0.

    ``raw`` stays within ``_RAW_BOUNDS``, so that no step shrinks to nothing."""
    steps = np.logaddexp(0.0, raw)
    fractions = np.cumsum(steps) / steps.sum()
    log_sigmas = math.log(sigma_max) + fractions * (math.log(sigma_min) - math.log(sigma_max))
    return torch.tensor([sigma_max, *np.exp(log_sigmas[:-1]), sigma_min, 0.0], dtype=torch.float64)


@lru_cache(maxsize=64)
def fitted_sigmas(steps: int, sigma_min: float, sigma_max: float, density_range: tuple[float, float]) -> torch.Tensor:
    """The DPM-Solver++ 2M grid of ``steps`` steps from sigma_max to sigma_min (then 0), fitted to keep the
    variance of Gaussian data with spectral densities in ``density_range`` (low, high; normalised units^2).

    Returns float64 (steps + 1,), descending, ending at 0, like ``log_snr_sigmas``; the log-SNR grid itself
    where fitting does not lower its largest error (one or two steps, or a range it already fits)."""
    low, high = density_range
    if not 0 < low < high or not math.isfinite(high):
        raise ValueError(f"density range must be 0 < low < high, finite; got {density_range}")
    plain = log_snr_sigmas(steps, sigma_min, sigma_max)
    if steps < 3:
        return plain
    densities = np.geomspace(low, high, NUM_DENSITIES)

    def residuals(raw: np.ndarray) -> np.ndarray:
        return np.log(gaussian_variance_ratios("dpmpp_2m", _grid(raw, sigma_min, sigma_max), densities))

    uniform = np.full(steps - 1, math.log(math.e - 1))  # softplus = 1: equal steps, the log-SNR grid
    fit = least_squares(residuals, uniform, bounds=_RAW_BOUNDS)
    fitted = _grid(fit.x, sigma_min, sigma_max)
    worst = np.abs(fit.fun).max()
    plain_worst = np.abs(np.log(gaussian_variance_ratios("dpmpp_2m", plain, densities))).max()
    return fitted if worst < plain_worst else plain
