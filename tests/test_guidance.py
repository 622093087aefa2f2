"""Classifier-free guidance: which branches run, in how many forward passes, the guided combination, and
per-class guidance (scale maps, parsing, validation) and guidance limited to an interval of noise levels."""

import math

import numpy as np
import pytest
import torch

from napari_iscat_diffusion.diffusion.guidance import (
    EVERY_NOISE_LEVEL,
    check_class_guidance,
    check_guidance_interval,
    format_class_guidance,
    format_guidance_interval,
    guidance_scale_map,
    guided_denoiser,
    parse_class_guidance,
    parse_guidance_interval,
)


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


@pytest.mark.parametrize("scale", [2.5, -0.5, "map"])
def test_other_scales_run_one_batch_of_two_n(scale):
    x, sigma, cond, null = _inputs()
    if scale == "map":  # one scale per pixel
        scale = torch.rand(3, 1, 6, 5, generator=torch.Generator().manual_seed(1)) * 3
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


def test_a_guidance_map_of_ones_still_guides_and_must_match_the_condition():
    x, sigma, cond, null = _inputs()
    net = RecordingDenoiser()
    out = guided_denoiser(net, cond, null, torch.ones(3, 1, 6, 5))(x, sigma)
    assert net.batch_sizes == [6]  # no shortcut to the conditional branch, yet the conditional prediction
    torch.testing.assert_close(out, RecordingDenoiser()(x, sigma, cond))
    with pytest.raises(ValueError, match=r"guidance map must have shape \(3, 1, 6, 5\)"):
        guided_denoiser(net, cond, null, torch.ones(3, 2, 6, 5))


def _two_particle_mask():
    labels = np.zeros((1, 40, 60), np.int64)
    labels[0, 19:22, 9:12] = 1  # class 1 around (20, 10)
    labels[0, 19:22, 49:52] = 2  # class 2 around (20, 50)
    return labels


def test_the_scale_map_takes_each_class_scale_near_its_particles_and_the_global_one_far_away():
    labels = _two_particle_mask()
    scales = guidance_scale_map(labels, 1.5, {1: 1.0, 2: 3.0}, reach_px=4.0)
    assert scales.shape == (1, 1, 40, 60) and scales.dtype == np.float32
    row = scales[0, 0, 20]
    assert row[10] == pytest.approx(1.0) and row[50] == pytest.approx(3.0)
    # Full class scale up to reach_px from the blob, background scale from 2 * reach_px on.
    assert row[11 + 4] == pytest.approx(1.0) and row[49 - 4] == pytest.approx(3.0)
    assert row[11 + 8] == pytest.approx(1.5) and row[30] == pytest.approx(1.5) and row[49 - 8] == pytest.approx(1.5)
    # Half way along the ramp, half of each.
    assert row[11 + 6] == pytest.approx((1.0 + 1.5) / 2)
    assert scales[0, 0, 0, 30] == pytest.approx(1.5)
    # The ramp is monotonic: no seam.
    assert np.all(np.diff(row[11:31]) >= 0) and np.all(np.diff(row[30:50]) >= 0)


def test_the_scale_map_averages_overlapping_zones_and_is_none_when_nothing_differs():
    labels = np.zeros((2, 20, 20), np.int64)
    labels[0, 10, 8] = 1
    labels[0, 10, 11] = 2
    scales = guidance_scale_map(labels, 1.5, {1: 1.0, 2: 3.0}, reach_px=4.0)
    # Between two particles of different classes, both zones are full: their mean.
    assert scales[0, 0, 10, 9] == pytest.approx(2.0)
    assert np.all(scales[1] == np.float32(1.5))  # the second mask has no particles
    assert guidance_scale_map(labels, 1.5, {}) is None
    assert guidance_scale_map(labels, 1.5, {1: 1.5, 2: 1.5}) is None  # same as the global scale
    assert guidance_scale_map(labels, 1.5, {3: 2.0}) is None  # a class absent from the masks
    with pytest.raises(ValueError, match="reach_px"):
        guidance_scale_map(labels, 1.5, {1: 2.0}, reach_px=0)


