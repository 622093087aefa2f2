"""The training loss: targets match the parameterisation, condition dropout, min-SNR weighting."""

import pytest
import torch
from training.losses import _min_snr_weight, diffusion_loss

from napari_iscat_diffusion.diffusion.conditioning import encode_condition
from napari_iscat_diffusion.diffusion.parameterization import PARAMETERIZATIONS, target_from_x0_eps
from napari_iscat_diffusion.diffusion.schedules import cosine_schedule, linear_schedule


class _Oracle(torch.nn.Module):
    """Knows the clean batch, so it can answer exactly in a given parameterisation; records what it saw."""

    def __init__(self, schedule, x0, answers_in):
        super().__init__()
        self.schedule, self.x0, self.answers_in = schedule, x0, answers_in
        self.conds = []

    def forward(self, x_t, t, cond):
        self.conds.append(cond)
        alpha_bar = self.schedule.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        eps = (x_t - alpha * self.x0) / sigma
        return target_from_x0_eps(self.x0, eps, alpha, sigma, self.answers_in)


def _batch(n=16):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, 3, (n, 8, 8), generator=g)
    return x0, encode_condition(labels, 2)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule])
def test_exact_prediction_gives_zero_loss_and_a_wrong_target_does_not(parameterization, make):
    schedule = make(1000)
    x0, cond = _batch()
    g = torch.Generator().manual_seed(1)
    loss = diffusion_loss(_Oracle(schedule, x0, parameterization), schedule, parameterization, x0, cond, generator=g)
    assert loss.item() < 1e-6
    wrong = next(p for p in PARAMETERIZATIONS if p != parameterization)
    g = torch.Generator().manual_seed(1)
    loss = diffusion_loss(_Oracle(schedule, x0, wrong), schedule, parameterization, x0, cond, generator=g)
    assert loss.item() > 1e-2


def test_condition_dropout_replaces_the_condition_by_the_null_condition():
    schedule = linear_schedule(1000)
    x0, cond = _batch(64)
    for prob, expected_null in ((0.0, 0), (1.0, 64)):
        net = _Oracle(schedule, x0, "eps")
        diffusion_loss(net, schedule, "eps", x0, cond, cond_drop_prob=prob, generator=torch.Generator().manual_seed(2))
        seen = net.conds[0]
        is_null = seen.flatten(1).abs().sum(1) == 0
        assert int(is_null.sum()) == expected_null
        assert torch.equal(seen[~is_null], cond[~is_null])
    net = _Oracle(schedule, x0, "eps")
    diffusion_loss(net, schedule, "eps", x0, cond, cond_drop_prob=0.5, generator=torch.Generator().manual_seed(2))
    assert 16 < int((net.conds[0].flatten(1).abs().sum(1) == 0).sum()) < 48


def test_min_snr_weights():
    alpha_bar = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(_min_snr_weight(alpha_bar, 5.0, "x0"), clipped)
    torch.testing.assert_close(_min_snr_weight(alpha_bar, 5.0, "eps"), clipped / snr)
    torch.testing.assert_close(_min_snr_weight(alpha_bar, 5.0, "v"), clipped / (snr + 1))
    # high-SNR (low-noise) images are down-weighted for eps prediction, low-SNR ones keep weight 1
    eps_weights = _min_snr_weight(alpha_bar, 5.0, "eps")
    assert eps_weights[0] < 0.06 and eps_weights[2] == 1.0
