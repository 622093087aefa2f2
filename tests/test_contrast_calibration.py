"""The contrast channel's calibration (quantile mapping) and ``iscat-diffusion calibrate-contrast``."""

import dataclasses
import json

import numpy as np
import pytest
from tests.tiny_models import save_tiny_checkpoint, uniform_contrast_prior

from napari_iscat_diffusion.cli import main
from napari_iscat_diffusion.diffusion import load_checkpoint
from napari_iscat_diffusion.diffusion.particle_contrast import blob_peaks, paint_blobs, particle_blobs
from napari_iscat_diffusion.evaluation import contrast_calibration
from napari_iscat_diffusion.evaluation.contrast_calibration import (
    calibrate_contrast_channel,
    next_channel_magnitudes,
    wanted_magnitudes,
)

SIMULATOR = {"image_size": [32, 32], "particles_per_image": [2, 4]}
STD = 0.01


def _masks(n: int = 16) -> np.ndarray:
    """Masks of 48 px with nine 3x3 class-2 beads and four 2x2 class-1 particles each, 12 px apart."""
    masks = np.zeros((n, 48, 48), np.int64)
    for y in (6, 18, 30):
        for x in (6, 18, 30):
            masks[:, y : y + 3, x : x + 3] = 2
    for y, x in ((42, 6), (42, 18), (42, 30), (6, 42)):
        masks[:, y : y + 2, x : x + 2] = 1
    return masks


def test_a_step_moves_each_quantile_by_its_shortfall_over_the_slope() -> None:
    wanted, channel = np.array([2.0, 4.0, 6.0]), np.array([2.0, 4.0, 6.0])
    generated = np.array([3.0, 4.0, 5.0])  # drawn towards the middle
    np.testing.assert_allclose(next_channel_magnitudes(wanted, channel, generated, 0.5), [0.2, 4.0, 8.0])
    # A shallow or noisy slope never divides by less than MIN_SLOPE; the result stays non-decreasing.
    assert next_channel_magnitudes(wanted, channel, generated, 0.01)[-1] == pytest.approx(8.0)
    assert np.all(np.diff(next_channel_magnitudes(wanted, channel, np.array([1.0, 9.0, 2.0]), 1.0)) >= 0)


def _network_drawing_towards_the_typical_peak(prior, typical: dict[int, float]):
    """A stand-in for ``generated_images``: a particle of a class in ``typical`` gets 0.6 of its channel value plus 0.4
    of the class's typical peak (normalised units); any other class a peak unrelated to its channel."""
    rng = np.random.default_rng(0)

    def network(trial, masks, seeds, options, stage, progress):
        images = []
        for mask, given in zip(masks, options["particle_contrast"], strict=True):
            blobs, classes = particle_blobs(mask)
            channel = trial.config.particle_contrast.to_channel(blob_peaks(blobs, given) / STD, classes) * prior.scale
            towards = np.array([typical.get(int(c), np.nan) for c in classes])
            peaks = np.where(np.isfinite(towards), 0.6 * channel + 0.4 * towards, -rng.uniform(1.0, 2.0, len(classes)))
            images.append(paint_blobs(blobs, peaks * STD))
        return np.stack(images)

    return network


