"""The fitted sigma grid: DPM-Solver++ 2M on it keeps Gaussian data's variance where the log-SNR grid widens it."""

import math

import numpy as np
import pytest
import torch

from napari_iscat_diffusion.diffusion.grid_fit import fitted_sigmas, gaussian_variance_ratios
from napari_iscat_diffusion.diffusion.samplers import log_snr_sigmas, sample_dpmpp_2m

SIGMA_MIN, SIGMA_MAX = 0.0064, 2000.0
DENSITIES = (0.3, 1500.0)


def monte_carlo_variance_ratio(sigmas, variance, n=200_000):
    """Output variance over data variance of DPM-Solver++ 2M on Gaussian samples drawn at random."""
    start = math.sqrt(variance + float(sigmas[0]) ** 2) * torch.randn(
        n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    out = sample_dpmpp_2m(lambda x, sigma: variance / (variance + sigma.view(-1, 1, 1, 1) ** 2) * x, start, sigmas)
    return float(out.var()) / variance


def test_the_exact_ratio_is_what_random_gaussian_samples_give():
    sigmas = log_snr_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    exact = gaussian_variance_ratios("dpmpp_2m", sigmas, np.array([0.45, 30.0]))
    sampled = [monte_carlo_variance_ratio(sigmas, p) for p in (0.45, 30.0)]
    assert np.allclose(exact, sampled, rtol=0.01)  # 200,000 samples: standard error 0.3 %
    assert exact.min() > 1.04  # the log-SNR grid's error the fit removes


@pytest.mark.parametrize("steps", [8, 10, 20])
def test_the_fitted_grid_keeps_gaussian_variance_where_the_log_snr_grid_widens_it(steps):
    densities = np.geomspace(*DENSITIES, 17)
    grid = fitted_sigmas(steps, SIGMA_MIN, SIGMA_MAX, DENSITIES)
    assert grid.dtype == torch.float64 and len(grid) == steps + 1
    assert grid[0] == SIGMA_MAX and grid[-2] == pytest.approx(SIGMA_MIN) and grid[-1] == 0
    log_steps = torch.diff(-torch.log(grid[:-1]))
    # No two noise levels almost together: the multistep extrapolation would divide by their tiny step.
    assert torch.all(log_steps > 0) and log_steps.max() / log_steps.min() < 4.6
    plain_error = np.abs(
        gaussian_variance_ratios("dpmpp_2m", log_snr_sigmas(steps, SIGMA_MIN, SIGMA_MAX), densities) - 1
    )
    fitted_error = np.abs(gaussian_variance_ratios("dpmpp_2m", grid, densities) - 1)
    assert plain_error.max() > 0.04 and fitted_error.max() < 0.02
    # Random samples agree: the fit is not an artefact of the exact computation.
    assert abs(monte_carlo_variance_ratio(grid, 2.0) - 1) < 0.015


def test_too_few_steps_keep_the_log_snr_grid_and_bad_ranges_are_refused():
    assert torch.equal(fitted_sigmas(2, SIGMA_MIN, SIGMA_MAX, DENSITIES), log_snr_sigmas(2, SIGMA_MIN, SIGMA_MAX))
    for bad in [(10.0, 1.0), (0.0, 1.0), (0.1, math.inf)]:
        with pytest.raises(ValueError, match="density range"):
            fitted_sigmas(10, SIGMA_MIN, SIGMA_MAX, bad)


def test_the_sde_ratio_is_a_seeded_monte_carlo_estimate_that_agrees_with_the_ode_where_no_noise_is_added():
    densities = np.array([0.45, 30.0, 800.0])
    coarse = log_snr_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    ode = gaussian_variance_ratios("dpmpp_2m", coarse, densities)
    never = {"noise_sigma_min": 1e9}  # every step at or below it follows the ODE
    silent = gaussian_variance_ratios("dpmpp_2m_sde", coarse, densities, samples=1000, options=never)
    assert np.allclose(silent, ode, rtol=1e-9)  # the start is scaled to its exact variance: nothing random is left
    noisy = gaussian_variance_ratios("dpmpp_2m_sde", coarse, densities, samples=100_000)
    again = gaussian_variance_ratios("dpmpp_2m_sde", coarse, densities, samples=100_000)
    assert np.array_equal(noisy, again) and np.abs(noisy - ode).max() > 0.02
    # With noise on every step and a fine grid, the reverse SDE is exact too.
    fine = log_snr_sigmas(200, SIGMA_MIN, SIGMA_MAX)
    sde = gaussian_variance_ratios("dpmpp_2m_sde", fine, densities, samples=50_000, seed=3)
    assert np.allclose(sde, 1.0, atol=0.03), sde


def test_a_stochastic_sampler_without_samples_is_refused():
    grid = log_snr_sigmas(4, SIGMA_MIN, SIGMA_MAX)
    for sampler in ("dpmpp_2m_sde", "ddpm"):
        with pytest.raises(ValueError, match=f"{sampler}' adds fresh noise: give samples"):
            gaussian_variance_ratios(sampler, grid, np.array([1.0]))


def test_first_order_samplers_lose_variance_on_every_grid_and_less_with_more_steps():
    densities = np.geomspace(*DENSITIES, 9)
    rng = np.random.default_rng(0)
    for _ in range(5):  # grids with random inner noise levels
        inner = np.sort(rng.uniform(math.log(SIGMA_MIN), math.log(SIGMA_MAX), 8))[::-1]
        grid = torch.tensor([SIGMA_MAX, *np.exp(inner), SIGMA_MIN, 0.0], dtype=torch.float64)
        euler = gaussian_variance_ratios("euler", grid, densities)
        assert (euler < 1).all(), euler
        # DDIM's step is Euler's: on one grid they agree.
        assert np.allclose(gaussian_variance_ratios("ddim", grid, densities), euler, rtol=1e-12)
    losses = [
        1 - gaussian_variance_ratios("euler", log_snr_sigmas(n, SIGMA_MIN, SIGMA_MAX), densities) for n in (50, 100)
    ]
    assert np.allclose(losses[1] / losses[0], 0.5, atol=0.05)  # first order: half the steps' size, half the loss


def test_ddpm_keeps_gaussian_variance_on_a_fine_grid_and_loses_it_on_a_coarse_one():
    densities = np.array([1.0, 100.0])
    fine = gaussian_variance_ratios("ddpm", log_snr_sigmas(400, SIGMA_MIN, SIGMA_MAX), densities, samples=5000)
    coarse = gaussian_variance_ratios("ddpm", log_snr_sigmas(20, SIGMA_MIN, SIGMA_MAX), densities, samples=5000)
    assert np.allclose(fine, 1.0, atol=0.06), fine  # standard error 2 %, bias about 1 % at 400 steps
    assert (coarse < 0.7).all(), coarse  # about 0.55
