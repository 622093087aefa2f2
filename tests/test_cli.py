"""The iscat-diffusion command line: simulate, dataset check, info, generate."""

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from tests.tiny_models import perturbed_net, save_tiny_checkpoint

from napari_iscat_diffusion import __version__
from napari_iscat_diffusion.cli import main
from napari_iscat_diffusion.cli.arguments import progress_bar
from napari_iscat_diffusion.diffusion import load_checkpoint, save_checkpoint
from napari_iscat_diffusion.io.tiff_pairs import read_pixel_size_nm


def test_simulate_writes_pairs_and_the_particle_table(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--n", "2", "--out", str(out), "--size", "48", "64", "--seed", "5"]) == 0
    images = sorted((out / "images").glob("*.tif"))
    masks = sorted((out / "masks").glob("*.tif"))
    assert [p.name for p in images] == ["sim_00000.tif", "sim_00001.tif"] == [p.name for p in masks]
    image, mask = tifffile.imread(images[1]), tifffile.imread(masks[1])
    assert image.shape == mask.shape == (48, 64)
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert read_pixel_size_nm(images[0]) == pytest.approx(60.0)
    with open(out / "particles.csv") as file:
        rows = list(csv.DictReader(file))
    assert {row["image"] for row in rows} <= {"sim_00000", "sim_00001"}
    for row in rows:  # every particle inside the image sits on a blob of its own label
        y, x = round(float(row["y_px"])), round(float(row["x_px"]))
        if 0 <= y < 48 and 0 <= x < 64 and row["image"] == "sim_00001":
            assert mask[y, x] == int(row["label"])
    assert "wrote 2 image/mask pairs" in capsys.readouterr().out


def test_progress_bars_start_anew_for_each_stage_and_end_their_line(capsys):
    with progress_bar("step") as show:
        show("generate", 1, 4, "step 1/2")
        show("generate", 4, 4, "step 2/2")
        show("edits", 1, 2)
        show("edits", 2, 2)
        show("edits", 1, 2)  # the count starts over: a third bar
    err = capsys.readouterr().err
    assert err.endswith("\n")
    shown = [line.split("\r")[-1] for line in err[:-1].split("\n")]  # each line's last update
    assert len(shown) == 3
    assert shown[0].startswith("generate: 100%") and "4/4" in shown[0] and "step 2/2" in shown[0]
    assert shown[1].startswith("edits: 100%") and "2/2" in shown[1]
    assert shown[2].startswith("edits:  50%") and "1/2" in shown[2]
    with progress_bar("pair", disable=True) as show:
        show("export", 1, 2)
    assert capsys.readouterr().err == ""


def test_simulate_never_overwrites(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--n", "1", "--out", str(out), "--size", "32", "32"]) == 0
    before = (out / "images" / "sim_00000.tif").read_bytes()
    assert main(["simulate", "--n", "1", "--out", str(out), "--size", "32", "32", "--seed", "9"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "images" / "sim_00000.tif").read_bytes() == before


def test_dataset_check_exit_status(tmp_path, capsys):
    out = tmp_path / "sim"
    main(["simulate", "--n", "2", "--out", str(out), "--size", "32", "32", "--particles", "3", "3", "--seed", "1"])
    capsys.readouterr()
    assert main(["dataset", "check", str(out), "--classes", "3"]) == 0
    assert "OK" in capsys.readouterr().out
    (out / "images" / "broken.tif").write_bytes(b"not a tiff at all")
    assert main(["dataset", "check", str(out), "--classes", "3"]) == 1
    assert "broken.tif" in capsys.readouterr().out
    assert main(["dataset", "check", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--mask", "{long}.tif", "--out", "out.tif"],
        ["generate", "--mask", "{mask}", "--out", "{long}.tif"],
        ["export", "--out", "{long}", "--count", "1"],
        ["dataset", "check", "{long}"],
        ["info", "{long}.safetensors"],
    ],
)
def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, np.zeros((16, 16), np.uint8))
    long = "a" * 300  # above the 255 bytes of a name on common file systems: os.stat raises ENAMETOOLONG
    assert main([part.format(long=long, mask=mask) for part in command]) == 2
    err = capsys.readouterr().err
    assert "File name too long" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_escape_codes_and_newlines_in_file_names_are_printed_escaped(tmp_path, capsys):
    name = "a\x1b[31mred\nFAKE: OK"  # a name that would colour the terminal and forge a line of the report
    tifffile.imwrite(tmp_path / f"{name}.tif", np.full((8, 8), np.nan, np.float32))
    tifffile.imwrite(tmp_path / f"{name}_mask.tif", np.zeros((8, 8), np.uint8))
    assert main(["dataset", "check", str(tmp_path)]) == 1
    assert main(["generate", "--mask", str(tmp_path / f"{name}.tiff"), "--out", str(tmp_path / "out.tif")]) == 2
    captured = capsys.readouterr()
    for text in (captured.out, captured.err):
        assert "\x1b" not in text and "\nFAKE" not in text and "\\x1b[31mred\\nFAKE: OK" in text


def _tiny_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    return path, save_tiny_checkpoint(path)


def test_info_describes_a_checkpoint_and_rejects_other_files(tmp_path, capsys):
    path, sha = _tiny_checkpoint(tmp_path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 classes" in out and sha in out and "60 nm/px" in out
    assert '"base_channels": 8' in out and '"channel_mults": [1, 2]' in out and "parameterization: v" in out
    assert "default guidance: 1, per class: none, guided noise levels: all" in out
    assert f"DPM-Solver++, Euler and Heun start at sigma {load_checkpoint(path).schedule.sigma_max:g}" in out
    assert "default steps: ddpm 100, ddim 50, dpmpp_2m 20, dpmpp_2m_sde 20, euler 40, heun 20" in out
    assert "default sampler: dpmpp_2m; the SDE samplers add fresh noise on every step" in out
    assert "DPM-Solver++ 2M sigma grid: log-SNR (no sampling_density_range)" in out
    (tmp_path / "model.pt").write_bytes(b"\x80\x04junk")
    assert main(["info", str(tmp_path / "model.pt")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_info_escapes_control_characters_from_the_checkpoint(tmp_path, capsys):
    import json

    import safetensors.torch

    from napari_iscat_diffusion.diffusion.checkpoint import METADATA_KEY

    path = tmp_path / "model\x1b[2J.safetensors"
    save_tiny_checkpoint(path, config_fields={"class_names": ["\x1b[31mred", "two\nlines"]})
    with safetensors.safe_open(path, "pt") as file:
        document = json.loads(file.metadata()[METADATA_KEY])
    document["versions"]["package"] = "\x1b]0;title\x07" + "9" * 500
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={METADATA_KEY: json.dumps(document)})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "(\\x1b[31mred, two\\nlines)" in out and "model\\x1b[2J.safetensors" in out
    written_by = next(line for line in out.splitlines() if line.startswith("written by"))
    assert "\\x1b]0;title\\x07" in written_by and len(written_by) < 150  # cut short


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_generate_writes_one_image_per_mask_and_sample(tmp_path, capsys):
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    masks = np.zeros((2, 24, 40), np.uint8)
    masks[:, 5:9, 10:14] = 1
    tifffile.imwrite(tmp_path / "masks.tif", masks)
    out = tmp_path / "new folder" / "synthetic.tif"  # missing folders are made
    args = ["generate", "--mask", str(tmp_path / "masks.tif"), "--out", str(out), "--checkpoint", str(checkpoint)]
    assert main([*args, "--n", "2", "--steps", "2", "--seed", "3"]) == 0
    images = tifffile.imread(out)
    assert images.shape == (4, 24, 40) and images.dtype == np.float32
    assert read_pixel_size_nm(out) == pytest.approx(60.0)
    assert "wrote 4 image(s)" in capsys.readouterr().out
    before = out.read_bytes()
    assert main([*args, "--steps", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    per_class = tmp_path / "per_class.tif"
    assert main([*args[:4], str(per_class), *args[5:], "--steps", "2", "--class-guidance", "1=3"]) == 0
    assert not np.allclose(tifffile.imread(per_class), images[:2])
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:4], str(tmp_path / "bad.tif"), *args[5:], "--class-guidance", "1=lots"])
    assert exit_info.value.code == 2 and "'lots' (class 1) is not a number" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "bad.tif"), *args[5:], "--class-guidance", "4=2"]) == 2
    assert "4 is not a particle class" in capsys.readouterr().err and not (tmp_path / "bad.tif").exists()
    limited = tmp_path / "limited.tif"
    assert (
        main([*args[:4], str(limited), *args[5:], "--steps", "2", "--guidance", "3", "--guidance-interval", "1e6,1e7"])
        == 0
    )
    conditional = tmp_path / "conditional.tif"
    assert main([*args[:4], str(conditional), *args[5:], "--steps", "2", "--guidance", "1"]) == 0
    assert np.array_equal(tifffile.imread(limited), tifffile.imread(conditional))  # no step was guided
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:4], str(tmp_path / "bad.tif"), *args[5:], "--guidance-interval", "45,2"])
    assert exit_info.value.code == 2 and "expected 0 <= low < high" in capsys.readouterr().err


