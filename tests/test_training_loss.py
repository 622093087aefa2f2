"""The training loss: targets match the parameterisation, condition dropout, min-SNR and particle weighting."""

import pytest
import torch
from training.losses import _min_snr_weight, diffusion_loss, particle_neighbourhood

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


def test_a_min_snr_floor_raises_only_the_weights_of_the_high_noise_levels():
    alpha_bar = torch.tensor([0.99, 0.5, 0.01, 1e-4], dtype=torch.float64)
    snr = alpha_bar / (1 - alpha_bar)
    plain = _min_snr_weight(alpha_bar, 5.0, "x0")
    floored = _min_snr_weight(alpha_bar, 5.0, "x0", floor=0.05)
    torch.testing.assert_close(floored[:2], plain[:2])
    torch.testing.assert_close(floored[2:], torch.full((2,), 0.05, dtype=torch.float64))
    assert plain[3] < 2e-4  # without the floor sigma = 100 counts 1 / 10 000
    torch.testing.assert_close(_min_snr_weight(alpha_bar, 5.0, "v", floor=0.05), floored / (snr + 1))


def test_the_loss_passes_the_floor_to_the_weight_of_each_image():
    schedule = cosine_schedule(1000)
    x0, cond = _batch()
    net = _ErrsAt(schedule, x0, torch.ones_like(x0, dtype=torch.bool))
    t = torch.full((len(x0),), 990)
    losses = [
        diffusion_loss(
            net,
            schedule,
            "v",
            x0,
            cond,
            cond_drop_prob=0.0,
            min_snr_gamma=5.0,
            min_snr_floor=floor,
            timesteps=t,
            generator=torch.Generator().manual_seed(0),
        )
        for floor in (0.0, 0.01)
    ]
    alpha_bar = schedule.alphas_cumprod[990].double()
    snr = float(alpha_bar / (1 - alpha_bar))
    # a v error of 1 everywhere costs 1 times the v weight, min(SNR, 5) / (SNR + 1) or 0.01 / (SNR + 1)
    assert losses[0].item() == pytest.approx(snr / (snr + 1), rel=1e-4)
    assert losses[1].item() == pytest.approx(0.01 / (snr + 1), rel=1e-4)


def test_particle_neighbourhood_dilates_the_labelled_pixels_of_the_condition():
    labels = torch.zeros(2, 12, 12, dtype=torch.long)
    labels[0, 5, 5] = 2
    cond = encode_condition(labels, 2)
    near = particle_neighbourhood(cond, 2)
    assert near.shape == (2, 1, 12, 12)
    expected = torch.zeros(12, 12)
    expected[3:8, 3:8] = 1
    assert torch.equal(near[0, 0], expected)
    assert near[1].sum() == 0  # an image without particles
    assert particle_neighbourhood(cond, 0)[0, 0].sum() == 1
    assert particle_neighbourhood(torch.zeros_like(cond), 2).sum() == 0  # the null condition


class _ErrsAt(_Oracle):
    """An exact oracle plus an error of 1 wherever ``where`` is true."""

    def __init__(self, schedule, x0, where):
        super().__init__(schedule, x0, "v")
        self.where = where

    def forward(self, x_t, t, cond):
        return super().forward(x_t, t, cond) + self.where.float()


def _one_particle() -> tuple:
    """A cosine schedule, a blank 12x12 image and the condition of one class-1 pixel at (5, 5)."""
    labels = torch.zeros(1, 12, 12, dtype=torch.long)
    labels[0, 5, 5] = 1
    return cosine_schedule(1000), torch.zeros(1, 1, 12, 12), encode_condition(labels, 2)


@pytest.mark.parametrize("error_near_particles", [True, False])
def test_particle_weight_counts_the_pixels_near_particles_more(error_near_particles):
    schedule, x0, cond = _one_particle()
    near = particle_neighbourhood(cond, 1).bool()
    where = near if error_near_particles else ~near
    n_near, n_far = 9, 144 - 9

    def loss(weight, drop=0.0):
        net = _ErrsAt(schedule, x0, where)
        g = torch.Generator().manual_seed(3)
        return diffusion_loss(
            net, schedule, "v", x0, cond, generator=g, particle_weight=weight, particle_radius_px=1, cond_drop_prob=drop
        ).item()

    plain = (n_near if error_near_particles else n_far) / 144
    assert loss(0.0) == pytest.approx(plain)
    weighted = (10 * n_near if error_near_particles else n_far) / (10 * n_near + n_far)
    assert loss(9.0) == pytest.approx(weighted)
    assert (loss(9.0) > plain) == error_near_particles
    # A dropped condition shows the network no particles, so no pixel may weigh more.
    assert loss(9.0, drop=1.0) == pytest.approx(plain)


def test_random_timesteps_cover_the_whole_schedule():
    schedule = cosine_schedule(10)
    x0, cond = _batch(256)
    net = _TimestepRecorder(schedule, x0, "v")
    diffusion_loss(net, schedule, "v", x0, cond, generator=torch.Generator().manual_seed(3))
    assert sorted(set(net.timesteps[0].long().tolist())) == list(range(10))


class _TimestepRecorder(_Oracle):
    def __init__(self, schedule, x0, answers_in):
        super().__init__(schedule, x0, answers_in)
        self.timesteps = []

    def forward(self, x_t, t, cond):
        self.timesteps.append(t)
        return super().forward(x_t, t, cond)
