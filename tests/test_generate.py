"""generate(): shapes, physical units, seeds, guidance batching and per-class guidance, progress and cancel,
bad input, guidance intervals."""

import math

import numpy as np
import pytest
import torch
from tests.tiny_models import tiny_unet_config

from napari_iscat_diffusion.diffusion import (
    SAMPLERS,
    ConditionalUNet,
    ModelConfig,
    NonFiniteImageError,
    SamplingCancelled,
    generate,
    load_checkpoint,
    save_checkpoint,
)
from napari_iscat_diffusion.diffusion.grid_fit import fitted_sigmas
from napari_iscat_diffusion.diffusion.guidance import EVERY_NOISE_LEVEL
from napari_iscat_diffusion.diffusion.samplers import sampling_sigmas
from napari_iscat_diffusion.diffusion.schedules import linear_schedule


def _tiny_model(
    tmp_path,
    *,
    parameterization="v",
    channels=1,
    classes=2,
    mean=0.0,
    std=1.0,
    perturb=True,
    class_guidance=None,
    guidance_interval=None,
    sigma_max=None,
    default_steps=None,
    default_sampler=None,
    sde_sigma_min=None,
    density_range=None,
):
    unet = tiny_unet_config(image_channels=channels, num_classes=classes)
    torch.manual_seed(0)
    net = ConditionalUNet(unet)
    if perturb:  # move away from the zero-initialised output so that the network's output depends on its input
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    config = ModelConfig(
        unet=unet,
        schedule=linear_schedule(1000).to_config(),
        parameterization=parameterization,
        normalization={"mean": [mean] * channels, "std": [std] * channels},
        pixel_size_nm=50.0,
        training_size=(32, 32),
        default_guidance=1.5,
        default_class_guidance=class_guidance or {},
        default_guidance_interval=guidance_interval,
        sampling_sigma_max=sigma_max,
        default_steps=default_steps or {},
        default_sampler=default_sampler,
        sde_sigma_min=sde_sigma_min,
        sampling_density_range=density_range,
    )
    name = (
        f"tiny-{parameterization}-{channels}-{perturb}-{mean}-{std}-{class_guidance}-{guidance_interval}-{sigma_max}"
        f"-{sorted((default_steps or {}).items())}-{default_sampler}-{sde_sigma_min}-{density_range}"
    )
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, net, config)
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("model"))


def _mask(n=None, size=(16, 20)):
    rng = np.random.default_rng(0)
    shape = size if n is None else (n, *size)
    return rng.integers(0, 3, shape).astype(np.uint8)


def test_output_shapes_and_dtype(model, tmp_path):
    single = generate(_mask(), model, steps=2, seed=1)
    assert single.shape == (16, 20) and single.dtype == np.float32
    batch = generate(_mask(3), model, steps=2, seed=1)
    assert batch.shape == (3, 16, 20)
    stack_model = _tiny_model(tmp_path, channels=2)
    assert generate(_mask(), stack_model, steps=2).shape == (2, 16, 20)
    assert generate(_mask(2), stack_model, steps=2).shape == (2, 2, 16, 20)


def test_output_is_in_the_physical_units_of_the_training_data(tmp_path):
    # An untrained x0-prediction network predicts exactly 0 (normalised) everywhere, so every
    # sampler returns the training mean, whatever the std.
    model = _tiny_model(tmp_path, parameterization="x0", mean=0.25, std=3.0, perturb=False)
    for sampler in SAMPLERS:
        image = generate(_mask(), model, sampler=sampler, steps=3, seed=0)
        np.testing.assert_array_equal(image, np.full((16, 20), 0.25, np.float32))


