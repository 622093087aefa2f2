"""evaluate_model, metric curves and ``iscat-diffusion evaluate`` with a tiny untrained model."""

import json
import sys

import numpy as np
import pytest
import torch
from tests.tiny_models import save_tiny_checkpoint, tiny_unet_config

from napari_iscat_diffusion.cli import main
from napari_iscat_diffusion.diffusion import SAMPLERS, get_sampler, load_checkpoint, save_checkpoint
from napari_iscat_diffusion.evaluation import (
    CALIBRATION_SEED,
    calibrate_class_guidance,
    evaluate_model,
    metric_curves,
    write_curves,
)
from napari_iscat_diffusion.evaluation.evaluate import simulation_parameters_for

SIMULATOR = {"image_size": [32, 32], "particles_per_image": [1, 3]}


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_tiny_checkpoint(
        path, num_classes=3, training={"config": {"data": {"source": "simulator", "simulator": SIMULATOR}}}
    )
    return path


def test_simulation_parameters_come_from_the_training_summary(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    params = simulation_parameters_for(model, 48)
    assert params.image_size == (48, 48) and params.particles_per_image == (1, 3)
    model.config.training = {}
    assert simulation_parameters_for(model).particles_per_image == (5, 30)  # simulator defaults
    model.config.unet = tiny_unet_config(num_classes=2)
    with pytest.raises(ValueError, match="2 mask classes"):
        simulation_parameters_for(model)


def test_evaluate_model_returns_every_metric_as_json(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    stages = set()
    result = evaluate_model(
        model,
        n=4,
        size=32,
        steps=2,
        device="cpu",
        diversity_masks=2,
        diversity_seeds=2,
        edited_masks=2,
        progress=lambda stage, done, total: stages.add(stage),
    )
    assert stages == {"generate", "diversity", "edits"}
    json.dumps(result, allow_nan=False)
    assert result["settings"]["n"] == 4 and result["settings"]["image_size"] == [32, 32]
    assert result["settings"]["steps"] == 2 and result["settings"]["sigma_grid"] == "logsnr"
    assert result["settings"]["class_guidance"] == "" and result["settings"]["guidance_interval"] == "all"
    assert set(result) >= {
        "fidelity",
        "reference_fidelity",
        "physics",
        "reference_floor",
        "c2st",
        "diversity",
        "edited_masks",
    }
    assert result["c2st"]["num_test"] == 4
    # An untrained network is far from the simulator's noise level; a second simulator set is close to it.
    assert not 0.5 < result["physics"]["background_noise"]["ratio"] < 2
    floor = result["reference_floor"]
    assert 0.5 < floor["background_noise"]["ratio"] < 2
    assert floor["spectrum_distance_decades"] < result["physics"]["power_spectrum"]["distance_decades"]
    largest = result["physics"]["power_spectrum"]["largest_ratio"]
    assert largest["frequency_cycles_per_px"] in result["physics"]["power_spectrum"]["frequency_cycles_per_px"]
    assert abs(np.log(largest["ratio"])) > abs(np.log(floor["spectrum_largest_ratio"]["ratio"]))
    assert set(floor["peak_contrast"]) <= {"1", "2", "3"} and floor["seeds"].startswith("4000000000..")
    assert floor["c2st"]["num_test"] == 4 and 0 <= floor["c2st"]["accuracy"] <= 1
    assert result["diversity"]["relative"] > 0


def test_evaluate_model_records_the_default_steps_and_where_the_grid_starts(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    options = {"n": 4, "size": 32, "device": "cpu", "diversity_masks": 0, "edited_masks": 0, "c2st": False}
    result = evaluate_model(model, sampler="euler", floor=False, **options)
    assert result["settings"]["steps"] == SAMPLERS["euler"].default_steps == 40
    assert result["settings"]["sigma_grid"] == SAMPLERS["euler"].grid
    assert result["settings"]["sigma_start"] == pytest.approx(model.schedule.sigma_max)
    assert "reference_floor" not in result
    model.config.default_steps = {"euler": 3}
    model.config.sampling_sigma_max = 50.0
    result = evaluate_model(model, sampler="euler", floor=False, **options)
    assert result["settings"]["steps"] == 3 and result["settings"]["sigma_start"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="classifier_seeds must be at least 1"):
        evaluate_model(model, classifier_seeds=0, **options)


def test_metric_curves_and_their_files(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    curves = metric_curves(
        model,
        samplers=["euler", "ddim"],
        steps=[1, 2],
        guidances=[0.0, 2.0],
        guidance_steps=2,
        n=4,
        size=32,
        device="cpu",
        c2st=False,
    )
    assert [p["steps"] for p in curves["steps"]["euler"]] == [1, 2]
    assert [p["guidance"] for p in curves["guidance"]["points"]] == [0.0, 2.0]
    assert 0.5 < curves["reference_floor"]["background_noise"]["ratio"] < 2
    written = write_curves(curves, tmp_path / "curves")
    assert "A second simulator set against the reference" in (tmp_path / "curves" / "curves.md").read_text()
    names = {p.name for p in written}
    assert names == {"curves.json", "curves.md", "steps.png", "guidance.png"}
    assert all(p.exists() for p in written)
    assert json.loads((tmp_path / "curves" / "curves.json").read_text())["steps"]["ddim"][1]["steps"] == 2


def test_the_guidance_curve_runs_the_models_default_sampler_and_steps(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    model.config.default_sampler = "euler"
    model.config.default_steps = {"euler": 2}
    curves = metric_curves(
        model, samplers=["euler"], steps=[1], guidances=[1.0], n=4, size=32, device="cpu", c2st=False
    )
    assert (curves["guidance"]["sampler"], curves["guidance"]["steps"]) == ("euler", 2)


def test_evaluate_command_writes_the_report(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--n", "4", "--size", "32", "--steps", "2"]
    assert main([*args, "--device", "cpu", "--classifier-seeds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "machine" in report and "commit" in report and report["checkpoint"]["sha256"]
    assert report["metrics"]["settings"]["steps"] == 2
    assert report["metrics"]["settings"]["classifier_seeds"] == 2
    printed = capsys.readouterr().out
    assert "class 1: F1" in printed and "(two simulator sets: " in printed
    contrast = report["metrics"]["physics"]["peak_contrast"]["1"]
    median = contrast["median"] / contrast["reference_median"]
    assert f"median {median:.3f} and range {contrast['range_ratio']:.3f} of the simulator's" in printed
    c2st_line = next(line for line in printed.splitlines() if line.startswith("C2ST accuracy"))
    assert "(two simulator sets: " in c2st_line
    spread = report["metrics"]["c2st"]["over_seeds"]
    assert spread["seeds"] == [0, 1] and report["metrics"]["reference_floor"]["c2st"]["over_seeds"]["seeds"] == [0, 1]
    assert f"C2ST over 2 classifier seeds: {spread['min']:.3f}-{spread['max']:.3f}" in printed
    spectrum_line = next(line for line in printed.splitlines() if line.startswith("power spectrum / simulator"))
    largest = report["metrics"]["physics"]["power_spectrum"]["largest_ratio"]
    assert f"{largest['frequency_cycles_per_px']:.3f} cycles/px, {largest['ratio']:.3f}" in spectrum_line
    assert main([*args, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--n", "2", "--out", str(tmp_path / "other.json")]) == 2
    assert main([*args, "--classifier-seeds", "0", "--out", str(tmp_path / "other.json")]) == 2
    assert "--classifier-seeds must be at least 1" in capsys.readouterr().err


def test_evaluate_curves_say_at_once_when_matplotlib_is_missing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec returns None
    args = ["evaluate", "--checkpoint", str(tmp_path / "not loaded.safetensors"), "--curves"]
    assert main([*args, "--out", str(tmp_path / "results.json")]) == 2
    assert "pip install 'napari-iscat-diffusion[plots]'" in capsys.readouterr().err.splitlines()[-1]


def test_calibration_measures_each_class_at_each_scale_and_picks_the_closest(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the zero-initialised output, so that guidance changes the images
        for parameter in model.net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    stages = set()
    result = calibrate_class_guidance(
        model,
        scales=[0.0, 1.0, 2.0],
        n=4,
        size=32,
        steps=None,
        device="cpu",
        progress=lambda stage, done, total: stages.add(stage),
    )
    json.dumps(result, allow_nan=False)
    assert stages == {"w=0", "w=1", "w=2"}
    assert result["settings"]["steps"] == get_sampler("dpmpp_2m").default_steps  # the report says what ran
    assert result["settings"]["reference_seeds"] == f"{CALIBRATION_SEED}..{CALIBRATION_SEED + 3}"
    measured = {label: d for label, d in result["contrast_w_rel"].items() if None not in d}
    assert measured and set(result["best"]) == set(measured)  # a class without particles gets no scale
    for label, distances in measured.items():
        assert len(distances) == 3 and len(result["median_ratio"][label]) == 3 == len(result["range_ratio"][label])
        assert len(set(distances)) == 3  # the scale changes the contrast
        assert result["best"][label] == [0.0, 1.0, 2.0][distances.index(min(distances))]
    assert set(result["reference_floor"]) == set(result["contrast_w_rel"])
    assert all(d is None or d >= 0 for d in result["reference_floor"].values())
    assert result["at_grid_edge"] == [label for label, scale in result["best"].items() if scale != 1.0]
    with pytest.raises(ValueError, match="scales"):
        calibrate_class_guidance(model, scales=[], n=4)


def test_calibrate_command_writes_the_report_and_a_calibrated_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out, saved = tmp_path / "calibration.json", tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--checkpoint", str(tiny_checkpoint), "--n", "4", "--size", "32", "--steps", "2"]
    assert main([*args, "--scales", "1", "2", "--device", "cpu", "--out", str(out), "--save", str(saved)]) == 0
    report = json.loads(out.read_text())
    assert "machine" in report and report["checkpoint"]["sha256"] == load_checkpoint(tiny_checkpoint).sha256
    calibrated = load_checkpoint(saved)
    assert calibrated.config.default_class_guidance == {int(k): v for k, v in report["best"].items()}
    printed = capsys.readouterr().out
    assert "best per-class guidance: " in printed
    assert report["settings"]["guidance_interval"] == "all" and calibrated.config.default_guidance_interval is None
    assert ("(two simulator sets: " in printed) == any(v is not None for v in report["reference_floor"].values())
    for label in report["best"]:  # with two scales every best scale lies on the grid's edge
        assert f"class {label}: the best scale is at the edge of --scales" in printed
    original = load_checkpoint(tiny_checkpoint)
    for name, tensor in original.net.state_dict().items():
        assert (calibrated.net.state_dict()[name] == tensor).all(), name
    assert main([*args, "--out", str(tmp_path / "other.json"), "--save", str(saved)]) == 2
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "other.json").exists()
    # Calibrated with a guidance interval, the checkpoint keeps the interval its scales were measured with.
    limited_out, limited = tmp_path / "limited.json", tmp_path / "limited.safetensors"
    extra = ["--scales", "1", "2", "--guidance-interval", "0.5,20", "--device", "cpu"]
    assert main([*args, *extra, "--out", str(limited_out), "--save", str(limited)]) == 0
    assert json.loads(limited_out.read_text())["settings"]["guidance_interval"] == "0.5,20"
    assert load_checkpoint(limited).config.default_guidance_interval == (0.5, 20.0)
    assert "guided at noise levels 0.5,20" in capsys.readouterr().out


def test_a_calibrated_copy_keeps_the_storage_dtype_of_the_checkpoint(tiny_checkpoint, tmp_path):
    original = load_checkpoint(tiny_checkpoint)
    assert original.storage_dtype == torch.float32
    half = tmp_path / "half.safetensors"
    save_checkpoint(half, original.net, original.config, dtype=torch.float16)
    assert load_checkpoint(half).storage_dtype == torch.float16
    saved = tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--checkpoint", str(half), "--n", "4", "--size", "32", "--steps", "2", "--scales", "1", "2"]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "c.json"), "--save", str(saved)]) == 0
    assert load_checkpoint(saved).storage_dtype == torch.float16
    assert abs(saved.stat().st_size - half.stat().st_size) < 1000  # metadata differs, the weights are as small


@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
def test_report_under_a_file_is_refused_before_the_work(tmp_path, capsys, monkeypatch, command):
    from napari_iscat_diffusion import cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("napari_iscat_diffusion.diffusion.checkpoint.load_checkpoint", no_model)
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" / "report.json"
    assert cli.main([command, "--n", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
