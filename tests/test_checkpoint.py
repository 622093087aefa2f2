"""Checkpoints: bit-exact round trips, atomic saves, and a clear CheckpointError for every kind of bad file."""

import hashlib
import json
import math
import os
import re

import pytest
import safetensors
import safetensors.torch
import torch
from tests.tiny_models import perturbed_net, tiny_unet_config

from napari_iscat_diffusion import __version__
from napari_iscat_diffusion.diffusion.checkpoint import (
    FORMAT_VERSION,
    METADATA_KEY,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    read_model_config,
    save_checkpoint,
)
from napari_iscat_diffusion.diffusion.model_config import ModelConfig
from napari_iscat_diffusion.diffusion.schedules import cosine_schedule
from napari_iscat_diffusion.diffusion.unet import ConditionalUNet, UNetConfig

TINY = tiny_unet_config()


def make_config(**overrides) -> ModelConfig:
    fields = {
        "unet": TINY,
        "schedule": cosine_schedule(100).to_config(),
        "parameterization": "v",
        "normalization": {"mean": [0.5], "std": [2.0]},
        "pixel_size_nm": 23.5,
        "training_size": (64, 48),
        "default_guidance": 2.0,
        "default_class_guidance": {2: 3.0},
        "class_names": ["spot", "ring"],
        "training": {"steps": 10, "loss": 0.125, "data": "synthetic"},
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def make_net(seed: int = 0) -> ConditionalUNet:
    return perturbed_net(TINY, seed)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.safetensors"
    net = make_net()
    save_checkpoint(path, net, make_config())
    return path, net


def rewrite(path, tensors=None, metadata=None):
    """Write a safetensors file at path with the tensors and metadata of ``saved`` unless replaced."""
    with safetensors.safe_open(path, "pt") as file:
        old_metadata = file.metadata()
    old_tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(
        old_tensors if tensors is None else tensors, path, metadata=old_metadata if metadata is None else metadata
    )


def rewrite_document(path, change):
    """Rewrite the JSON document in our metadata key with change(document)."""
    with safetensors.safe_open(path, "pt") as file:
        document = json.loads(file.metadata()[METADATA_KEY])
    change(document)
    rewrite(path, metadata={METADATA_KEY: json.dumps(document)})


def test_float32_round_trip_is_bit_exact(saved):
    path, net = saved
    loaded = load_checkpoint(path)
    expected = net.state_dict()
    state = loaded.net.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert loaded.config == make_config()
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert loaded.path == path.resolve()
    assert loaded.versions == {
        "format_version": FORMAT_VERSION,
        "package": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }
    assert not loaded.net.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in loaded.net.parameters())


def test_save_returns_the_file_hash(tmp_path):
    path = tmp_path / "model.safetensors"
    digest = save_checkpoint(path, make_net(), make_config())
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_float16_storage_loads_as_float32(tmp_path):
    net = make_net()
    path32, path16 = tmp_path / "fp32.safetensors", tmp_path / "fp16.safetensors"
    save_checkpoint(path32, net, make_config())
    save_checkpoint(path16, net, make_config(), dtype=torch.float16)
    assert path16.stat().st_size < 0.6 * path32.stat().st_size
    assert all(t.dtype == torch.float16 for t in safetensors.torch.load_file(path16).values())
    state = load_checkpoint(path16).net.state_dict()
    for name, tensor in net.state_dict().items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor.half().float()), name


def test_loaded_network_computes_what_the_saved_one_did(saved):
    path, net = saved
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, generator=generator)
    t = torch.tensor([3.0, 70.0])
    cond = torch.zeros(2, 3, 16, 16)
    cond[:, 0, 4:8, 4:8] = 1
    cond[:, 2] = 1
    # both without autograd: the U-Net picks its activation layout by grad mode (float rounding differs)
    with torch.no_grad():
        before = net(x, t, cond)
        after = load_checkpoint(path).net(x, t, cond)
    assert before.abs().max() > 1e-3
    assert torch.equal(after, before)


