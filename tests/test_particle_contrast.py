"""Each particle's peak contrast as a condition: blobs, the prior, measuring peaks, generating and fine-tuning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from tests.tiny_models import save_tiny_checkpoint, tiny_unet_config, uniform_contrast_prior
from tests.tiny_training import tiny_config, tiny_overrides
from training import train
from training.data import build_data
from training.finetune import load_initial_weights
from training.normalization import compute_normalization
from training.particle_contrast import contrast_channel, measure_prior

from napari_iscat_diffusion.cli import main
from napari_iscat_diffusion.diffusion import ModelConfig, encode_condition, generate, linear_schedule, load_checkpoint
from napari_iscat_diffusion.diffusion.checkpoint import save_checkpoint
from napari_iscat_diffusion.diffusion.generate import _contrast_channel
from napari_iscat_diffusion.diffusion.particle_contrast import (
    NUM_QUANTILE_LEVELS,
    ContrastPrior,
    blob_peaks,
    check_given_contrasts,
    paint_blobs,
    particle_blobs,
)
from napari_iscat_diffusion.diffusion.unet import ConditionalUNet, UNetConfig
from napari_iscat_diffusion.evaluation.peaks import measure_peaks

STD = 0.01  # the tiny checkpoints' normalisation std


def _mask() -> np.ndarray:
    mask = np.zeros((32, 32), np.int64)
    mask[4:7, 4:7] = 2
    mask[6:8, 7:9] = 1  # touches the class-2 blob: a particle of its own
    mask[20:22, 20:22] = 1
    return mask


def test_blobs_are_numbered_in_raster_order_and_touching_classes_stay_apart() -> None:
    blobs, classes = particle_blobs(_mask())
    assert classes.tolist() == [2, 1, 1]
    assert blobs[5, 5] == 1 and blobs[7, 8] == 2 and blobs[21, 21] == 3 and blobs[0, 0] == 0
    painted = paint_blobs(blobs, np.array([1.5, -2.0, 3.0]))
    assert painted[5, 5] == 1.5 and painted[7, 7] == -2.0 and painted[20, 21] == 3.0 and painted[10, 10] == 0
    with pytest.raises(ValueError, match="2 values for 3 particles"):
        paint_blobs(blobs, np.array([1.0, 2.0]))


def test_a_blob_peak_is_the_signed_value_of_largest_magnitude() -> None:
    blobs, _ = particle_blobs(_mask())
    image = np.full((32, 32), np.nan)
    image[4:7, 4:7] = 1.0
    image[5, 5] = -4.0
    image[20, 20] = 0.5
    peaks = blob_peaks(blobs, image)
    assert peaks[0] == -4.0 and peaks[2] == 0.5 and np.isnan(peaks[1])


def test_the_prior_round_trips_and_refuses_malformed_quantiles() -> None:
    prior = uniform_contrast_prior({1: (-1.0, 1.0), 2: (5.0, 9.0)})
    assert ContrastPrior.from_dict(prior.to_dict()) == prior
    prior.check_classes(2)
    with pytest.raises(ValueError, match=r"classes \[1, 2\], the model 1\.\.3"):
        prior.check_classes(3)
    with pytest.raises(ValueError, match="non-decreasing"):
        ContrastPrior(1.0, 2.0, {1: np.linspace(1, 0, NUM_QUANTILE_LEVELS)})
    with pytest.raises(ValueError, match="129 finite"):
        ContrastPrior(1.0, 2.0, {1: [0.0, 1.0]})
    with pytest.raises(ValueError, match="scale"):
        ContrastPrior(0.0, 2.0, {1: np.zeros(NUM_QUANTILE_LEVELS)})
    with pytest.raises(ValueError, match="keys scale, reach_px and quantiles"):
        ContrastPrior.from_dict({"scale": 1.0})
    with pytest.raises(ValueError, match="reach_px: must be a number >= 0"):
        ContrastPrior(1.0, False, {1: np.zeros(NUM_QUANTILE_LEVELS)})
    with pytest.raises(ValueError, match=r"quantiles\['x'\]: must be 129 finite"):
        ContrastPrior(1.0, 2.0, {"x": np.zeros(NUM_QUANTILE_LEVELS)})
    with pytest.raises(ValueError, match=r"quantiles\[1\]: must be 129 finite"):
        ContrastPrior(1.0, 2.0, {1: ["a"] * NUM_QUANTILE_LEVELS})
    # Files written before the background radius was stored read with the radius every prior was measured with.
    old = {key: value for key, value in prior.to_dict().items() if key != "background_radius_px"}
    assert ContrastPrior.from_dict(old) == prior


def test_a_channel_map_moves_magnitudes_keeps_signs_and_round_trips() -> None:
    base = uniform_contrast_prior({1: (-1.0, 1.0), 2: (5.0, 9.0)}, scale=2.0)
    prior = dataclasses.replace(base, channel_map={2: ((1.0, 2.0), (2.0, 6.0))})
    assert ContrastPrior.from_dict(prior.to_dict()) == prior
    assert "channel_map" not in base.to_dict()
    peaks, classes = np.array([1.5, -1.5, 0.5, 3.0, 1.5]), np.array([2, 2, 2, 2, 1])
    # Inside the map linear, below and above it proportional to its end points; class 1 has no map.
    np.testing.assert_allclose(prior.to_channel(peaks, classes), np.array([4.0, -4.0, 1.0, 9.0, 1.5]) / 2.0)
    np.testing.assert_allclose(base.to_channel(peaks, classes), peaks / 2.0)
    for bad in (
        {3: ((1.0, 2.0), (1.0, 2.0))},
        {2: ((2.0, 1.0), (1.0, 2.0))},
        {2: ((1.0, 2.0), (2.0, 1.0))},
        {2: ((0.0, 2.0), (1.0, 2.0))},
        {2: ((1.0,), (1.0,))},
        {2: ((1.0, 2.0), (1.0, 2.0, 3.0))},
        {2: "x"},
    ):
        with pytest.raises(ValueError, match=r"channel_map\["):
            dataclasses.replace(base, channel_map=bad)


def test_a_prior_from_samples_keeps_their_distribution_and_draws_it() -> None:
    rng = np.random.default_rng(0)
    samples = {1: rng.normal(-3.0, 1.0, 4000).tolist(), 2: rng.uniform(10.0, 30.0, 4000).tolist(), 3: []}
    prior = ContrastPrior.from_samples(samples, 2.0)
    assert prior.scale == pytest.approx(np.quantile(np.abs(samples[1] + samples[2]), 0.9))
    assert prior.quantiles[3] == (0.0,) * NUM_QUANTILE_LEVELS
    classes = np.array([1, 2] * 5000)
    drawn = prior.draw(classes, torch.Generator().manual_seed(1))
    assert np.mean(drawn[classes == 1]) == pytest.approx(-3.0, abs=0.05)
    assert np.std(drawn[classes == 1]) == pytest.approx(1.0, abs=0.05)
    assert drawn[classes == 2].min() >= 10.0 and drawn[classes == 2].max() <= 30.0
    assert np.array_equal(drawn, prior.draw(classes, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="no particle"):
        ContrastPrior.from_samples({1: [], 2: []}, 2.0)


def test_a_particles_peak_is_measured_above_a_sloping_background_with_its_sign() -> None:
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    image = 100.0 + 0.05 * xx
    image -= 5.0 * np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / (2 * 1.5**2))
    image += 3.0 * np.exp(-((yy - 45) ** 2 + (xx - 41) ** 2) / (2 * 1.5**2))
    labels = np.zeros((64, 64), np.int64)
    labels[19:22, 19:22] = 3
    labels[45, 40] = 1  # one pixel off the centre: the peak lies within reach
    _, classes, peaks = measure_peaks(image, labels, reach_px=2.0)
    assert classes.tolist() == [3, 1]
    assert peaks[0] == pytest.approx(-5.0, rel=0.03)
    assert peaks[1] == pytest.approx(3.0, rel=0.03)
    prior = uniform_contrast_prior({1: (0, 1)})
    channel = contrast_channel(torch.from_numpy(image)[None], torch.from_numpy(labels), prior)
    assert channel.shape == (64, 64) and channel.dtype == torch.float32
    assert channel[20, 20] == pytest.approx(peaks[0] / 2.0) and channel[45, 40] == pytest.approx(peaks[1] / 2.0)
    assert channel[0, 0] == 0
    with pytest.raises(ValueError, match="reach_px must be >= 0"):
        measure_peaks(image, labels, reach_px=-1.0)


def test_the_contrast_follows_the_mask_given_channel() -> None:
    labels = torch.from_numpy(_mask())[None]
    contrast = torch.full((1, 32, 32), 0.25)
    cond = encode_condition(labels, 2, contrast=contrast)
    assert cond.shape == (1, 4, 32, 32)
    assert torch.equal(cond[:, :3], encode_condition(labels, 2)) and torch.equal(cond[:, 3], contrast)


def test_the_unet_config_counts_the_contrast_channel_and_stores_it_only_where_set() -> None:
    plain, with_contrast = UNetConfig(num_classes=3), UNetConfig(num_classes=3, contrast_channel=True)
    assert (plain.condition_channels, with_contrast.condition_channels) == (4, 5)
    assert "contrast_channel" not in plain.to_dict()
    assert UNetConfig.from_dict(with_contrast.to_dict()) == with_contrast
    with pytest.raises(ValueError, match="contrast_channel: must be true or false"):
        UNetConfig(contrast_channel=1)


def test_a_model_config_has_a_prior_exactly_when_its_network_has_the_channel() -> None:
    common = {"schedule": linear_schedule(1000).to_config(), "parameterization": "v"}
    norm = {"mean": [0.0], "std": [STD]}
    prior = uniform_contrast_prior({1: (0, 1), 2: (0, 1)})
    with pytest.raises(ValueError, match="needs the contrasts' prior"):
        ModelConfig(unet=tiny_unet_config(contrast_channel=True), normalization=norm, **common)
    with pytest.raises(ValueError, match=r"without unet\.contrast_channel"):
        ModelConfig(unet=tiny_unet_config(), normalization=norm, particle_contrast=prior, **common)
    with pytest.raises(ValueError, match=r"the model 1\.\.2"):
        ModelConfig(
            unet=tiny_unet_config(contrast_channel=True),
            normalization=norm,
            particle_contrast=uniform_contrast_prior({1: (0, 1)}),
            **common,
        )
    config = ModelConfig(
        unet=tiny_unet_config(contrast_channel=True), normalization=norm, particle_contrast=prior, **common
    )
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.fixture(scope="module")
def contrast_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contrast") / "model.safetensors"
    prior = uniform_contrast_prior({1: (-2.0, -1.0), 2: (3.0, 6.0)})
    save_tiny_checkpoint(path, perturbed=True, contrast_channel=True, config_fields={"particle_contrast": prior})
    return path


def test_a_saved_prior_loads_back(contrast_model: Path) -> None:
    model = load_checkpoint(contrast_model)
    assert model.config.particle_contrast == uniform_contrast_prior({1: (-2.0, -1.0), 2: (3.0, 6.0)})
    assert model.net.conv_in.in_channels == 1 + 4
    assert "each particle's contrast drawn or given" in model.summary()


def test_drawn_contrasts_follow_the_seed_whatever_the_batch(contrast_model: Path) -> None:
    model = load_checkpoint(contrast_model)
    masks = np.stack([_mask(), _mask(), np.zeros((32, 32), np.int64)])
    together = generate(masks, model, steps=3, seed=[5, 6, 7], batch_size=3)
    alone = generate(masks[1], model, steps=3, seed=6)
    np.testing.assert_allclose(together[1], alone, atol=1e-6)
    # The same seed under a prior of other contrasts: the images differ.
    other = dataclasses.replace(model.config, particle_contrast=uniform_contrast_prior({1: (5.0, 6.0), 2: (-9, -8)}))
    brighter = generate(masks[1], dataclasses.replace(model, config=other), steps=3, seed=6)
    assert not np.allclose(brighter, alone, atol=1e-4)


def test_giving_some_particles_contrasts_leaves_the_others_as_drawn(contrast_model: Path) -> None:
    prior = load_checkpoint(contrast_model).config.particle_contrast
    labels = np.stack([_mask()])
    drawn = _contrast_channel(labels, prior, [torch.Generator().manual_seed(4)], None)
    given = [np.array([np.nan, 7.0, np.nan])]  # the second particle (class 1, at rows 6-7) only
    mixed = _contrast_channel(labels, prior, [torch.Generator().manual_seed(4)], given)
    assert mixed[0, 7, 7] == pytest.approx(7.0 / prior.scale)
    second = particle_blobs(_mask())[0] == 2
    torch.testing.assert_close(mixed[0][~torch.from_numpy(second)], drawn[0][~torch.from_numpy(second)])


def test_given_contrasts_reach_the_network_as_the_prior_s_would(contrast_model: Path, tmp_path: Path) -> None:
    model = load_checkpoint(contrast_model)
    # A prior that can only draw 4.5 for class 2 and -1.5 for class 1 (normalised units) ...
    fixed = tmp_path / "fixed.safetensors"
    config_fields = {"particle_contrast": uniform_contrast_prior({1: (-1.5, -1.5), 2: (4.5, 4.5)})}
    save_tiny_checkpoint(fixed, perturbed=True, contrast_channel=True, config_fields=config_fields)
    drawn = generate(_mask(), load_checkpoint(fixed), steps=3, seed=2)
    # ... gives the image that those contrasts, given in physical units, give.
    given = np.where(_mask() == 2, 4.5 * STD, np.where(_mask() == 1, -1.5 * STD, np.nan))
    np.testing.assert_allclose(generate(_mask(), model, steps=3, seed=2, particle_contrast=given), drawn, atol=1e-6)
    # Given contrasts are above the background: a normalisation's mean does not enter, only its std.
    offset = tmp_path / "offset.safetensors"
    config_fields["normalization"] = {"mean": [0.5], "std": [STD]}
    save_tiny_checkpoint(offset, perturbed=True, contrast_channel=True, config_fields=config_fields)
    offset_model = load_checkpoint(offset)
    np.testing.assert_allclose(
        generate(_mask(), offset_model, steps=3, seed=2, particle_contrast=given),
        generate(_mask(), offset_model, steps=3, seed=2),
        atol=1e-6,
    )
    # NaN everywhere: every particle drawn, as without the argument.
    nothing = np.full((32, 32), np.nan)
    np.testing.assert_array_equal(
        generate(_mask(), model, steps=3, seed=2, particle_contrast=nothing), generate(_mask(), model, steps=3, seed=2)
    )


def test_drawn_and_given_contrasts_go_through_the_channel_map(contrast_model: Path) -> None:
    model = load_checkpoint(contrast_model)
    prior = model.config.particle_contrast
    mapped = dataclasses.replace(prior, channel_map={2: ((3.0, 6.0), (6.0, 12.0))})  # class 2's peaks doubled
    calibrated = dataclasses.replace(model, config=dataclasses.replace(model.config, particle_contrast=mapped))
    assert "each particle's contrast drawn or given (calibrated for class 2)" in calibrated.summary()
    assert "calibrated" not in model.summary()
    labels = np.stack([_mask()])
    plain = _contrast_channel(labels, prior, [torch.Generator().manual_seed(4)], None)
    doubled = _contrast_channel(labels, mapped, [torch.Generator().manual_seed(4)], None)
    beads, other = torch.from_numpy(_mask() == 2), torch.from_numpy(_mask() == 1)
    torch.testing.assert_close(doubled[0][beads], 2 * plain[0][beads])
    torch.testing.assert_close(doubled[0][other], plain[0][other])
    given = [np.array([4.0, np.nan, np.nan])]
    assert _contrast_channel(labels, mapped, [torch.Generator().manual_seed(4)], given)[0, 5, 5] == pytest.approx(
        8.0 / prior.scale
    )


def test_bad_given_contrasts_are_refused(contrast_model: Path, tmp_path: Path) -> None:
    model = load_checkpoint(contrast_model)
    with pytest.raises(ValueError, match=r"particle_contrast: has shape \(16, 16\), the mask \(32, 32\)"):
        generate(_mask(), model, steps=2, particle_contrast=np.zeros((16, 16)))
    with pytest.raises(ValueError, match="infinite"):
        generate(_mask(), model, steps=2, particle_contrast=np.full((32, 32), np.inf))
    plain = tmp_path / "plain.safetensors"
    save_tiny_checkpoint(plain)
    with pytest.raises(ValueError, match="no contrast channel"):
        generate(_mask(), load_checkpoint(plain), steps=2, particle_contrast=np.zeros((32, 32)))
    with pytest.raises(ValueError, match="'layer c': contains infinite"):
        check_given_contrasts(np.full((32, 32), -np.inf), (1, 32, 32), model.config.particle_contrast, "'layer c'")


@pytest.fixture(scope="module")
def trained_with_contrast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("contrast_run") / "run"
    assert train.main(tiny_overrides(run_dir, "model.contrast_channel=true")) == 0
    return run_dir / "model.safetensors"


def test_a_run_with_the_channel_exports_the_training_sets_contrasts(trained_with_contrast: Path) -> None:
    model = load_checkpoint(trained_with_contrast)
    prior = model.config.particle_contrast
    assert sorted(prior.quantiles) == [1, 2, 3]
    # The simulator's 600 nm beads are far brighter than its 80 nm particles.
    assert np.median(np.abs(prior.quantiles[3])) > 3 * np.median(np.abs(prior.quantiles[1]))
    assert generate(_mask(), model, steps=2, seed=0).shape == (32, 32)


def test_a_fine_tune_adds_the_channel_without_changing_what_the_network_draws(tmp_path: Path) -> None:
    assert train.main(tiny_overrides(tmp_path / "source")) == 0
    source = tmp_path / "source" / "model.safetensors"
    config = tiny_config(tmp_path / "run", f"model.init_from={source}", "model.contrast_channel=true")
    torch.manual_seed(3)
    widened = ConditionalUNet(config.unet_config()).eval()
    load_initial_weights(widened, config)
    original = load_checkpoint(source).net
    labels = torch.from_numpy(np.stack([_mask(), _mask()]))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        expected = original(x, t, encode_condition(labels, 3))
        got = widened(x, t, encode_condition(labels, 3, contrast=torch.randn(2, 32, 32)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_command_line_takes_particles_contrasts_from_a_tiff(contrast_model: Path, tmp_path: Path, capsys) -> None:
    tifffile.imwrite(tmp_path / "mask.tif", _mask().astype(np.uint8))
    given = np.where(_mask() == 2, 4.5 * STD, np.nan).astype(np.float32)
    tifffile.imwrite(tmp_path / "contrast.tif", given)
    args = ["generate", "--mask", str(tmp_path / "mask.tif"), "--checkpoint", str(contrast_model), "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "out.tif"), "--particle-contrast", str(tmp_path / "contrast.tif")]) == 0
    expected = generate(_mask(), load_checkpoint(contrast_model), steps=2, seed=0, particle_contrast=given)
    np.testing.assert_allclose(tifffile.imread(tmp_path / "out.tif"), expected, atol=1e-6)
    tifffile.imwrite(tmp_path / "small.tif", given[:16])
    assert main([*args, "--out", str(tmp_path / "bad.tif"), "--particle-contrast", str(tmp_path / "small.tif")]) == 2
    assert "small.tif: has shape (16, 32), the mask (32, 32)" in capsys.readouterr().err
    assert not (tmp_path / "bad.tif").exists()


def test_a_fine_tune_of_a_model_with_the_channel_keeps_its_units(trained_with_contrast: Path, tmp_path: Path) -> None:
    model = load_checkpoint(trained_with_contrast)
    source = model.config.particle_contrast
    # A calibrated map fits the network it was measured on; the fine-tune must not keep it.
    calibrated = dataclasses.replace(source, channel_map={1: ((1.0, 2.0), (1.5, 3.0))})
    init = tmp_path / "calibrated.safetensors"
    save_checkpoint(init, model.net, dataclasses.replace(model.config, particle_contrast=calibrated))
    run = tmp_path / "run"
    # Other images (a new seed) measure another scale; the fine-tune keeps the one the network learned.
    overrides = tiny_overrides(run, f"model.init_from={init}", "model.contrast_channel=true", "seed=9")
    assert train.main(overrides) == 0
    tuned = load_checkpoint(run / "model.safetensors").config.particle_contrast
    assert tuned.scale == source.scale and tuned.reach_px == source.reach_px
    assert tuned.quantiles != source.quantiles
    assert tuned.channel_map is None


def test_the_dataset_measures_the_channel_as_the_trainer_would(tmp_path: Path) -> None:
    data = build_data(tiny_config(tmp_path / "run", "model.contrast_channel=true"))
    dataset = data.train_loader.dataset
    dataset.normalization = compute_normalization(dataset, max_images=8)
    prior = measure_prior(dataset, max_images=8)
    plain = dataset[(3, 0)]
    assert "contrast" not in plain
    dataset.contrast_prior = prior
    item = dataset[(3, 0)]
    torch.testing.assert_close(item["contrast"], contrast_channel(plain["image"], plain["labels"], prior))
    assert item["contrast"].abs().max() > 0.1 and torch.all(item["contrast"][plain["labels"] == 0] == 0)
