"""Schedules against their closed forms, spacings against their published definitions."""

import math

import numpy as np
import pytest
import torch

from napari_iscat_diffusion.diffusion.schedules import (
    cosine_schedule,
    discrete_sigmas,
    karras_sigmas,
    linear_schedule,
    schedule_from_config,
    timestep_spacing,
)


def test_linear_schedule_matches_ddpm():
    schedule = linear_schedule(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-10)
    # DDPM's last alpha_bar is about 4.04e-5 (sqrt(alpha_bar_T) = 0.00635).
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)


def test_linear_schedule_scales_with_number_of_steps():
    schedule = linear_schedule(250)
    assert schedule.betas[0].item() == pytest.approx(4e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    schedule = cosine_schedule(T, s)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    ab = schedule.alphas_cumprod.numpy()
    # the last steps are clipped at beta = 0.999; everywhere else the product is the closed form
    unclipped = schedule.betas.numpy() < 0.999
    np.testing.assert_allclose(ab[unclipped], expected[unclipped], rtol=1e-9)
    assert (~unclipped).sum() <= 2


@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule])
def test_sigma_and_log_snr_views(make):
    schedule = make(1000)
    ab = schedule.alphas_cumprod
    np.testing.assert_allclose(schedule.sigmas.numpy(), np.sqrt((1 - ab.numpy()) / ab.numpy()), rtol=1e-12)
    np.testing.assert_allclose(schedule.log_snr.numpy(), -2 * np.log(schedule.sigmas.numpy()), rtol=1e-9, atol=1e-9)
    assert bool((schedule.sigmas.diff() > 0).all())
    assert schedule.sigma_min == pytest.approx(schedule.sigmas[0].item())


def test_sigma_to_t_is_exact_on_the_grid_and_inverts_t_to_sigma():
    schedule = linear_schedule(1000)
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas), t, atol=1e-9, rtol=0)
    fractional = torch.tensor([0.25, 10.5, 500.75, 998.9], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(fractional)), fractional, atol=1e-9, rtol=0)
    # a sigma between two grid points maps between their timesteps, in log-sigma
    mid = (schedule.sigmas[10].log() + schedule.sigmas[11].log()).div(2).exp()
    assert schedule.sigma_to_t(mid.reshape(1)).item() == pytest.approx(10.5)
    # out-of-range sigmas clamp to the ends
    out = schedule.sigma_to_t(torch.tensor([1e-9, 1e9], dtype=torch.float64))
    assert out.tolist() == [0.0, 999.0]


def test_timestep_spacings_follow_their_definitions():
    # Lin et al. 2024, table 2 (0-based), T = 1000, 10 steps
    assert timestep_spacing(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert timestep_spacing(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert timestep_spacing(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    for spacing in ("leading", "trailing", "linspace"):
        for n in (1, 3, 7, 50, 1000):
            steps = timestep_spacing(1000, n, spacing)
            assert len(steps) == n and len(set(steps.tolist())) == n
            assert steps.min() >= 0 and steps.max() <= 999
            assert bool((steps.diff() < 0).all())
    assert timestep_spacing(1000, 1000, "trailing").tolist() == list(range(999, -1, -1))


def test_bad_spacing_and_step_counts_are_rejected():
    with pytest.raises(ValueError, match="spacing"):
        timestep_spacing(1000, 10, "uniform")
    with pytest.raises(ValueError, match="between 1 and 1000"):
        timestep_spacing(1000, 0)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        timestep_spacing(1000, 1001)


def test_discrete_sigmas_end_at_zero():
    schedule = cosine_schedule(1000)
    sigmas = discrete_sigmas(schedule, 20, "trailing")
    assert sigmas.shape == (21,)
    assert sigmas[-1].item() == 0.0
    assert sigmas[0].item() == pytest.approx(schedule.sigma_max)
    assert bool((sigmas.diff() < 0).all())


def test_karras_sigmas_closed_form():
    sigmas = karras_sigmas(10, 0.002, 80.0, rho=7.0)
    assert sigmas.shape == (11,)
    assert sigmas[0].item() == pytest.approx(80.0)
    assert sigmas[9].item() == pytest.approx(0.002)
    assert sigmas[10].item() == 0.0
    i, n = 4, 10
    expected = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError):
        karras_sigmas(10, 1.0, 0.5)


def test_schedule_config_round_trip():
    for schedule in (linear_schedule(500, beta_end=0.012), cosine_schedule(1000, s=0.01)):
        rebuilt = schedule_from_config(schedule.to_config())
        assert rebuilt.name == schedule.name
        torch.testing.assert_close(rebuilt.betas, schedule.betas, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        schedule_from_config({"name": "sqrt", "num_timesteps": 1000})
    with pytest.raises(ValueError, match="bad parameters"):
        schedule_from_config({"name": "linear", "num_timesteps": 1000, "gamma": 2})