def test_generate_uses_the_bundled_default_or_says_there_is_none(tmp_path, monkeypatch, capsys):
    import napari_iscat_diffusion.models as models

    checkpoint, _ = _tiny_checkpoint(tmp_path)
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((16, 16), np.uint8))
    args = ["generate", "--mask", str(tmp_path / "mask.tif"), "--steps", "1"]
    monkeypatch.setattr(models, "bundled_checkpoints", lambda: {})
    assert main([*args, "--out", str(tmp_path / "a.tif")]) == 2
    assert "no bundled model" in capsys.readouterr().err
    monkeypatch.setattr(models, "bundled_checkpoints", lambda: {"tiny": checkpoint})
    assert main([*args, "--out", str(tmp_path / "b.tif")]) == 0
    assert tifffile.imread(tmp_path / "b.tif").shape == (16, 16)
    assert main([*args, "--out", str(tmp_path / "c.tif"), "--checkpoint", "tiny"]) == 0


def test_info_without_a_checkpoint_lists_versions_devices_and_bundled_models(tmp_path, monkeypatch, capsys):
    import napari_iscat_diffusion.models as models

    checkpoint, _ = _tiny_checkpoint(tmp_path)
    monkeypatch.setattr(models, "bundled_checkpoints", lambda: {"tiny": checkpoint})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "devices: cpu" in out
    assert "bundled models: 1" in out and "tiny: 2 classes" in out


