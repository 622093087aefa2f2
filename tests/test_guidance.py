"""Classifier-free guidance: which branches run, in how many forward passes, and the guided combination."""

import pytest
import torch

from napari_iscat_diffusion.diffusion.guidance import guided_denoiser


class RecordingDenoiser:
    """A conditional denoiser whose output depends on x, sigma and the condition; records its batch sizes."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, sigma, cond):
        self.batch_sizes.append(x.shape[0])
        assert sigma.shape == (x.shape[0],) and cond.shape[0] == x.shape[0]
        return x * (1 + cond.sum(dim=1, keepdim=True)) + sigma.view(-1, 1, 1, 1) * cond[:, :1]


def _inputs(n=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 5, generator=g)
    sigma = torch.rand(n, generator=g) * 10
    cond = (torch.rand(n, 3, 6, 5, generator=g) > 0.5).float()
    cond[:, -1] = 1
    return x, sigma, cond, torch.zeros_like(cond)


def test_scale_one_runs_the_conditional_branch_only():
    x, sigma, cond, null = _inputs()
    net = RecordingDenoiser()
    out = guided_denoiser(net, cond, null, 1.0)(x, sigma)
    assert net.batch_sizes == [3]
    assert torch.equal(out, RecordingDenoiser()(x, sigma, cond))


def test_scale_zero_runs_the_unconditional_branch_only():
    x, sigma, cond, null = _inputs()
    net = RecordingDenoiser()
    out = guided_denoiser(net, cond, null, 0.0)(x, sigma)
    assert net.batch_sizes == [3]
    assert torch.equal(out, RecordingDenoiser()(x, sigma, null))


@pytest.mark.parametrize("scale", [2.5, -0.5])
def test_other_scales_run_one_batch_of_two_n(scale):
    x, sigma, cond, null = _inputs()
    net = RecordingDenoiser()
    out = guided_denoiser(net, cond, null, scale)(x, sigma)
    assert net.batch_sizes == [6]
    reference = RecordingDenoiser()
    x0_cond, x0_uncond = reference(x, sigma, cond), reference(x, sigma, null)
    torch.testing.assert_close(out, x0_uncond + scale * (x0_cond - x0_uncond))


def test_condition_shapes_must_match():
    _, _, cond, _ = _inputs()
    with pytest.raises(ValueError, match="differ in shape"):
        guided_denoiser(RecordingDenoiser(), cond, torch.zeros(3, 2, 6, 5), 2.0)
