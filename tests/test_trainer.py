"""The Trainer in one process: it learns, writes what a run promises, exports a model the plugin loads,
skips non-finite steps, resumes past a damaged checkpoint and refuses to mix runs."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.tiny_training import tiny_config, tiny_overrides, tiny_trainer
from training import train
from training import trainer as trainer_module
from training.config import ConfigError
from training.spectral_density import spectral_density_range
from training.state import list_states, load_state, save_state, state_path
from training.trainer import NonFiniteLossError, lr_factor

from napari_iscat_diffusion.diffusion import generate, load_checkpoint


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_lowers_the_validation_loss_and_writes_its_outputs(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        "train.steps=40",
        "log.every=10",
        "log.val_every=20",
        "log.sample_every=40",
        "log.tensorboard=true",
        "checkpoint.every=20",
    )
    trainer = tiny_trainer(config)
    before = trainer.validate()  # the EMA is the initial network here
    summary = trainer.fit()
    assert summary["steps"] == 40 and summary["images_seen"] == 160
    # Measured: 0.85 -> 0.39 (v-prediction, min-SNR weights); a network that learns nothing stays near 0.85.
    assert summary["final_val_loss"] < 0.7 * before, (before, summary["final_val_loss"])

    metrics = _metrics(tmp_path)
    assert [e["step"] for e in metrics if "loss" in e] == [10, 20, 30, 40]
    assert [e["step"] for e in metrics if "val_loss" in e] == [20, 40]
    assert all(math.isfinite(e["loss"]) and e["images_per_s"] > 0 for e in metrics if "loss" in e)
    for name in ("loss.png", "val_loss.png", "lr.png", "samples/samples-000000040.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "state-000000040.safetensors").is_file()


def test_export_loads_in_the_plugin_and_generates_in_physical_units(tmp_path: Path) -> None:
    trainer = tiny_trainer(tiny_config(tmp_path, "train.steps=4"))
    trainer.fit()
    path = trainer.export()
    assert path == tmp_path / "model.safetensors"

    model = load_checkpoint(path)
    stats = trainer.train_loader.dataset.normalization
    assert model.config.normalization == stats
    assert model.config.num_classes == 3 and model.config.training_size == (32, 32)
    assert model.config.pixel_size_nm == 60.0  # the simulator's, stored for the plugin
    assert model.config.training["steps"] == 4
    # export.sampling_density_range is "auto": measured on the normalisation's images, so dpmpp_2m is fitted.
    dataset, data = trainer.train_loader.dataset, trainer.config.data
    measured = spectral_density_range(dataset, stats, max_images=data.normalization_images, seed=trainer.config.seed)
    assert model.config.sampling_density_range == measured and model.sigma_grid("dpmpp_2m") == "fitted"
    exported = model.net.state_dict()
    assert all(torch.equal(exported[name], value) for name, value in trainer.ema.module.state_dict().items())

    mask = np.zeros((40, 48), np.uint8)
    mask[10:14, 20:24] = 2
    image = generate(mask, model, sampler="ddim", steps=3, seed=1, device="cpu")
    assert image.shape == (40, 48) and image.dtype == np.float32 and np.isfinite(image).all()
    # Physical units: within a few training-set scales of the training-set centre. Without the stored
    # statistics the image would be in normalised units, hundreds of scales away.
    mean, std = stats["mean"][0], stats["std"][0]
    assert np.abs(image - mean).max() < 50 * std
    assert np.abs(image - mean).max() > 0.01 * std


def test_a_plot_that_cannot_be_drawn_costs_the_run_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args, **_kwargs):
        raise OSError("no font")

    monkeypatch.setattr(trainer_module, "curves_figure", broken)
    trainer = tiny_trainer(tiny_config(tmp_path, "train.steps=4"))
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert "could not draw the metric plots: no font" in caplog.text
    assert load_checkpoint(trainer.export()).config.training["steps"] == 4
    assert not (tmp_path / "loss.png").exists()


def test_a_non_finite_step_is_skipped_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    loss = trainer_module.diffusion_loss
    calls = []

    def nan_on_third_call(*args, **kwargs) -> torch.Tensor:
        calls.append(1)
        value = loss(*args, **kwargs)
        return value * math.nan if len(calls) == 3 else value

    monkeypatch.setattr(trainer_module, "diffusion_loss", nan_on_third_call)
    trainer = tiny_trainer(tiny_config(tmp_path, "train.steps=3", "checkpoint.every=2"))
    with caplog.at_level(logging.WARNING, logger="training"):
        trainer.fit()
    assert "step 3: non-finite loss or gradient, step skipped" in caplog.text
    assert {"step": 3, "skipped": "non-finite loss or gradient"} in _metrics(tmp_path)

    # Step 3 changed nothing: weights, EMA and optimiser moments are those of step 2.
    before, _ = load_state(state_path(tmp_path / "checkpoints", 2))
    after, info = load_state(state_path(tmp_path / "checkpoints", 3))
    for name in before:
        if not name.startswith("rng."):
            assert torch.equal(before[name], after[name]), name
    assert info["step"] == 3 and info["nonfinite_in_row"] == 1 and info["images_seen"] == 12


def _nan_loss_on(steps: set[int] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the training loss NaN on the given 1-based training calls (None: always); validation is off."""
    loss = trainer_module.diffusion_loss
    calls = itertools.count(1)

    def nan_loss(*args, **kwargs) -> torch.Tensor:
        value = loss(*args, **kwargs)
        call = next(calls)
        return value * math.nan if steps is None or call in steps else value

    monkeypatch.setattr(trainer_module, "diffusion_loss", nan_loss)


