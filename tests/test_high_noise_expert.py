"""A second network for the high noise levels: unit conversion, the switch, checkpoints, generate and combining."""

import dataclasses

import numpy as np
import pytest
import safetensors.torch
import torch
from tests.tiny_models import perturbed_net, tiny_unet_config
from training.experts import combine_experts
from training.experts import main as experts_main

from napari_iscat_diffusion.diffusion import ConditionalUNet, ModelConfig, generate, load_checkpoint, save_checkpoint
from napari_iscat_diffusion.diffusion import samplers as samplers_module
from napari_iscat_diffusion.diffusion.checkpoint import EXPERT_PREFIX, CheckpointError
from napari_iscat_diffusion.diffusion.denoiser import (
    DiscreteTimeDenoiser,
    NoiseLevelSwitch,
    in_other_units,
    std_ratio,
)
from napari_iscat_diffusion.diffusion.schedules import cosine_schedule

TINY = tiny_unet_config()
MAIN_NORM = {"mean": [0.5], "std": [2.0]}
EXPERT_NORM = {"mean": [0.3], "std": [2.5]}


def _config(**overrides) -> ModelConfig:
    fields = {
        "unet": TINY,
        "schedule": cosine_schedule(1000).to_config(),
        "parameterization": "v",
        "normalization": MAIN_NORM,
        "sampling_sigma_max": 200.0,
    }
    return ModelConfig(**{**fields, **overrides})


def _net(seed: int) -> ConditionalUNet:
    return perturbed_net(TINY, seed)


def _expert_config(sigma_switch: float = 8.0, normalization: dict | None = None) -> ModelConfig:
    expert = {"sigma_switch": sigma_switch, "normalization": normalization or EXPERT_NORM, "training": {"steps": 3}}
    return _config(high_noise_expert=expert)


def _cond(n: int = 2, size: int = 16) -> torch.Tensor:
    cond = torch.zeros(n, 3, size, size)
    cond[:, 0, 4:8, 4:8] = 1
    cond[:, 2] = 1
    return cond


def test_a_denoiser_in_other_units_predicts_the_same_physical_image():
    def physical(p_noisy: torch.Tensor, sigma_phys: torch.Tensor) -> torch.Tensor:
        return 0.3 * p_noisy + 2.0 + sigma_phys.view(-1, 1, 1, 1)

    def in_units(norm):
        mean, std = norm["mean"][0], norm["std"][0]
        return lambda x, sigma, cond: (physical(x * std + mean, sigma * std) - mean) / std

    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([3.0, 40.0])
    converted = in_other_units(in_units(EXPERT_NORM), EXPERT_NORM, MAIN_NORM)
    assert torch.allclose(converted(x, sigma, None), in_units(MAIN_NORM)(x, sigma, None), atol=1e-5)
    same = in_units(MAIN_NORM)
    assert in_other_units(same, MAIN_NORM, MAIN_NORM) is same
    with pytest.raises(ValueError, match="scale the channels differently"):
        std_ratio({"mean": [0, 0], "std": [1, 1]}, {"mean": [0, 0], "std": [1, 2]})


def test_the_switch_asks_the_expert_above_its_noise_level_only():
    switch = NoiseLevelSwitch(lambda x, s, c: torch.zeros_like(x), lambda x, s, c: torch.ones_like(x), 8.0)
    x = torch.randn(3, 1, 2, 2)
    assert switch(x, torch.full((3,), 8.0), None).eq(0).all()
    assert switch(x, torch.full((3,), 8.5), None).eq(1).all()
    mixed = switch(x, torch.tensor([1.0, 9.0, 100.0]), None)
    assert mixed.flatten(1).mean(1).tolist() == [0.0, 1.0, 1.0]


