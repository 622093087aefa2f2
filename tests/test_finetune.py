"""Fine-tuning: ``model.init_from`` starts a run from the weights of a trained model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tests.tiny_models import save_tiny_checkpoint
from tests.tiny_training import tiny_config, tiny_overrides
from training import train
from training.config import ConfigError, load_config
from training.finetune import initial_contrast_prior, initial_normalization, load_initial_weights

from napari_iscat_diffusion.diffusion import load_checkpoint
from napari_iscat_diffusion.diffusion.checkpoint import file_sha256
from napari_iscat_diffusion.diffusion.unet import ConditionalUNet
from napari_iscat_diffusion.models import bundled_checkpoints

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "training" / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported model of a tiny run."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    assert train.main(tiny_overrides(run_dir)) == 0
    return run_dir / "model.safetensors"


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_the_weights_of_the_checkpoint_are_copied(trained: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run", f"model.init_from={trained}")
    torch.manual_seed(123)
    model = ConditionalUNet(config.unet_config())
    fresh = _weights(model)
    sha256 = load_initial_weights(model, config)
    assert sha256 == hashlib.sha256(trained.read_bytes()).hexdigest()
    expected = load_checkpoint(trained).net.state_dict()
    assert any(not torch.equal(fresh[name], expected[name]) for name in expected)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_run_from_init_from_starts_at_those_weights(trained: Path, tmp_path: Path) -> None:
    # With a vanishing learning rate the exported (EMA) weights stay those the run started from.
    run_dir = tmp_path / "run"
    assert train.main(tiny_overrides(run_dir, f"model.init_from={trained}", "optim.lr=1e-20")) == 0
    start, end = load_checkpoint(trained).net.state_dict(), load_checkpoint(run_dir / "model.safetensors").net
    for name, value in end.state_dict().items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=1e-6, msg=name)
    assert end.state_dict().keys() == start.keys()


def test_an_architecture_that_differs_is_named(trained: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run", f"model.init_from={trained}", "model.base_channels=12")
    with pytest.raises(ConfigError) as err:
        load_initial_weights(ConditionalUNet(config.unet_config()), config)
    message = str(err.value)
    assert str(trained) in message
    assert "model.base_channels is 12 in the config but 8 in the checkpoint" in message


def test_a_schedule_that_differs_is_named(tmp_path: Path) -> None:
    # save_tiny_checkpoint writes a linear schedule; the tiny run uses the cosine default.
    checkpoint = tmp_path / "linear.safetensors"
    save_tiny_checkpoint(checkpoint, num_classes=3, attention_levels=())
    config = tiny_config(tmp_path / "run", f"model.init_from={checkpoint}")
    with pytest.raises(ConfigError, match=r"model.schedule is .* in the config but .*linear"):
        load_initial_weights(ConditionalUNet(config.unet_config()), config)


def test_a_missing_checkpoint_stops_the_run_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere.safetensors"
    run_dir = tmp_path / "run"
    assert train.main(tiny_overrides(run_dir, f"model.init_from={missing}")) == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and "file not found" in err and str(missing) in err
    assert not (run_dir / "model.safetensors").exists()


def test_the_bundled_model_starts_a_fine_tune_of_its_own_config(tmp_path: Path) -> None:
    bundled = bundled_checkpoints()["iscat-sim-3class"]
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.init_from={bundled}", "model.contrast_channel=true"]
    config = load_config(CONFIGS_DIR / "default_model.yaml", [*overrides, "data.normalization=init_from"])
    model = ConditionalUNet(config.unet_config())
    assert load_initial_weights(model, config) == file_sha256(bundled)
    stored = load_checkpoint(bundled)
    assert initial_normalization(config, 1) == stored.config.normalization
    assert initial_contrast_prior(config) == stored.config.particle_contrast


def test_a_fine_tune_can_keep_the_checkpoints_normalisation(trained: Path, tmp_path: Path) -> None:
    source = load_checkpoint(trained).config.normalization
    kept, measured = tmp_path / "kept", tmp_path / "measured"
    common = (f"model.init_from={trained}", "seed=5")
    assert train.main(tiny_overrides(kept, *common, "data.normalization=init_from")) == 0
    assert train.main(tiny_overrides(measured, *common)) == 0
    assert load_checkpoint(kept / "model.safetensors").config.normalization == source
    # the default measures the run's own images, which another seed draws differently
    assert load_checkpoint(measured / "model.safetensors").config.normalization != source


def test_keeping_the_normalisation_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.normalization: init_from .* set model\.init_from"):
        tiny_config(tmp_path / "run", "data.normalization=init_from")
