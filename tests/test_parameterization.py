"""Exact conversions between eps, v and x0 prediction, and the denoiser wrapper that uses them."""

import pytest
import torch

from napari_iscat_diffusion.diffusion.denoiser import DiscreteTimeDenoiser
from napari_iscat_diffusion.diffusion.parameterization import (
    PARAMETERIZATIONS,
    convert_prediction,
    target_from_x0_eps,
    to_x0_eps,
)
from napari_iscat_diffusion.diffusion.schedules import cosine_schedule, linear_schedule


def _noisy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 2, 5, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 5, 6, generator=g, dtype=torch.float64)
    alpha_bar = torch.tensor([0.999, 0.7, 0.2, 1e-4], dtype=torch.float64).view(-1, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


def test_v_is_defined_as_in_salimans_and_ho():
    x0, eps, alpha, sigma, _ = _noisy_batch()
    torch.testing.assert_close(target_from_x0_eps(x0, eps, alpha, sigma, "v"), alpha * eps - sigma * x0)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_every_parameterisation_recovers_x0_and_eps(parameterization):
    x0, eps, alpha, sigma, x_t = _noisy_batch()
    prediction = target_from_x0_eps(x0, eps, alpha, sigma, parameterization)
    x0_back, eps_back = to_x0_eps(prediction, x_t, alpha, sigma, parameterization)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("source", PARAMETERIZATIONS)
@pytest.mark.parametrize("target", PARAMETERIZATIONS)
def test_conversions_round_trip(source, target):
    x0, eps, alpha, sigma, x_t = _noisy_batch(1)
    prediction = target_from_x0_eps(x0, eps, alpha, sigma, source)
    converted = convert_prediction(prediction, x_t, alpha, sigma, source, target)
    torch.testing.assert_close(converted, target_from_x0_eps(x0, eps, alpha, sigma, target), rtol=0, atol=1e-9)
    back = convert_prediction(converted, x_t, alpha, sigma, target, source)
    torch.testing.assert_close(back, prediction, rtol=0, atol=1e-9)


def test_unknown_parameterisation_is_rejected():
    x0, _, alpha, sigma, x_t = _noisy_batch()
    with pytest.raises(ValueError, match="unknown parameterisation"):
        to_x0_eps(x0, x_t, alpha, sigma, "score")


class _OracleNet(torch.nn.Module):
    """Knows x0 and eps; answers in the given parameterisation, computing alpha from the timestep it is given."""

    def __init__(self, schedule, parameterization, x0, eps):
        super().__init__()
        self.schedule, self.parameterization, self.x0, self.eps = schedule, parameterization, x0, eps
        self.seen = []

    def forward(self, x_t, t, cond):
        self.seen.append((x_t, t, cond))
        alpha_bar = self.schedule.alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return target_from_x0_eps(self.x0, self.eps, alpha, sigma, self.parameterization)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule])
def test_discrete_time_denoiser_returns_x0_in_sigma_space(parameterization, make):
    schedule = make(1000)
    steps = torch.tensor([0, 250, 600, 900])
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    sigma = schedule.sigmas[steps]
    x = x0 + sigma.view(-1, 1, 1, 1) * eps  # sigma space
    net = _OracleNet(schedule, parameterization, x0, eps)
    cond = torch.ones(4, 3, 8, 8, dtype=torch.float64)
    x0_hat = DiscreteTimeDenoiser(net, schedule, parameterization)(x, sigma, cond)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-6)
    x_t, t, seen_cond = net.seen[0]
    alpha_bar = schedule.alphas_cumprod[steps].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps)
    torch.testing.assert_close(t, steps.to(torch.float64), atol=1e-6, rtol=0)
    assert seen_cond is not None