def test_a_switch_with_a_zone_blends_the_expert_in_by_its_weight_and_skips_it_for_an_empty_zone():
    calls = []

    def low(x, sigma):
        calls.append("low")
        return torch.zeros_like(x)

    def high(x, sigma):
        calls.append("high")
        return torch.full_like(x, 4.0)

    weight = torch.tensor([[[[0.0, 0.25], [0.5, 1.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    switch = NoiseLevelSwitch(low, high, 8.0, weight)
    x = torch.randn(2, 1, 2, 2)
    assert torch.equal(switch(x, torch.full((2,), 30.0)), 4.0 * weight)
    assert switch(x, torch.full((2,), 8.0)).eq(0).all()
    assert torch.equal(switch(x, torch.tensor([30.0, 2.0])), torch.stack([4.0 * weight[0], torch.zeros(1, 2, 2)]))
    calls.clear()
    empty = NoiseLevelSwitch(low, high, 8.0, torch.zeros(2, 1, 2, 2))
    assert empty(x, torch.full((2,), 30.0)).eq(0).all()
    assert calls == ["low"]


def test_a_checkpoint_with_an_expert_round_trips_and_denoises_with_it_above_the_switch(tmp_path):
    path = tmp_path / "two.safetensors"
    main, expert = _net(0), _net(1)
    config = _expert_config()
    save_checkpoint(path, main, config, expert_net=expert, dtype=torch.float16)
    save_checkpoint(path.with_name("one.safetensors"), main, _config())
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert "high_noise_expert" not in _config().to_dict()  # one-network files stay readable by older versions
    for network, original in ((loaded.net, main), (loaded.expert_net, expert)):
        for name, tensor in original.state_dict().items():
            assert torch.equal(network.state_dict()[name], tensor.half().float()), name
    assert "a second network above sigma 8" in loaded.summary()
    x, cond, sigma = torch.randn(2, 1, 16, 16), _cond(), torch.full((2,), 50.0)
    schedule = loaded.schedule
    with torch.no_grad():
        main_prediction = DiscreteTimeDenoiser(loaded.net, schedule, "v")(x, sigma, cond)
        expert_prediction = in_other_units(
            DiscreteTimeDenoiser(loaded.expert_net, schedule, "v"), EXPERT_NORM, MAIN_NORM
        )(x, sigma, cond)
        assert torch.equal(loaded.denoiser()(x, sigma, cond), main_prediction)
        assert torch.equal(loaded.expert_denoiser()(x, sigma, cond), expert_prediction)
        assert not torch.allclose(main_prediction, expert_prediction)
    assert load_checkpoint(path.with_name("one.safetensors")).expert_denoiser() is None


def test_missing_or_unexpected_expert_weights_and_bad_expert_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expert_net must be given exactly when"):
        save_checkpoint(tmp_path / "a.safetensors", _net(0), _expert_config())
    with pytest.raises(ValueError, match="expert_net must be given exactly when"):
        save_checkpoint(tmp_path / "a.safetensors", _net(0), _config(), expert_net=_net(1))

    path = tmp_path / "two.safetensors"
    save_checkpoint(path, _net(0), _expert_config(), expert_net=_net(1))
    with safetensors.safe_open(path, "pt") as file:
        metadata = file.metadata()
    tensors = safetensors.torch.load_file(path)
    main_only = {name: t for name, t in tensors.items() if not name.startswith(EXPERT_PREFIX)}
    safetensors.torch.save_file(main_only, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing: high_noise_expert\."):
        load_checkpoint(path)

    single = tmp_path / "one.safetensors"
    save_checkpoint(single, _net(0), _config())
    with safetensors.safe_open(single, "pt") as file:
        metadata = file.metadata()
    safetensors.torch.save_file(tensors, single, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"unexpected: high_noise_expert\."):
        load_checkpoint(single)

    with pytest.raises(ValueError, match="high_noise_expert: sigma_switch must be a finite noise level"):
        _expert_config(sigma_switch=float("nan"))
    with pytest.raises(ValueError, match="high_noise_expert: normalization: every std must be > 0"):
        _expert_config(normalization={"mean": [0.0], "std": [0.0]})
    with pytest.raises(ValueError, match="high_noise_expert: must be a dict with sigma_switch"):
        _config(high_noise_expert={"sigma_switch": 8.0})
    for classes in ([], [3], [1, 1], "1", [1.0]):
        with pytest.raises(ValueError, match=r"high_noise_expert: classes must be a non-empty list .* labels 1\.\.2"):
            _zone_config(classes)
    with pytest.raises(ValueError, match="high_noise_expert: reach_px must be a distance > 0"):
        _zone_config([2], reach_px=0)
    with pytest.raises(ValueError, match="high_noise_expert: reach_px must be a distance > 0"):
        _config(high_noise_expert={**_expert_config().high_noise_expert, "reach_px": 6})


def _zone_config(classes, **extra) -> ModelConfig:
    return _config(high_noise_expert={**_expert_config().high_noise_expert, "classes": classes, **extra})


def test_an_expert_for_some_classes_round_trips_and_says_so(tmp_path):
    path = tmp_path / "zone.safetensors"
    config = _zone_config([2, 1], reach_px=6)
    assert config.high_noise_expert["classes"] == [1, 2] and config.high_noise_expert["reach_px"] == 6.0
    save_checkpoint(path, _net(0), config, expert_net=_net(1))
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert "a second network above sigma 8 around classes 1, 2" in loaded.summary()


def test_generate_hands_over_at_the_switch(tmp_path, monkeypatch):
    main = _net(0)
    same, other = tmp_path / "same.safetensors", tmp_path / "other.safetensors"
    alone = tmp_path / "alone.safetensors"
    save_checkpoint(alone, main, _config())
    save_checkpoint(same, main, _expert_config(normalization=MAIN_NORM), expert_net=main)
    save_checkpoint(other, main, _expert_config(), expert_net=_net(1))
    mask = np.zeros((16, 16), np.int64)
    mask[4:8, 4:8] = 1
    run = {"sampler": "euler", "steps": 4, "seed": 3, "device": "cpu"}
    reference = generate(mask, load_checkpoint(alone), **run)
    assert np.array_equal(generate(mask, load_checkpoint(same), **run), reference)
    assert not np.allclose(generate(mask, load_checkpoint(other), **run), reference)

    # An expert for class 2 only: a mask without class 2 never asks it; with class 2 the image changes, most inside
    # the zone around the class-2 particle.
    zone = tmp_path / "zone.safetensors"
    save_checkpoint(zone, main, _zone_config([2], reach_px=2), expert_net=_net(1))
    assert np.array_equal(generate(mask, load_checkpoint(zone), **run), reference)
    with_class_2 = mask.copy()
    with_class_2[10:12, 10:12] = 2
    change = np.abs(
        generate(with_class_2, load_checkpoint(zone), **run) - generate(with_class_2, load_checkpoint(alone), **run)
    )
    assert change[9:13, 9:13].mean() > 2 * change[:4, :].mean() > 0
    tiled = {**run, "tile_size": 8, "tile_overlap": 2}  # each network is tiled, the zone is the whole image's
    assert np.array_equal(
        generate(mask, load_checkpoint(zone), **tiled), generate(mask, load_checkpoint(alone), **tiled)
    )
    assert not np.allclose(
        generate(with_class_2, load_checkpoint(zone), **tiled), generate(with_class_2, load_checkpoint(alone), **tiled)
    )

    seen = []
    info = samplers_module.SAMPLERS["dpmpp_2m"]

    def recording(*args, **kwargs):
        seen.append(kwargs.get("breaks"))
        return info.function(*args, **kwargs)

    monkeypatch.setitem(samplers_module.SAMPLERS, "dpmpp_2m", dataclasses.replace(info, function=recording))
    generate(mask, load_checkpoint(other), sampler="dpmpp_2m", steps=3, device="cpu")
    generate(mask, load_checkpoint(other), sampler="dpmpp_2m", steps=3, guidance=2.0, guidance_interval=(2.0, 45.0))
    assert seen == [[8.0], [2.0, 8.0, 45.0]]


def _run_file(path, sigma_range=None, **config_overrides) -> None:
    training = {} if sigma_range is None else {"config": {"train": {"sigma_range": sigma_range}}}
    save_checkpoint(path, _net(len(str(path))), _config(training=training, **config_overrides))


def test_combining_two_runs_gives_one_file_and_checks_what_the_expert_was_trained_on(tmp_path, capsys):
    main, expert, out = tmp_path / "main.safetensors", tmp_path / "expert.safetensors", tmp_path / "out.safetensors"
    _run_file(main)
    _run_file(expert, sigma_range=[8, 30000], normalization=EXPERT_NORM)
    digest = combine_experts(main, expert, 12.0, out)
    combined = load_checkpoint(out)
    assert combined.sha256 == digest
    assert combined.config.high_noise_expert["sigma_switch"] == 12.0
    assert combined.config.high_noise_expert["normalization"] == EXPERT_NORM
    assert combined.config.high_noise_expert["training"]["sha256"] == load_checkpoint(expert).sha256
    for name, tensor in load_checkpoint(expert).net.state_dict().items():
        assert torch.equal(combined.expert_net.state_dict()[name], tensor), name

    # Trained from sigma 8 in its units (std 2.5), 10 in the main model's (std 2): at 9 it would be untrained.
    with pytest.raises(ValueError, match=r"was trained on sigma 10\.1.* but would denoise from sigma 9"):
        combine_experts(main, expert, 9.0, tmp_path / "low.safetensors")
    narrow = tmp_path / "narrow.safetensors"
    _run_file(narrow, sigma_range=[8, 100], normalization=EXPERT_NORM)
    with pytest.raises(ValueError, match="up to 200"):
        combine_experts(main, narrow, 12.0, tmp_path / "narrow_out.safetensors")
    with pytest.raises(ValueError, match="already holds a high-noise expert"):
        combine_experts(out, expert, 12.0, tmp_path / "again.safetensors")
    wider = tmp_path / "wider.safetensors"
    save_checkpoint(
        wider, ConditionalUNet(tiny_unet_config(base_channels=16)), _config(unet=tiny_unet_config(base_channels=16))
    )
    with pytest.raises(ValueError, match="differ in unet"):
        combine_experts(main, wider, 12.0, tmp_path / "wider_out.safetensors")

    assert (
        experts_main(
            [
                "--main",
                str(main),
                "--expert",
                str(expert),
                "--sigma-switch",
                "5",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
    assert "error: the expert" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert experts_main(["--main", str(main), "--expert", str(expert), "--sigma-switch", "15", "--out", str(out)]) == 0
    assert "a second network above sigma 15" in capsys.readouterr().out
    both = ["--main", str(main), "--expert", str(expert), "--sigma-switch", "15"]
    zone = tmp_path / "zone.safetensors"
    assert experts_main([*both, "--classes", "2", "--reach-px", "6", "--out", str(zone)]) == 0
    assert "above sigma 15 around class 2" in capsys.readouterr().out
    assert load_checkpoint(zone).config.high_noise_expert["reach_px"] == 6.0
    assert experts_main([*both, "--classes", "5", "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "classes must be a non-empty list" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()