def test_the_calibration_undoes_a_network_that_draws_towards_the_typical_peak(tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.safetensors"
    prior = uniform_contrast_prior({1: (-2.0, -1.0), 2: (3.0, 9.0)})
    save_tiny_checkpoint(path, contrast_channel=True, config_fields={"particle_contrast": prior})
    model = load_checkpoint(path)
    network = _network_drawing_towards_the_typical_peak(prior, {2: 6.0})
    monkeypatch.setattr(contrast_calibration, "generated_images", network)
    calibrated, report = calibrate_contrast_channel(model, _masks(64), rounds=2)
    first, last = report["rounds"][0], report["rounds"][-1]
    assert first["2"]["slope"] == pytest.approx(0.6, rel=0.05) and first["2"]["range_ratio"] < 0.7
    assert last["2"]["relative_to_spread"] < 0.25 * first["2"]["relative_to_spread"]
    assert last["2"]["range_ratio"] == pytest.approx(1.0, abs=0.1)
    assert report["mapped"] == ["2"] and set(report["left"]) == {"1"}
    assert list(calibrated.channel_map) == [2] and calibrated.quantiles == prior.quantiles
    wanted, channel = calibrated.channel_map[2]
    np.testing.assert_allclose(wanted, wanted_magnitudes(prior, 2))
    # The network's inverse: a wanted peak m needs the channel value (m - 2.4) / 0.6, give or take the scatter of
    # 576 drawn peaks and the background the measurement subtracts; the ends widen well beyond the wanted range.
    np.testing.assert_allclose(channel, (np.array(wanted) - 2.4) / 0.6, atol=1.0)
    assert channel[0] < wanted[0] - 1.0 and channel[-1] > wanted[-1] + 1.5


def test_the_calibration_refuses_a_model_without_the_channel_and_masks_without_particles(tmp_path) -> None:
    plain, contrast = tmp_path / "plain.safetensors", tmp_path / "contrast.safetensors"
    save_tiny_checkpoint(plain)
    save_tiny_checkpoint(
        contrast,
        contrast_channel=True,
        config_fields={"particle_contrast": uniform_contrast_prior({1: (1, 2), 2: (3, 4)})},
    )
    with pytest.raises(ValueError, match="no contrast channel"):
        calibrate_contrast_channel(load_checkpoint(plain), _masks(4))
    with pytest.raises(ValueError, match="no particle"):
        calibrate_contrast_channel(load_checkpoint(contrast), np.zeros((4, 16, 16), np.int64))
    with pytest.raises(ValueError, match="rounds"):
        calibrate_contrast_channel(load_checkpoint(contrast), _masks(4), rounds=0)


def _simulator_contrast_checkpoint(path, prior) -> None:
    training = {"config": {"data": {"source": "simulator", "simulator": SIMULATOR}}}
    fields = {"particle_contrast": prior}
    save_tiny_checkpoint(
        path, perturbed=True, num_classes=3, contrast_channel=True, training=training, config_fields=fields
    )


def test_the_command_writes_a_report_and_a_checkpoint_with_the_map(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "model.safetensors"
    prior = uniform_contrast_prior({1: (-2.0, -1.0), 2: (3.0, 9.0), 3: (4.0, 12.0)})
    _simulator_contrast_checkpoint(path, prior)
    monkeypatch.setattr(
        contrast_calibration, "generated_images", _network_drawing_towards_the_typical_peak(prior, {2: 6.0, 3: 8.0})
    )
    out, saved = tmp_path / "report.json", tmp_path / "calibrated.safetensors"
    args = ["calibrate-contrast", "--checkpoint", str(path), "--n", "24", "--rounds", "2", "--size", "32"]
    assert main([*args, "--out", str(out), "--save", str(saved)]) == 0
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 3 and report["settings"]["mask_seeds"] == "2000000000..2000000023"
    assert report["mapped"] == ["2", "3"] and list(report["left"]) == ["1"]
    calibrated = load_checkpoint(saved).config.particle_contrast
    expected = {int(k): (tuple(w), tuple(c)) for k, (w, c) in report["channel_map"].items()}
    assert calibrated.channel_map == expected and set(expected) == {2, 3}
    assert dataclasses.replace(calibrated, channel_map=None) == prior
    printed = capsys.readouterr().out
    assert "round 0 (no map): class 1 W/spread" in printed and "class 1 left unmapped" in printed
    assert f"wrote {saved} (sha256 " in printed and "with the contrast map for classes 2, 3" in printed
    # Nothing is overwritten.
    assert main([*args, "--out", str(tmp_path / "again.json"), "--save", str(saved)]) == 2
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "again.json").exists()


def test_the_command_runs_the_network_and_refuses_what_it_cannot_calibrate(tmp_path, capsys) -> None:
    path = tmp_path / "model.safetensors"
    _simulator_contrast_checkpoint(path, uniform_contrast_prior({1: (-2.0, -1.0), 2: (3.0, 9.0), 3: (4.0, 12.0)}))
    out, saved = tmp_path / "report.json", tmp_path / "calibrated.safetensors"
    args = ["calibrate-contrast", "--checkpoint", str(path), "--n", "4", "--rounds", "1", "--size", "32"]
    assert main([*args, "--steps", "2", "--device", "cpu", "--out", str(out), "--save", str(saved)]) == 0
    report = json.loads(out.read_text())
    # An untrained network does not follow the channel: every class is left, and no copy is written.
    assert len(report["rounds"]) == 2 and report["mapped"] == [] and report["channel_map"] is None
    assert set(report["left"]) == {"1", "2", "3"}
    assert f"no class could be mapped; {saved} not written" in capsys.readouterr().out and not saved.exists()
    plain = tmp_path / "plain.safetensors"
    save_tiny_checkpoint(plain, num_classes=3)
    bad = ["calibrate-contrast", "--checkpoint", str(plain), "--out", str(tmp_path / "plain.json")]
    assert main(bad) == 2
    assert f"{plain}: this model has no contrast channel" in capsys.readouterr().err
    assert not (tmp_path / "plain.json").exists()


def test_a_class_without_contrasts_is_left_unmapped_from_the_first_round(tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.safetensors"
    # A class whose training set held no measured particle has a distribution at 0 (ContrastPrior.from_samples).
    prior = uniform_contrast_prior({1: (0.0, 0.0), 2: (3.0, 9.0)})
    save_tiny_checkpoint(path, contrast_channel=True, config_fields={"particle_contrast": prior})
    monkeypatch.setattr(
        contrast_calibration, "generated_images", _network_drawing_towards_the_typical_peak(prior, {2: 6.0})
    )
    calibrated, report = calibrate_contrast_channel(load_checkpoint(path), _masks(8), rounds=1)
    assert report["mapped"] == ["2"] and "1" in report["left"] and list(calibrated.channel_map) == [2]