def test_k_non_finite_steps_in_a_row_stop_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_loss_on(None, monkeypatch)
    assert train.main(tiny_overrides(tmp_path / "run", "train.max_nonfinite=3")) == 1
    err = capsys.readouterr().err
    assert "error: the loss or the gradients were NaN or infinite in 3 steps in a row and 3 of 3 steps in all" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    with pytest.raises(NonFiniteLossError, match="in 2 steps in a row"):
        tiny_trainer(tiny_config(tmp_path / "again", "train.max_nonfinite=2")).fit()


def test_non_finite_steps_that_are_not_in_a_row_stop_the_run_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every other step skipped: never 2 in a row, but the 3rd skip is more than max_nonfinite=2 and 1 % of steps.
    _nan_loss_on({1, 3, 5, 7}, monkeypatch)
    trainer = tiny_trainer(tiny_config(tmp_path, "train.max_nonfinite=2", "train.steps=8"))
    with pytest.raises(NonFiniteLossError, match="in 1 steps in a row and 3 of 5 steps in all"):
        trainer.fit()


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=4", "checkpoint.every=2")
    tiny_trainer(config).fit()
    newest = state_path(tmp_path / "checkpoints", 4)
    newest.write_bytes(newest.read_bytes()[:-64])

    trainer = tiny_trainer(config)
    with pytest.warns(UserWarning, match="skipping a damaged training checkpoint.*state-000000004"):
        path = trainer.resume("auto")
    assert path == state_path(tmp_path / "checkpoints", 2)
    assert trainer.step == 2 and trainer.ema.images_seen == 8  # the EMA counter resumes with the weights
    trainer.fit()
    assert load_state(newest)[1]["step"] == 4  # the damaged file was replaced

    for _, path in list_states(tmp_path / "checkpoints"):
        path.write_bytes(b"damaged")
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"none of the 2 training states .* is usable"):
        tiny_trainer(config).resume("auto")


def test_resume_refuses_to_mix_runs_in_one_run_dir(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=4", "checkpoint.every=2")
    tiny_trainer(config).fit()
    with pytest.raises(ConfigError, match=r"checkpoint\.resume=none: .* states up to step 4"):
        tiny_trainer(config).resume("none")
    older = state_path(tmp_path / "checkpoints", 2)
    with pytest.raises(ConfigError, match="states up to step 4 beyond this run's start at step 2"):
        tiny_trainer(config).resume(str(older))
    with pytest.raises(ConfigError, match=r"checkpoint\.resume: .*missing\.safetensors"):
        tiny_trainer(config).resume(str(tmp_path / "missing.safetensors"))
    other = tiny_config(tmp_path / "other", "model.base_channels=16")
    with pytest.raises(ConfigError, match="different model section"):
        tiny_trainer(other).resume(str(older))


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    factors = [lr_factor(step, 4, 20, "cosine", 0.1) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[20] == pytest.approx(0.1)
    assert lr_factor(10, 4, 20, "constant", 0.1) == 1.0


def test_a_state_cut_by_the_retired_plateau_schedule_is_refused_and_others_resume(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=2")
    tiny_trainer(config).fit()
    path = list_states(tmp_path / "checkpoints")[0][1]
    tensors, info = load_state(path)
    save_state(path, tensors, {**info, "lr_scale": 1.0})  # as every run but a plateau one wrote it
    assert tiny_trainer(config).resume("auto") == path
    save_state(path, tensors, {**info, "lr_scale": 0.5})
    with pytest.raises(ConfigError, match="plateau learning-rate schedule, which this version no longer has"):
        tiny_trainer(config).resume("auto")


def test_early_stopping_ends_the_run_with_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(tmp_path, "train.steps=8", "log.val_every=1", "train.early_stopping_patience=2")
    trainer = tiny_trainer(config)
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.1])
    monkeypatch.setattr(trainer, "validate", lambda: next(losses))
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["steps"] == 4
    assert summary["best_step"] == 2 and summary["best_val_loss"] == 0.5
    assert [step for step, _ in list_states(tmp_path / "checkpoints")] == [4, 2, 1]


def test_the_time_limit_ends_the_run_with_a_checkpoint_and_a_resume_continues(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=8", "train.time_limit_minutes=2.5", "checkpoint.every=0")
    trainer = tiny_trainer(config)
    minutes = iter(range(100))
    trainer._clock = lambda: 60.0 * next(minutes)  # a minute passes at every look at the clock
    summary = trainer.fit()
    # The deadline is minute 2.5: the looks after steps 1 and 2 read minutes 1 and 2, the one after step 3 reads 3.
    assert summary["time_limit_reached"] and not summary["stopped_early"] and summary["steps"] == 3
    assert [step for step, _ in list_states(tmp_path / "checkpoints")] == [3]

    resumed = tiny_trainer(config)
    resumed.resume("auto")
    resumed._clock = lambda: 0.0
    summary = resumed.fit()
    assert summary["steps"] == 8 and not summary["time_limit_reached"]


def test_the_loss_weights_reach_the_training_and_validation_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    real = trainer_module.diffusion_loss

    def recording(*args, **kwargs):
        weights = tuple(kwargs[k] for k in ("particle_weight", "particle_radius_px", "min_snr_floor"))
        seen.append((weights, kwargs.get("timesteps") is None))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "diffusion_loss", recording)
    config = tiny_config(
        tmp_path,
        "train.steps=1",
        "train.particle_loss_weight=9",
        "train.particle_loss_radius_px=3",
        "train.min_snr_floor=0.02",
    )
    trainer = tiny_trainer(config)
    trainer.fit()
    trainer.validate()
    assert {weights for weights, _ in seen} == {(9.0, 3, 0.02)}
    assert {training for _, training in seen} == {True, False}  # both a training and a validation call