def test_class_guidance_text_round_trips_and_bad_text_says_what_is_wrong():
    assert parse_class_guidance("1=1.0, 3=2.5") == {1: 1.0, 3: 2.5}
    assert parse_class_guidance(" 2:0.5 ") == {2: 0.5}
    assert parse_class_guidance("") == {} and parse_class_guidance("None") == {}
    assert parse_class_guidance(format_class_guidance({3: 2.25, 1: 1.0})) == {1: 1.0, 3: 2.25}
    assert format_class_guidance({}) == ""
    with pytest.raises(ValueError, match="cannot read 'one=2'"):
        parse_class_guidance("one=2")
    with pytest.raises(ValueError, match="'x' \\(class 1\\) is not a number"):
        parse_class_guidance("1=x")
    with pytest.raises(ValueError, match="class 1 is given twice"):
        parse_class_guidance("1=1,1=2")


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ({0: 1.0}, "0 is not a particle class; expected labels 1..3"),
        ({4: 1.0}, "4 is not a particle class"),
        ({True: 1.0}, "True is not a particle class"),
        ({1: -1.0}, "scale of class 1 must be a finite number >= 0"),
        ({1: float("nan")}, "scale of class 1"),
        ([1.0], "must map class labels"),
    ],
)
def test_class_guidance_is_checked_against_the_model_classes(scales, message):
    with pytest.raises(ValueError, match=message):
        check_class_guidance(scales, 3)
    assert check_class_guidance({"3": 2, 1: 1.5}, 3) == {1: 1.5, 3: 2.0}


def test_an_interval_guides_inside_it_and_runs_the_conditional_branch_alone_outside():
    x, _, cond, null = _inputs()
    reference = RecordingDenoiser()
    for sigma_value, guided in [(5.0, True), (2.0, False), (20.0, True), (20.5, False)]:
        sigma = torch.full((3,), sigma_value)
        net = RecordingDenoiser()
        out = guided_denoiser(net, cond, null, 2.5, interval=(2.0, 20.0))(x, sigma)
        x0_cond, x0_uncond = reference(x, sigma, cond), reference(x, sigma, null)
        if guided:  # low < sigma <= high: both branches in one batch
            assert net.batch_sizes == [6]
            torch.testing.assert_close(out, x0_uncond + 2.5 * (x0_cond - x0_uncond))
        else:  # one pass, conditional
            assert net.batch_sizes == [3]
            assert torch.equal(out, x0_cond)


def test_an_interval_applies_per_image_and_also_to_scale_zero():
    x, _, cond, null = _inputs()
    sigma = torch.tensor([1.0, 10.0, 100.0])
    reference = RecordingDenoiser()
    x0_cond, x0_uncond = reference(x, sigma, cond), reference(x, sigma, null)
    out = guided_denoiser(RecordingDenoiser(), cond, null, 3.0, interval=(2.0, 20.0))(x, sigma)
    torch.testing.assert_close(out[1], (x0_uncond + 3.0 * (x0_cond - x0_uncond))[1])
    assert torch.equal(out[0], x0_cond[0]) and torch.equal(out[2], x0_cond[2])
    # w = 0 is unconditional inside the interval only.
    out = guided_denoiser(RecordingDenoiser(), cond, null, 0.0, interval=(2.0, 20.0))(x, sigma)
    torch.testing.assert_close(out[1], x0_uncond[1])
    assert torch.equal(out[0], x0_cond[0])


def test_guidance_interval_text_round_trips_and_bad_intervals_say_what_is_wrong():
    assert parse_guidance_interval("2,45") == (2.0, 45.0)
    assert parse_guidance_interval(" 0.5 , inf ") == (0.5, math.inf)
    assert parse_guidance_interval("all") == EVERY_NOISE_LEVEL == parse_guidance_interval("None")
    assert format_guidance_interval((2, 45)) == "2,45" and format_guidance_interval(None) == "all"
    assert format_guidance_interval(EVERY_NOISE_LEVEL) == "all"
    assert parse_guidance_interval(format_guidance_interval((0.25, 1e3))) == (0.25, 1000.0)
    for text in ("2", "2,45,50", "a,b", ""):
        with pytest.raises(ValueError, match="write low,high"):
            parse_guidance_interval(text)
    for bad in [(5, 2), (-1, 2), (math.nan, 2), (2, math.nan), (math.inf, math.inf)]:
        with pytest.raises(ValueError, match="expected 0 <= low < high"):
            check_guidance_interval(bad)
    with pytest.raises(ValueError, match="my interval: expected two noise levels"):
        check_guidance_interval([1.0], name="my interval")