def test_schedule_denoiser_and_summary(saved):
    path, _ = saved
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.schedule.betas, cosine_schedule(100).betas)
    denoise = loaded.denoiser()
    assert denoise.parameterization == "v"
    x0 = denoise(torch.randn(1, 1, 16, 16), torch.tensor([2.0]), torch.ones(1, 3, 16, 16))
    assert x0.shape == (1, 1, 16, 16) and bool(torch.isfinite(x0).all())
    summary = loaded.summary()
    for part in ("2 classes (spot, ring)", "1 image channel", "64x48 px", "23.5 nm/px", loaded.sha256[:12]):
        assert part in summary
    assert loaded.sha256[:13] not in summary


def test_saving_over_a_file_replaces_it_without_leftovers(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, make_net(0), make_config())
    digest = save_checkpoint(path, make_net(1), make_config(default_guidance=3.0))
    assert list(tmp_path.iterdir()) == [path]
    assert load_checkpoint(path).sha256 == digest
    assert load_checkpoint(path).config.default_guidance == 3.0


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, make_net(0), make_config())
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("simulated failure in the middle of the write")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, make_net(1), make_config(default_guidance=3.0))
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert list(tmp_path.iterdir()) == [path]


def test_save_rejects_bad_arguments(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="dtype"):
        save_checkpoint(path, make_net(), make_config(), dtype=torch.int8)
    other = UNetConfig.from_dict({**TINY.to_dict(), "num_classes": 3})
    with pytest.raises(ValueError, match="differs from the network"):
        save_checkpoint(path, make_net(), make_config(unet=other, class_names=None))
    net = make_net()
    with torch.no_grad():
        next(net.parameters())[0] = 1e6  # beyond the float16 range
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_checkpoint(path, net, make_config(), dtype=torch.float16)
    assert not path.exists()


def write_pickle(path):
    torch.save({"weight": torch.ones(3)}, path)


def write_other_model(path):
    safetensors.torch.save_file({"encoder.weight": torch.ones(2, 2)}, path, metadata={"format": "pt"})


def write_no_metadata(path):
    safetensors.torch.save_file({"encoder.weight": torch.ones(2, 2)}, path)


BAD_FILES = {
    "empty": (lambda path: path.write_bytes(b""), "empty"),
    "tiny": (lambda path: path.write_bytes(b"abc"), "truncated, or not a safetensors"),
    "pickle": (write_pickle, "not a safetensors file"),
    "random": (lambda path: path.write_bytes(bytes(range(7, 256)) * 10), "not a safetensors file"),
    "text": (lambda path: path.write_text("image_channels: 1\nnum_classes: 2\n" * 20), "not a safetensors file"),
    "other model": (write_other_model, "without a napari-iscat-diffusion model config"),
    "no metadata": (write_no_metadata, "without a napari-iscat-diffusion model config"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_files_that_are_not_checkpoints(tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '_')}.safetensors"
    write, phrase = BAD_FILES[kind]
    write(path)
    with pytest.raises(CheckpointError, match=re.escape(phrase)) as info:
        load_checkpoint(path)
    assert path.name in str(info.value)


def test_pickle_file_is_named_as_such(tmp_path):
    path = tmp_path / "model.pt"
    write_pickle(path)
    with pytest.raises(CheckpointError, match="pickle file"):
        load_checkpoint(path)


def test_missing_file_and_folder(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(path)
    assert "absent.safetensors" in str(info.value)
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="folder") as info:
        load_checkpoint(folder)
    assert "models" in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.99, 20 / 1e9])
