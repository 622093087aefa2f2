"""The training configuration: YAML plus key=value overrides, every key and value checked before training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from training import train
from training.config import ConfigError, TrainConfig, build_model_config, load_config

from napari_iscat_diffusion.diffusion import load_checkpoint

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "training" / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.unet_config().num_classes == config.model.num_classes


def test_defaults_file_and_overrides_combine(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 1.0e-3}\ntrain: {steps: 100, batch_size: 8}\n")
    config = load_config(path, ["train.steps=7", "optim.lr=1e-4", "data.crop_size=[16, 24]", "ema.rampup_ratio=null"])
    assert config.train.steps == 7 and config.train.batch_size == 8
    assert config.optim.lr == 1e-4  # YAML reads "1e-4" as a string; the float field accepts it
    assert config.data.crop_size == (16, 24)
    assert config.ema.rampup_ratio is None
    assert config.optim.warmup_steps == TrainConfig().optim.warmup_steps


def test_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(CONFIGS[0], ["model.dropout=0.1"])
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown config key optim\.lrr; known keys in optim: lr, "),
        ("trian.steps=1", r"unknown config key trian;"),
        ("train.steps=abc", r"train\.steps: must be an integer, got 'abc'"),
        ("train.steps=1.5", r"train\.steps: must be an integer"),
        ("log.progress=maybe", r"log\.progress: must be true or false"),
        ("optim.lr=fast", r"optim\.lr: must be a number"),
        ("data.crop_size=[32]", r"data\.crop_size: must be a list of 2 values"),
        ("data.source=zarr", r"data\.source: must be one of \['simulator', 'tiff', 'hdf5'\]"),
        ("train=5", r"train: expected a mapping"),
        ("train.steps", r"expected key=value"),
        ("train.batch_size=0", r"train\.batch_size: must be from 1 to 65536, got 0"),
        ("checkpoint.keep_last=0", r"checkpoint\.keep_last: must be >= 1"),
        ("train.cond_drop_prob=1.5", r"train\.cond_drop_prob: must be a probability"),
        ("train.particle_loss_weight=-1", r"train\.particle_loss_weight: must be >= 0"),
        ("train.particle_loss_radius_px=-2", r"train\.particle_loss_radius_px: must be >= 0 pixels"),
        ("optim.lr=nan", r"optim\.lr: must be a finite number"),
        ("train.min_snr_floor=-0.1", r"train\.min_snr_floor: must be >= 0"),
        (("train.min_snr_floor=0.01", "train.min_snr_gamma=null"), r"train\.min_snr_floor: a floor of 0\.01 needs"),
        ("train.min_snr_floor=5", r"train\.min_snr_floor: a floor of 5\.0? needs train\.min_snr_gamma above it"),
        ("train.time_limit_minutes=0", r"train\.time_limit_minutes: must be a positive number of minutes"),
        ("log.sampler=magic", r"log\.sampler: unknown sampler 'magic'"),
        ("model.schedule={name: quadratic}", r"model\.schedule: unknown noise schedule"),
        ("model.norm_groups=5", r"model\."),
        (("train.early_stopping_patience=3", "log.val_every=0"), r"train\.early_stopping_patience: acts on validation"),
        # Values that the exported model's ModelConfig refuses, found at load time rather than after training.
        (
            "export.default_guidance=-1",
            r"^export\.default_guidance: must be a finite number >= 0 and at most 100, got -1\.0$",
        ),
        ("data.pixel_size_nm=-5", r"^data\.pixel_size_nm: must be a positive number from 0\.01 to 1e\+06 or None"),
        ("data.class_names=[a, b]", r"^data\.class_names: must be 3 non-empty strings"),
        ("export.default_steps={magic: 3}", r"^export\.default_steps: unknown sampler"),
        ("export.default_class_guidance={7: 2.0}", r"^export\.default_class_guidance: "),
        ("export.sampling_sigma_max=0", r"^export\.sampling_sigma_max: must be a finite noise level"),
        ("export.default_sampler=magic", r"^export\.default_sampler: unknown sampler"),
        # Values that used to fail mid-run or at the export with a traceback.
        ("train.min_snr_gamma=1e308", r"train\.min_snr_gamma: must be a finite number \(at most 3\.4e\+38"),
        ("optim.grad_clip=.inf", r"optim\.grad_clip: must be a finite number"),
        ("optim.weight_decay=1e30", r"optim\.weight_decay: lr \* weight_decay must be below 1"),
        ("optim.lr=5", r"optim\.lr: must be a positive number up to 1"),
        ("ema.half_life_images=.inf", r"ema\.half_life_images: must be a finite number"),
        ("log.guidance=-1", r"log\.guidance: must be from 0 to 100"),
        ("log.guidance=1e4", r"log\.guidance: must be from 0 to 100"),
        ("seed=-1", r"seed: must be >= 0"),
        ("model.image_channels=100000000000000000000", r"model\.image_channels: must be an integer of at most 19"),
        ("run_dir=''", r"run_dir: must not be empty"),
        ("train.batch_size=1000000000", r"train\.batch_size: must be from 1 to 65536"),
        ("data.num_workers=100000", r"data\.num_workers: must be from 0 to 256"),
        ("log.sample_steps=5000", r"log\.sample_steps: must be from 1 to 1000 \(model\.schedule's timesteps\)"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str | tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override] if isinstance(override, str) else list(override))


def test_output_paths_of_the_wrong_kind_are_refused_at_load(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"^run_dir: .*file is a file, not a folder; choose another folder$"):
        load_config(None, [f"run_dir={a_file}"])
    with pytest.raises(
        ConfigError, match=r"^run_dir: .*file/run: .*file is a file, not a folder; choose another path$"
    ):
        load_config(None, [f"run_dir={a_file / 'run'}"])
    with pytest.raises(ConfigError, match=r"^export\.path: .* is a folder; expected a file$"):
        load_config(None, [f"run_dir={tmp_path / 'run'}", f"export.path={tmp_path}"])


def test_main_rejects_an_export_value_before_reading_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-data"
    assert (
        train.main([f"run_dir={run_dir}", "data.source=tiff", f"data.path={missing}", "export.default_guidance=-1"])
        == 2
    )
    assert (
        capsys.readouterr().err
        == "error: export.default_guidance: must be a finite number >= 0 and at most 100, got -1.0\n"
    )
    assert not run_dir.exists()


def test_unreadable_or_malformed_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the config file .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the config must be a mapping"):
        load_config(listed)


def test_binary_fifo_and_deeply_nested_configs_are_refused_naming_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    for path in (binary, deep, fifo):
        with pytest.raises(ConfigError, match=rf"cannot read the config file .*{path.name}"):
            load_config(path)
    with pytest.raises(ConfigError, match=r"train\.steps: cannot parse the value"):
        load_config(None, ["train.steps=" + "[" * 50_000])


def test_yaml_syntax_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1\n")
    assert train.main(["--config", str(broken)]) == 2
    assert train.main([f"run_dir={tmp_path / 'run'}", "data.simulator={image_size:"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "broken.yaml" in lines[0] and "data.simulator: cannot parse" in lines[1]


def test_an_interrupted_run_ends_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    assert train.main([f"run_dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err == "interrupted; run the same command again to resume from the last checkpoint\n"


def test_main_rejects_a_bad_key_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    assert train.main([f"run_dir={run_dir}", "train.stepz=3"]) == 2
    assert "error: unknown config key train.stepz" in capsys.readouterr().err
    assert not run_dir.exists()


def test_the_export_section_sets_the_sampling_and_guidance_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 1}\n")
    overrides = [
        "export.sampling_sigma_max=2000",
        "export.default_steps={dpmpp_2m_sde: 10}",
        "export.default_sampler=dpmpp_2m_sde",
        "export.sde_sigma_min=2",
        "export.default_class_guidance={1: 1, 2: 2.5}",
        "export.default_guidance_interval=[0, 150]",
        "export.sampling_density_range=[0.3, 1500]",
    ]
    normalization = {"mean": [0.0], "std": [1.0]}
    exported = build_model_config(load_config(path, overrides), normalization)
    assert exported.sampling_sigma_max == 2000.0 and exported.default_steps == {"dpmpp_2m_sde": 10}
    assert exported.default_sampler == "dpmpp_2m_sde" and exported.sde_sigma_min == 2.0
    assert exported.default_class_guidance == {1: 1.0, 2: 2.5} and exported.default_guidance_interval == (0.0, 150.0)
    assert exported.sampling_density_range == (0.3, 1500.0)
    plain = build_model_config(load_config(path), normalization, measured_density_range=(0.44, 1500.0))
    assert plain.sampling_sigma_max is None and plain.default_steps == {}
    assert plain.default_sampler is None and plain.sde_sigma_min is None
    assert plain.default_class_guidance == {} and plain.default_guidance_interval is None
    assert plain.sampling_density_range == (0.44, 1500.0)  # "auto" by default: the measured range
    log_snr = build_model_config(load_config(path, ["export.sampling_density_range=null"]), normalization)
    assert log_snr.sampling_density_range is None
    with pytest.raises(ValueError, match="'auto' but no measured range"):
        build_model_config(load_config(path), normalization)
    with pytest.raises(ValueError, match="sampling_density_range: must be two finite numbers"):
        build_model_config(load_config(path, ["export.sampling_density_range=[1500, 0.3]"]), normalization)
    with pytest.raises(ValueError, match="default_steps: unknown sampler"):
        build_model_config(
            load_config(path, ["export.default_steps={dpm: 10}"]), normalization, measured_density_range=(0.44, 1500.0)
        )
    with pytest.raises(ValueError, match="default_class_guidance: 4 is not a particle class"):
        build_model_config(
            load_config(path, ["export.default_class_guidance={4: 2}"]),
            normalization,
            measured_density_range=(0.44, 1500.0),
        )


def test_the_gpu_config_trains_a_network_whose_fp16_file_fits_the_package(tmp_path: Path) -> None:
    # Its real network and loss for two steps of a small image, so that the config cannot rot while no GPU is at
    # hand; the file limit of the bundled model is 20 MB (docs/model-card.md).
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "data.simulator={image_size: [32, 32], particles_per_image: [1, 3]}",
        "data.crop_size=[32, 32]",
        "data.simulator_train_items=8",
        "data.simulator_val_items=2",
        "data.normalization_images=4",
        "data.num_workers=0",
        "train.batch_size=2",
        "train.steps=2",
        "log.val_every=2",
        "log.val_timesteps=2",
        "checkpoint.every=0",
    ]
    assert train.main(["--config", str(CONFIGS_DIR / "default_model_gpu.yaml"), *overrides]) == 0
    exported = tmp_path / "run" / "model.safetensors"
    assert 10e6 < exported.stat().st_size < 20e6
    model = load_checkpoint(exported)
    assert model.config.unet.channel_mults == (1, 2, 4, 4) and model.config.training["steps"] == 2
    assert model.config.unet.contrast_channel and model.config.particle_contrast is not None