def _generate_args(tmp_path, checkpoint, out="out.tif"):
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    return ["generate", "--mask", str(tmp_path / "mask.tif"), "--out", str(tmp_path / out), "--checkpoint", checkpoint]


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [
        ("--guidance", "1e300", "argument --guidance: guidance must be a finite number >= 0 and at most 100"),
        ("--guidance", "nan", "at most 100, got nan"),
        ("--guidance", "inf", "at most 100, got inf"),
        ("--guidance", "-1", "at most 100, got -1"),
        ("--guidance", "lots", "'lots' is not a number"),
        ("--steps", "0", "argument --steps: must be at least 1, got 0"),
        ("--steps", "1e9", "argument --steps: '1e9' is not a whole number"),
        ("--n", "-1", "argument --n: must be at least 1, got -1"),
        ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
        ("--seed", "-1", "argument --seed: must be from 0 to 2**63 - 1, got -1"),
        ("--seed", str(2**70), f"must be from 0 to 2**63 - 1, got {2**70}"),
    ],
)
def test_generate_refuses_absurd_numbers_when_parsing(tmp_path, capsys, option, value, phrase):
    with pytest.raises(SystemExit) as exit_info:
        main([*_generate_args(tmp_path, "unused.safetensors"), option, value])
    assert exit_info.value.code == 2 and phrase in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        (["--sampler", "dpmpp_2m", "--steps", "1000000000"], "steps must be a whole number from 1 to 1000"),
        (["--sampler", "euler", "--steps", "1001"], "steps must be a whole number from 1 to 1000"),
        (["--n", "1000000000"], "--n 1000000000 images per mask of"),
        (["--n", "2", "--seed", str(2**63 - 1), "--steps", "1"], f"seed {2**63} of image 1 is out of range"),
    ],
)
def test_generate_refuses_too_much_work_in_one_line(tmp_path, capsys, options, phrase):
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    assert main([*_generate_args(tmp_path, str(checkpoint)), *options]) == 2
    err = capsys.readouterr().err
    assert phrase in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.tif").exists()