def test_truncated_file(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: max(9, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(path)
    assert path.name in str(info.value)


def test_trailing_garbage_is_corrupt(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors") as info:
        load_checkpoint(path)
    assert path.name in str(info.value)


def test_newer_format_names_the_package_version_needed(saved):
    path, _ = saved

    def newer(document):
        document["format_version"] = FORMAT_VERSION + 1
        document["versions"]["package"] = "7.3.0"
        document["config"]["new_field"] = 1

    rewrite_document(path, newer)
    with pytest.raises(CheckpointError, match="newer") as info:
        load_checkpoint(path)
    assert "7.3.0 or newer" in str(info.value) and path.name in str(info.value)


@pytest.mark.parametrize("version", [0, -1, "1", 1.5, True, None])
def test_unknown_format_version(saved, version):
    path, _ = saved
    rewrite_document(path, lambda document: document.update(format_version=version))
    with pytest.raises(CheckpointError, match="unknown checkpoint format version") as info:
        load_checkpoint(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize(
    ("metadata", "phrase"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "malformed"),
        (json.dumps({"format_version": 1, "config": {}}), "malformed"),
    ],
)
def test_malformed_metadata(saved, metadata, phrase):
    path, _ = saved
    rewrite(path, metadata={METADATA_KEY: metadata})
    with pytest.raises(CheckpointError, match=re.escape(phrase)) as info:
        load_checkpoint(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda config: config.update(parameterization="score"), "parameterization"),
        (lambda config: config["normalization"].update(std=[0.0]), "std must be > 0"),
        (lambda config: config["unet"].update(depth=3), "unet"),
        (lambda config: config.pop("schedule"), "missing key"),
    ],
)
def test_invalid_config_in_file(saved, change, phrase):
    path, _ = saved
    rewrite_document(path, lambda document: change(document["config"]))
    with pytest.raises(CheckpointError, match="model config is invalid") as info:
        load_checkpoint(path)
    assert phrase in str(info.value) and path.name in str(info.value)


def test_an_empty_high_noise_expert_field_of_earlier_versions_is_dropped(saved):
    path, _ = saved
    rewrite_document(path, lambda document: document["config"].update(high_noise_expert=None))
    assert load_checkpoint(path).config == make_config()


def test_a_file_that_holds_a_high_noise_expert_is_refused_in_one_line(saved):
    path, _ = saved
    expert = {"sigma_switch": 10.0, "normalization": {"mean": [0.5], "std": [2.0]}}
    rewrite_document(path, lambda document: document["config"].update(high_noise_expert=expert))
    with pytest.raises(CheckpointError, match="holds a high-noise expert network, which this version no longer uses"):
        read_model_config(path)
    with pytest.raises(CheckpointError, match=f"{re.escape(path.name)}.*expert") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_fit(saved):
    path, _ = saved
    tensors = safetensors.torch.load_file(path)
    names = sorted(tensors)
    removed, reshaped = names[0], names[1]
    del tensors[removed]
    tensors[reshaped] = torch.zeros(3, 5)
    tensors["extra.weight"] = torch.zeros(2)
    rewrite(path, tensors=tensors)
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert path.name in message
    for part in (f"1 missing: {removed}", "1 unexpected: extra.weight", reshaped, "(3, 5)"):
        assert part in message


def test_weights_of_another_architecture(saved):
    path, _ = saved
    bigger = UNetConfig.from_dict({**TINY.to_dict(), "base_channels": 16, "num_res_blocks": 2})
    rewrite_document(path, lambda document: document["config"].update(unet=bigger.to_dict()))
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load_checkpoint(path)
    assert "and " in str(info.value) and "more" in str(info.value)  # long lists are cut short


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights(saved, value):
    path, _ = saved
    tensors = safetensors.torch.load_file(path)
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = value
    rewrite(path, tensors=tensors)
    with pytest.raises(CheckpointError, match="NaN or Inf") as info:
        load_checkpoint(path)
    assert name in str(info.value) and path.name in str(info.value)


def test_config_round_trip():
    config = make_config(training={"curve": (1, 2), "nested": {"a": [0.5]}})
    assert config.training == {"curve": [1, 2], "nested": {"a": [0.5]}}
    data = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(data) == config
    assert config.num_classes == 2 and config.image_channels == 1
    minimal = ModelConfig.from_dict(
        {key: data[key] for key in ("unet", "schedule", "parameterization", "normalization")}
    )
    assert minimal.pixel_size_nm is None and minimal.training_size is None and minimal.default_guidance == 1.0
    assert minimal.default_class_guidance == {}
    # JSON keys are strings; the config holds int labels.
    assert data["default_class_guidance"] == {"2": 3.0} and config.default_class_guidance == {2: 3.0}
    assert minimal.default_guidance_interval is None and data["default_guidance_interval"] is None
    assert minimal.sampling_sigma_max is None and data["sampling_sigma_max"] is None
    assert minimal.default_steps == {} and data["default_steps"] == {}
    assert minimal.default_sampler is None and minimal.sde_sigma_min is None
    assert minimal.sampling_density_range is None and data["sampling_density_range"] is None


def test_the_sampling_sigma_max_round_trips_through_json():
    config = make_config(sampling_sigma_max=2000)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["sampling_sigma_max"] == 2000.0 and ModelConfig.from_dict(data).sampling_sigma_max == 2000.0


def test_the_default_sampler_and_sde_sigma_min_round_trip_through_json():
    config = make_config(default_sampler="dpmpp_2m_sde", sde_sigma_min=2)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["default_sampler"] == "dpmpp_2m_sde" and data["sde_sigma_min"] == 2.0
    assert ModelConfig.from_dict(data) == config


def test_the_sampling_density_range_round_trips_through_json():
    config = make_config(sampling_density_range=[0.3, 1500])
    data = json.loads(json.dumps(config.to_dict()))
    assert config.sampling_density_range == (0.3, 1500.0) and data["sampling_density_range"] == [0.3, 1500.0]
    assert ModelConfig.from_dict(data) == config


def test_the_default_steps_round_trip_through_json_in_sampler_order():
    config = make_config(default_steps={"heun": 8, "dpmpp_2m": 10})
    data = json.loads(json.dumps(config.to_dict()))
    assert list(data["default_steps"].items()) == [("dpmpp_2m", 10), ("heun", 8)]
    assert ModelConfig.from_dict(data).default_steps == {"dpmpp_2m": 10, "heun": 8}


@pytest.mark.parametrize(
    ("interval", "stored", "held"),
    [((2, 45), [2.0, 45.0], (2.0, 45.0)), ((2, math.inf), [2.0, None], (2.0, math.inf)), ((0, math.inf), None, None)],
)
def test_the_guidance_interval_round_trips_through_json(interval, stored, held):
    config = make_config(default_guidance_interval=interval)
    data = json.loads(json.dumps(config.to_dict(), allow_nan=False))  # an infinite end is stored as null
    assert data["default_guidance_interval"] == stored
    assert config.default_guidance_interval == held == ModelConfig.from_dict(data).default_guidance_interval


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"unet": TINY.to_dict()}, "unet"),
        ({"parameterization": "score"}, "parameterization"),
        ({"schedule": {"name": "quadratic"}}, "schedule"),
        ({"schedule": {"name": "linear", "warmup": 3}}, "schedule"),
        ({"schedule": {"name": "linear", "num_timesteps": 10**9}}, "num_timesteps"),
        ({"normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}}, "normalization"),
        ({"normalization": {"mean": [0.0], "std": [0.0]}}, "std must be > 0"),
        ({"normalization": {"mean": [0.0], "std": [-1.0]}}, "std must be > 0"),
        ({"normalization": {"mean": [math.nan], "std": [1.0]}}, "finite"),
        ({"normalization": {"mean": [0.0]}}, "normalization"),
        ({"normalization": {"mean": [0.0], "std": [1e308]}}, "std must hold finite numbers of magnitude at most"),
        ({"normalization": {"mean": [-1e308], "std": [1.0]}}, "mean must hold finite numbers of magnitude at most"),
        ({"normalization": {"mean": [0.0], "std": [1e-300]}}, "every std must be at least"),
        ({"pixel_size_nm": 0}, "pixel_size_nm"),
        ({"pixel_size_nm": math.inf}, "pixel_size_nm"),
        ({"pixel_size_nm": 1e-9}, "pixel_size_nm: must be a positive number from"),
        ({"training_size": (64,)}, "training_size"),
        ({"training_size": (0, 64)}, "training_size"),
        ({"training_size": (64.5, 64)}, "training_size"),
        ({"training_size": (10**9, 64)}, "training_size: must be two integers (H, W) from 1 to"),
        ({"default_guidance": -1.0}, "default_guidance"),
        ({"default_guidance": math.nan}, "default_guidance"),
        ({"default_guidance": 1e308}, "default_guidance: must be a finite number >= 0 and at most 100"),
        ({"default_class_guidance": {1: 1e308}}, "the scale of class 1 must be a finite number >= 0 and at most 100"),
        ({"default_class_guidance": {3: 1.0}}, "default_class_guidance: 3 is not a particle class"),
        ({"default_class_guidance": {1: -2.0}}, "default_class_guidance: the scale of class 1"),
        ({"default_guidance_interval": (45, 2)}, "default_guidance_interval: expected 0 <= low < high"),
        ({"default_guidance_interval": "2,45"}, "default_guidance_interval: expected two noise levels"),
        ({"sampling_sigma_max": 0.0}, "sampling_sigma_max: must be a finite noise level above"),
        ({"sampling_sigma_max": math.inf}, "sampling_sigma_max"),
        ({"sampling_sigma_max": "2000"}, "sampling_sigma_max"),
        ({"sampling_density_range": (1500.0, 0.3)}, "sampling_density_range: must be two finite numbers 0 < low"),
        ({"sampling_density_range": (0.0, 10.0)}, "sampling_density_range"),
        ({"sampling_density_range": (0.3, math.inf)}, "sampling_density_range"),
        ({"sampling_density_range": 0.3}, "sampling_density_range"),
        ({"sampling_density_range": (1e-300, 1e-299)}, "sampling_density_range: must be two finite numbers 0 < low"),
        ({"sampling_density_range": (1.0, 1e300)}, "sampling_density_range: must be two finite numbers 0 < low"),
        ({"sampling_density_range": ("0.3", "1500")}, "sampling_density_range"),
        ({"default_steps": {"plms": 10}}, "default_steps: unknown sampler(s) ['plms']"),
        ({"default_steps": {"dpmpp_2m": 0}}, "default_steps: dpmpp_2m: steps must be a whole number from 1 to"),
        ({"default_steps": {"dpmpp_2m": 10**9}}, "default_steps: dpmpp_2m: steps must be a whole number from 1 to"),
        ({"default_steps": {"ddim": 101}}, "from 1 to 100 (the model's training timesteps)"),
        ({"default_steps": {"dpmpp_2m": 10.0}}, "default_steps: dpmpp_2m"),
        ({"default_steps": {"dpmpp_2m": True}}, "default_steps: dpmpp_2m"),
        ({"default_steps": [10]}, "default_steps: must be a dict"),
        ({"default_sampler": "plms"}, "default_sampler: unknown sampler 'plms'"),
        ({"sde_sigma_min": -1.0}, "sde_sigma_min: must be a finite noise level >= 0"),
        ({"sde_sigma_min": math.nan}, "sde_sigma_min"),
        ({"class_names": ["spot"]}, "class_names"),
        ({"class_names": ["spot", ""]}, "class_names"),
        ({"training": {"loss": math.nan}}, "training"),
        ({"training": {"data": object()}}, "training"),
        ({"training": [1, 2]}, "training"),
    ],
)
def test_config_validation(overrides, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        make_config(**overrides)


def test_from_dict_rejects_unknown_and_missing_keys():
    data = make_config().to_dict()
    with pytest.raises(ValueError, match=r"unknown key.*'seed'"):
        ModelConfig.from_dict({**data, "seed": 1})
    with pytest.raises(ValueError, match=r"missing key.*'normalization'"):
        ModelConfig.from_dict({key: value for key, value in data.items() if key != "normalization"})
    with pytest.raises(ValueError, match="unet"):
        ModelConfig.from_dict({**data, "unet": {**data["unet"], "depth": 3}})
    with pytest.raises(ValueError, match="must be a dict"):
        ModelConfig.from_dict([])


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    """A safetensors header length whose low byte is 0x80 is not a pickle marker."""
    config = make_config()
    net = ConditionalUNet(config.unet)
    path = tmp_path / "model.safetensors"
    for padding in range(256):
        config.training = {"padding": "x" * padding}
        save_checkpoint(path, net, config)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80, "no padding gave a header length with low byte 0x80"
    assert load_checkpoint(path).config.training == config.training
