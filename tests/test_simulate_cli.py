"""``iscat-diffusion simulate``: output paths checked before the work, the particle table complete or absent."""

import os

import pytest

from napari_iscat_diffusion import cli
from napari_iscat_diffusion.iscat import simulate as simulate_module


def test_simulate_refuses_an_output_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("a file, not a folder")
    assert cli.main(["simulate", "--n", "1", "--out", str(out), "--size", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert out.read_text() == "a file, not a folder"


def test_simulate_refuses_an_absurd_image_size_before_allocating(tmp_path, capsys):
    out = tmp_path / "sim"
    assert cli.main(["simulate", "--n", "1", "--out", str(out), "--size", "100000", "100000"]) == 2
    assert "image_size" in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_simulate_leaves_no_particle_table(tmp_path, monkeypatch):
    made = []
    real = simulate_module.simulate

    def simulate_then_interrupt(params, seed):
        if made:
            raise KeyboardInterrupt
        made.append(seed)
        return real(params, seed)

    monkeypatch.setattr(simulate_module, "simulate", simulate_then_interrupt)
    out = tmp_path / "sim"
    with pytest.raises(KeyboardInterrupt):
        cli.data._run_simulate(
            cli._build_parser().parse_args(["simulate", "--n", "3", "--out", str(out), "--size", "32", "32"])
        )
    assert not (out / "particles.csv").exists()
    assert [p.name for p in out.iterdir() if p.is_file()] == []  # no temporary table left either
    assert len(list((out / "images").glob("*.tif"))) == 1


@pytest.mark.parametrize("kind", ["folder", "fifo", "deep", "binary"])
def test_simulate_refuses_a_config_that_is_not_a_json_file_in_one_line(tmp_path, capsys, kind):
    config = tmp_path / f"{kind}.json"
    if kind == "folder":
        config.mkdir()
    elif kind == "fifo":
        os.mkfifo(config)  # reading it would wait for a writer forever
    elif kind == "deep":
        config.write_text("[" * 100_000 + "]" * 100_000)
    else:
        config.write_bytes(b"\xff\xfe\x00 not text")
    out = tmp_path / "sim"
    assert cli.main(["simulate", "--n", "1", "--out", str(out), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"--config {config}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