def test_generate_refuses_too_large_an_output_from_the_mask_header_before_reading_its_pixels(
    tmp_path, capsys, monkeypatch
):
    from napari_iscat_diffusion.io import tiff_pairs

    def no_reading(*args, **kwargs):
        raise AssertionError("the mask's pixels were read")

    monkeypatch.setattr(tiff_pairs, "read_mask", no_reading)
    mask = tmp_path / "bomb.tif"  # 64 kB that decompress to 64 MB; --n 17 asks for 4.25 GiB of float32 images
    tifffile.imwrite(mask, np.zeros((8192, 8192), np.uint8), compression="zlib", tile=(1024, 1024))
    assert main(["generate", "--mask", str(mask), "--out", str(tmp_path / "out.tif"), "--n", "17"]) == 2
    err = capsys.readouterr().err
    assert "--n 17 images per mask of" in err and "4.2 GiB" in err and len(err.strip().splitlines()) == 1


def test_generate_checks_out_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import napari_iscat_diffusion.diffusion.checkpoint as checkpoint_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", no_loading)
    args = _generate_args(tmp_path, "unused.safetensors", out="mask.tif/out.tif")
    assert main(args) == 2
    assert f"--out {tmp_path / 'mask.tif' / 'out.tif'}: {tmp_path / 'mask.tif'} is a file, not a folder" in (
        capsys.readouterr().err
    )
    args[4] = str(tmp_path)
    assert main(args) == 2
    assert f"--out {tmp_path} is a folder; give the name of a new file" in capsys.readouterr().err
    args[4] = str(tmp_path / "mask.tif")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    if Path("/proc/self").is_dir():  # Linux: a folder that takes no new file, even from root
        args[4] = "/proc/out.tif"
        assert main(args) == 2
        assert "--out /proc/out.tif: cannot write into folder /proc" in capsys.readouterr().err


def test_generate_says_a_mask_folder_is_a_folder(tmp_path, capsys):
    args = _generate_args(tmp_path, "unused.safetensors")
    args[2] = str(tmp_path)
    assert main(args) == 2
    assert f"{tmp_path}: is a folder; expected a TIFF file" in capsys.readouterr().err


def test_generate_refuses_an_rgb_mask(tmp_path, capsys):
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    args = _generate_args(tmp_path, str(checkpoint))
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    assert main(args) == 2
    assert "mask.tif: is an RGB image" in capsys.readouterr().err and not (tmp_path / "out.tif").exists()


def test_generate_writes_no_image_when_the_network_overflows(tmp_path, capsys):
    config = load_checkpoint(_tiny_checkpoint(tmp_path)[0]).config
    net = perturbed_net(config.unet)
    with torch.no_grad():
        net.conv_out.bias.fill_(1e38)  # a diverged network: its predictions overflow float32 in the sampler
    save_checkpoint(tmp_path / "diverged.safetensors", net, config)
    assert main([*_generate_args(tmp_path, str(tmp_path / "diverged.safetensors")), "--steps", "3"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("iscat-diffusion generate: error: generation gave NaN or infinite pixels in image 0")
    assert "became NaN or infinite at step" in err and not (tmp_path / "out.tif").exists()