def test_std_scales_the_output(tmp_path):
    narrow = generate(_mask(), _tiny_model(tmp_path, std=1.0, parameterization="eps"), steps=3, seed=4)
    wide = generate(_mask(), _tiny_model(tmp_path, std=2.0, mean=5.0, parameterization="eps"), steps=3, seed=4)
    np.testing.assert_allclose(wide, 2.0 * narrow + 5.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_same_seed_same_image_whatever_the_batch_size(model, sampler):
    masks = _mask(3)
    together = generate(masks, model, sampler=sampler, steps=3, seed=[5, 6, 7], batch_size=3)
    alone = generate(masks[1], model, sampler=sampler, steps=3, seed=6)
    # float32 convolutions of a batch and of a single image round differently (~1e-5 here);
    # an image drawn from other noise differs by O(1)
    np.testing.assert_allclose(together[1], alone, rtol=1e-4, atol=1e-4)
    assert np.isfinite(together).all()
    assert not np.allclose(together[0], together[2])
    in_pairs = generate(masks, model, sampler=sampler, steps=3, seed=5, batch_size=2)
    np.testing.assert_allclose(in_pairs, together, rtol=1e-4, atol=1e-4)


def test_different_seeds_and_masks_give_different_images(model):
    a = generate(_mask(), model, steps=3, seed=1)
    b = generate(_mask(), model, steps=3, seed=2)
    assert np.abs(a - b).mean() > 1e-3
    c = generate(np.zeros((16, 20), np.uint8), model, steps=3, seed=1)
    assert np.abs(a - c).mean() > 1e-4


def _count_batches(model):
    sizes = []
    handle = model.net.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize(("guidance", "per_call"), [(1.0, 2), (0.0, 2), (2.0, 4)])
def test_guidance_runs_one_forward_per_step(model, guidance, per_call):
    sizes, handle = _count_batches(model)
    try:
        generate(_mask(2), model, sampler="euler", steps=4, guidance=guidance, batch_size=2)
    finally:
        handle.remove()
    assert sizes == [per_call] * 4


def test_guidance_changes_the_image_and_defaults_to_the_model_value(model):
    default = generate(_mask(), model, steps=3, seed=1)
    assert np.array_equal(default, generate(_mask(), model, steps=3, seed=1, guidance=1.5))
    assert not np.allclose(default, generate(_mask(), model, steps=3, seed=1, guidance=1.0))


def test_class_guidance_guides_a_class_s_pixels_with_its_own_scale(model):
    everywhere_class_1 = np.ones((2, 16, 20), np.uint8)
    uniform = generate(everywhere_class_1, model, steps=3, seed=1, guidance=3.0, class_guidance={})
    per_class = generate(everywhere_class_1, model, steps=3, seed=1, guidance=1.5, class_guidance={1: 3.0})
    assert np.array_equal(per_class, uniform)
    # A scale for a class the mask does not hold, or equal to the global one, changes nothing.
    plain = generate(everywhere_class_1, model, steps=3, seed=1, guidance=1.5, class_guidance={})
    assert np.array_equal(generate(everywhere_class_1, model, steps=3, seed=1, class_guidance={2: 3.0}), plain)
    assert np.array_equal(generate(everywhere_class_1, model, steps=3, seed=1, class_guidance={1: 1.5}), plain)
    assert not np.allclose(per_class, plain)


def test_class_guidance_maps_reach_every_tile_of_a_tiled_mask(model):
    everywhere_class_1 = np.ones((1, 40, 40), np.uint8)
    tiled = {"steps": 2, "seed": 1, "tile_size": 16, "tile_overlap": 8}
    uniform = generate(everywhere_class_1, model, guidance=3.0, class_guidance={}, **tiled)
    assert np.array_equal(generate(everywhere_class_1, model, guidance=1.5, class_guidance={1: 3.0}, **tiled), uniform)
    assert not np.allclose(generate(everywhere_class_1, model, guidance=1.5, class_guidance={}, **tiled), uniform)


def test_class_guidance_defaults_to_the_model_value(tmp_path):
    calibrated = _tiny_model(tmp_path, class_guidance={2: 2.5})
    mask = _mask(2)
    default = generate(mask, calibrated, steps=3, seed=1)
    assert np.array_equal(default, generate(mask, calibrated, steps=3, seed=1, class_guidance={2: 2.5}))
    assert not np.allclose(default, generate(mask, calibrated, steps=3, seed=1, class_guidance={}))


def test_a_guidance_interval_guides_only_the_steps_inside_it(model):
    mask = _mask(2)
    everywhere = generate(mask, model, steps=4, seed=1, guidance=3.0)
    assert np.array_equal(generate(mask, model, steps=4, seed=1, guidance=3.0, guidance_interval=(0, 1e9)), everywhere)
    conditional = generate(mask, model, steps=4, seed=1, guidance=1.0)
    none_inside = generate(mask, model, steps=4, seed=1, guidance=3.0, guidance_interval=(1e6, 1e7))
    assert np.array_equal(none_inside, conditional)
    sigmas = sampling_sigmas("dpmpp_2m", 4, model.schedule.sigma_min, model.schedule.sigma_max)
    middle = (float(sigmas[2]), float(sigmas[1]))  # only the second step's sigma lies in (low, high]
    some = generate(mask, model, steps=4, seed=1, guidance=3.0, guidance_interval=middle)
    assert not np.allclose(some, everywhere) and not np.allclose(some, conditional)


def test_the_ends_of_a_guidance_interval_reach_the_multistep_sampler_as_breaks(model, monkeypatch):
    import dataclasses

    from napari_iscat_diffusion.diffusion import samplers

    seen = []
    info = samplers.SAMPLERS["dpmpp_2m"]

    def recording(*args, **kwargs):
        seen.append(kwargs.get("breaks"))
        return info.function(*args, **kwargs)

    monkeypatch.setitem(samplers.SAMPLERS, "dpmpp_2m", dataclasses.replace(info, function=recording))
    generate(_mask(), model, steps=2, guidance=3.0, guidance_interval=(2.0, math.inf))
    generate(_mask(), model, steps=2, guidance=3.0, guidance_interval=(2.0, 45.0))
    generate(_mask(), model, steps=2, guidance=1.0, guidance_interval=(2.0, 45.0))  # nothing is guided: no jump
    generate(_mask(), model, steps=2, guidance=3.0)
    assert seen == [[2.0], [2.0, 45.0], None, None]


def test_the_guidance_interval_defaults_to_the_model_value(tmp_path):
    limited = _tiny_model(tmp_path, guidance_interval=(1.0, 10.0))
    assert limited.config.default_guidance_interval == (1.0, 10.0)
    mask = _mask(2)
    default = generate(mask, limited, steps=4, seed=1)
    assert np.array_equal(default, generate(mask, limited, steps=4, seed=1, guidance_interval=(1.0, 10.0)))
    assert not np.allclose(default, generate(mask, limited, steps=4, seed=1, guidance_interval=EVERY_NOISE_LEVEL))


def test_a_model_with_a_density_range_samples_dpmpp_2m_on_the_fitted_grid(tmp_path, model):
    fitted = _tiny_model(tmp_path, sigma_max=80.0, density_range=(0.5, 50.0))
    plain = _tiny_model(tmp_path, sigma_max=80.0)
    assert fitted.sigma_grid("dpmpp_2m") == "fitted" and plain.sigma_grid("dpmpp_2m") == "logsnr"
    assert fitted.sigma_grid("euler") == "logsnr" and fitted.sigma_grid("dpmpp_2m_sde") == "logsnr"
    grid = fitted.sampling_sigmas("dpmpp_2m", 6)
    assert torch.equal(grid, fitted_sigmas(6, fitted.schedule.sigma_min, 80.0, (0.5, 50.0)))
    assert grid[0] == 80.0 and len(grid) == 7 and not torch.equal(grid, plain.sampling_sigmas("dpmpp_2m", 6))
    assert torch.equal(fitted.sampling_sigmas("euler", 6), plain.sampling_sigmas("euler", 6))
    mask = _mask(2)
    image = generate(mask, fitted, steps=6, seed=1)
    assert np.array_equal(image, generate(mask, fitted, steps=6, seed=1))
    assert not np.allclose(image, generate(mask, plain, steps=6, seed=1))


def test_the_continuous_sigma_grids_start_at_the_model_sampling_sigma_max(tmp_path, model):
    capped = _tiny_model(tmp_path, sigma_max=20.0)
    top = model.schedule.sigma_max
    for sampler in ("dpmpp_2m", "euler", "heun"):
        assert float(model.sampling_sigmas(sampler, 8)[0]) == pytest.approx(top)
        grid = capped.sampling_sigmas(sampler, 8)
        assert float(grid[0]) == pytest.approx(20.0) and float(grid[-1]) == 0.0 and len(grid) == 9
    # DDPM steps on the training timesteps: the cap does not apply.
    assert torch.equal(capped.sampling_sigmas("ddpm", 8), model.sampling_sigmas("ddpm", 8))
    above = _tiny_model(tmp_path, sigma_max=10 * top)
    assert torch.equal(above.sampling_sigmas("dpmpp_2m", 8), model.sampling_sigmas("dpmpp_2m", 8))
    mask = _mask(2)
    assert np.array_equal(generate(mask, above, steps=4, seed=1), generate(mask, model, steps=4, seed=1))
    assert not np.allclose(generate(mask, capped, steps=4, seed=1), generate(mask, model, steps=4, seed=1))


def test_steps_default_to_the_model_value_for_the_sampler(tmp_path, model):
    fewer = _tiny_model(tmp_path, default_steps={"dpmpp_2m": 3})
    assert fewer.default_steps("dpmpp_2m") == 3
    assert fewer.default_steps("euler") == model.default_steps("euler") == SAMPLERS["euler"].default_steps
    assert model.default_steps("dpmpp_2m") == SAMPLERS["dpmpp_2m"].default_steps
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        fewer.default_steps("plms")
    events = []
    mask = _mask()
    image = generate(mask, fewer, seed=1, callback=events.append)
    assert [e.step for e in events] == [0, 1, 2]
    assert np.array_equal(image, generate(mask, fewer, steps=3, seed=1))
    events.clear()
    generate(mask, fewer, sampler="euler", seed=1, callback=events.append)
    assert len(events) == SAMPLERS["euler"].default_steps


def test_the_model_chooses_the_sampler_and_where_its_sde_noise_stops(tmp_path, model):
    sde = _tiny_model(tmp_path, default_sampler="dpmpp_2m_sde", sde_sigma_min=5.0)
    assert sde.default_sampler == "dpmpp_2m_sde" and model.default_sampler == "dpmpp_2m"
    assert sde.sampler_options("dpmpp_2m_sde") == {"noise_sigma_min": 5.0} and sde.sampler_options("dpmpp_2m") == {}
    assert model.sampler_options("dpmpp_2m_sde") == {}
    mask = _mask(2)
    default = generate(mask, sde, steps=4, seed=1)
    assert np.array_equal(default, generate(mask, sde, sampler="dpmpp_2m_sde", steps=4, seed=1))
    noise_everywhere = generate(mask, model, sampler="dpmpp_2m_sde", steps=4, seed=1)
    ode = generate(mask, model, sampler="dpmpp_2m", steps=4, seed=1)
    assert not np.allclose(default, noise_everywhere) and not np.allclose(default, ode)
    # Above every step's end the SDE sampler is the ODE solver.
    no_noise = _tiny_model(tmp_path, sde_sigma_min=1e9)
    np.testing.assert_allclose(generate(mask, no_noise, sampler="dpmpp_2m_sde", steps=4, seed=1), ode, atol=1e-6)


def test_progress_callback_counts_steps_over_batches(model):
    events = []
    generate(_mask(3), model, sampler="heun", steps=3, batch_size=2, callback=events.append)
    assert [e.completed for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e.total for e in events} == {6}
    assert [e.step for e in events] == [0, 1, 2, 0, 1, 2]
    assert [list(e.image_indices) for e in events[::3]] == [[0, 1], [2]]
    preview = events[-1].denoised_images()
    assert preview.shape == (1, 1, 16, 20) and preview.dtype == np.float32


def test_callback_can_cancel(model):
    calls = []

    def stop_at_second_step(event):
        calls.append(event.completed)
        return event.completed == 2

    with pytest.raises(SamplingCancelled):
        generate(_mask(2), model, steps=10, batch_size=1, callback=stop_at_second_step)
    assert calls == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"sampler": "plms"}, "unknown sampler"),
        ({"steps": 0}, "steps must be a whole number from 1 to 1000"),
        ({"seed": [1, 2]}, "got 2 seeds for 1 masks"),
        ({"device": "cuda:7"}, "not available"),
        ({"precision": "bf16"}, "not supported on the CPU"),
        ({"precision": "fp8"}, "unknown precision"),
        ({"batch_size": 0}, "batch_size"),
        ({"guidance": float("nan")}, "guidance"),
        ({"class_guidance": {3: 2.0}}, "3 is not a particle class; expected labels 1..2"),
        ({"class_guidance": {1: -1.0}}, "scale of class 1"),
        ({"guidance_interval": (5.0, 1.0)}, "guidance interval: expected 0 <= low < high"),
    ],
)
def test_bad_arguments_are_rejected(model, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        generate(_mask(), model, **kwargs)


def test_bad_masks_are_rejected(model):
    with pytest.raises(ValueError, match="contains label 3 but the model knows 2"):
        generate(np.full((8, 8), 3, np.uint8), model)
    with pytest.raises(ValueError, match="RGB"):
        generate(np.zeros((8, 8, 3), np.uint8), model)


def _constant_output(model, value: float) -> None:
    """Make the network predict ``value`` everywhere (its last convolution's weights 0, its bias ``value``)."""
    with torch.no_grad():
        model.net.conv_out.weight.zero_()
        model.net.conv_out.bias.fill_(value)


def test_an_overflowing_network_raises_naming_the_step_instead_of_returning_nan(tmp_path):
    model = _tiny_model(tmp_path)

    def overflow_after_first_step(event):
        if event.step == 0:
            _constant_output(model, math.inf)

    with pytest.raises(NonFiniteImageError, match=r"NaN or infinite .* at step 2: the network's predictions overflow"):
        generate(_mask(), model, sampler="euler", steps=4, callback=overflow_after_first_step)


def test_a_normalisation_that_overflows_float32_is_named(tmp_path):
    model = _tiny_model(tmp_path, std=1e12)
    _constant_output(model, 1e28)  # finite in normalised units, about 1e40 in physical units
    with pytest.raises(NonFiniteImageError, match=r"image 0 .*the checkpoint's normalisation .* float32's range"):
        generate(_mask(), model, steps=1)  # one step: the network never sees the huge prediction as its input


def test_non_finite_image_error_is_a_value_error():
    assert issubclass(NonFiniteImageError, ValueError)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_takes_at_most_the_training_timesteps(model, sampler):
    with pytest.raises(ValueError, match=r"steps must be a whole number from 1 to 1000 \(the model's training"):
        generate(_mask(), model, sampler=sampler, steps=1001)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"guidance": 1e300}, "guidance must be a finite number >= 0 and at most 100"),
        ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
        ({"seed": -1}, "seed -1 of image 0 is out of range"),
        ({"seed": 2**63 - 1}, f"seed {2**63} of image 1 is out of range"),
        ({"seed": [0, 2**70]}, "of image 1 is out of range"),
    ],
)
def test_absurd_guidance_and_seeds_are_refused(model, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        generate(_mask(2), model, steps=1, **kwargs)
