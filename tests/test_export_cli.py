"""``iscat-diffusion export``: random or given masks, resume, preview, and the same pairs under torchrun."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_iscat_diffusion.cli import main
from napari_iscat_diffusion.export import MANIFEST, finished_pairs

REPO = Path(__file__).resolve().parents[1]


def _args(out, checkpoint, *extra):
    return ["export", "--out", str(out), "--checkpoint", str(checkpoint), "--steps", "2", "--device", "cpu", *extra]


def _tiffs(folder):
    return {p.relative_to(folder).as_posix(): tifffile.imread(p) for p in sorted(folder.rglob("*.tif"))}


def test_export_random_masks_with_a_preview_and_resume(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    args = _args(out, tiny_checkpoint, "--n", "3", "--size", "16", "24", "--particles", "3", "--seed", "4")
    assert main([*args, "--preview", str(out / "preview.png")]) == 0  # as the quick start: inside the new folder
    captured = capsys.readouterr()
    assert "wrote 3 pair(s), skipped 0 finished" in captured.out
    assert "export: 100%" in captured.err and "| 3/3 [" in captured.err  # the progress bar, full
    assert sorted(finished_pairs(out)) == [f"random_{i:05d}_s000" for i in range(3)]
    mask = tifffile.imread(out / "masks" / "random_00000_s000.tif")
    assert mask.shape == (16, 24) and set(np.unique(mask)) <= {0, 1, 2}
    assert (out / "preview.png").read_bytes().startswith(b"\x89PNG")
    before = _tiffs(out)
    assert main([*args, "--samples-per-mask", "1"]) == 0
    assert "wrote 0 pair(s), skipped 3 finished" in capsys.readouterr().out
    assert all(np.array_equal(before[k], v) for k, v in _tiffs(out).items())


def test_export_a_folder_of_masks_and_refuse_bad_arguments(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "cell.tif", np.eye(16, dtype=np.uint8))
    out = tmp_path / "out"
    assert main([*_args(out, tiny_checkpoint, "--masks", str(tmp_path), "--samples-per-mask", "2")]) == 0
    assert sorted(finished_pairs(out)) == ["cell_s000", "cell_s001"]
    capsys.readouterr()
    assert main(_args(out, tiny_checkpoint)) == 2
    assert "give either --n (random masks) or --masks FOLDER" in capsys.readouterr().err
    assert main(_args(out, tiny_checkpoint, "--n", "1", "--size", "8", "8", "8")) == 2
    assert "--size takes H or H W" in capsys.readouterr().err
    assert main(_args(out, tiny_checkpoint, "--masks", str(tmp_path), "--steps", "3")) == 2
    assert "other settings (steps differ" in capsys.readouterr().err


def test_export_uses_the_bundled_default_model(tmp_path, tiny_checkpoint, monkeypatch):
    import napari_iscat_diffusion.models as models

    monkeypatch.setattr(models, "bundled_checkpoints", lambda: {"tiny": tiny_checkpoint})
    args = ["export", "--out", str(tmp_path), "--n", "1", "--size", "16", "--steps", "1", "--device", "cpu"]
    assert main(args) == 0
    assert len(finished_pairs(tmp_path)) == 1


def test_two_processes_under_torchrun_make_the_pairs_of_one(tmp_path, tiny_checkpoint):
    common = ["--count", "3", "--size", "16", "--samples-per-mask", "2", "--seed", "9"]  # torchrun would take --n
    assert main(_args(tmp_path / "one", tiny_checkpoint, *common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "napari_iscat_diffusion.cli",
        *_args(tmp_path / "two", tiny_checkpoint, *common),
        "--preview",
        str(tmp_path / "preview.png"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 6 pair(s), skipped 0 finished" in result.stdout  # summed over both ranks
    assert "export (rank 0 of 2): 100%" in result.stderr and "| 3/3 [" in result.stderr  # rank 0 made half
    one, two = _tiffs(tmp_path / "one"), _tiffs(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 12
    for name, array in one.items():
        np.testing.assert_array_equal(two[name], array, err_msg=name)
    assert (tmp_path / "two" / MANIFEST).read_bytes() == (tmp_path / "one" / MANIFEST).read_bytes()
    assert not list((tmp_path / "two").glob("manifest.rank*.csv"))
    assert (tmp_path / "preview.png").exists()


@pytest.mark.parametrize("size", [["16"], ["16", "24"]])
def test_size_takes_one_or_two_numbers(tmp_path, tiny_checkpoint, size):
    assert main(_args(tmp_path, tiny_checkpoint, "--n", "1", "--size", *size, "--steps", "1")) == 0
    shape = tifffile.imread(tmp_path / "images" / "random_00000_s000.tif").shape
    assert shape == (16, int(size[-1]))


def _error_line(capsys):
    """The error message, after checking that it stands alone on the last line, without a traceback."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in err and last.startswith("iscat-diffusion export: error: "), err
    return last


def test_output_paths_and_mask_names_are_checked_before_any_work(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    (tmp_path / "a folder.png").mkdir()
    assert (
        main([*_args(out, tiny_checkpoint, "--n", "1", "--size", "16"), "--preview", str(tmp_path / "a folder.png")])
        == 2
    )
    assert "a folder.png is a folder or a link" in _error_line(capsys)
    (tmp_path / "file").write_text("")
    assert main(_args(tmp_path / "file", tiny_checkpoint, "--n", "1", "--size", "16")) == 2
    assert "file is a file, not a folder" in _error_line(capsys)
    assert main(_args(out, tiny_checkpoint, "--n", "1", "--samples-per-mask", "0")) == 2
    assert "--samples-per-mask must be at least 1" in _error_line(capsys)
    (tmp_path / "masks").mkdir()
    for name in ("a b", "a_b", "c"):
        tifffile.imwrite(tmp_path / "masks" / f"{name}.tif", np.eye(16, dtype=np.uint8))
    assert main(_args(out, tiny_checkpoint, "--masks", str(tmp_path))) == 2
    assert "both give pairs named 'a_b'" in _error_line(capsys)
    assert not out.exists()
    (tmp_path / "masks" / "a b.tif").unlink()
    assert main(_args(tmp_path, tiny_checkpoint, "--masks", str(tmp_path))) == 2  # would write into the masks
    assert "where this export would write" in _error_line(capsys)


def test_a_damaged_mask_file_stops_with_its_name_and_the_export_resumes(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "a.tif", np.eye(16, dtype=np.uint8))
    (tmp_path / "masks" / "b.tif").write_bytes(b"")
    out = tmp_path / "out"
    assert main(_args(out, tiny_checkpoint, "--masks", str(tmp_path))) == 2
    assert "b.tif: not a readable TIFF file" in _error_line(capsys)
    assert sorted(finished_pairs(out)) == ["a_s000"]
    tifffile.imwrite(tmp_path / "masks" / "b.tif", np.eye(16, dtype=np.uint8))
    assert main(_args(out, tiny_checkpoint, "--masks", str(tmp_path))) == 0
    assert "wrote 1 pair(s), skipped 1 finished" in capsys.readouterr().out


def test_a_full_disk_gives_a_one_line_error_and_the_export_resumes(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    real = tifffile.imwrite
    calls = []

    def disk_full_on_the_third_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(*args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", disk_full_on_the_third_file)
    args = _args(tmp_path / "out", tiny_checkpoint, "--n", "2", "--size", "16")
    assert main(args) == 2
    assert "random_00001_s000.tif: No space left on device" in _error_line(capsys)
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert main(args) == 0
    assert "wrote 1 pair(s), skipped 1 finished" in capsys.readouterr().out


def test_the_summary_counts_the_pairs_the_manifest_lists(tmp_path, tiny_checkpoint, capsys):
    assert main(_args(tmp_path, tiny_checkpoint, "--n", "3", "--size", "16")) == 0
    capsys.readouterr()
    assert main(_args(tmp_path, tiny_checkpoint, "--n", "2", "--size", "16")) == 0
    assert f"{tmp_path / MANIFEST} lists 3 pair(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--seed", "99999999999999999999999"], "--seed: must be from 0 to 2**63 - 1"),
        (["--seed", str(2**63 - 1)], "seed must be in 0.."),  # pair i uses seed + i
        (["--seed", "-3"], "--seed: must be from 0 to 2**63 - 1, got -3"),
        (["--size", "3000000"], "--size: sides of 1 to 8192 pixels"),
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--preview", "manifest.csv"], "the preview is a PNG file"),
    ],
)
def test_hostile_numbers_and_paths_give_one_line_errors(tmp_path, tiny_checkpoint, capsys, extra, words):
    if extra[0] == "--preview":
        extra = ["--preview", str(tmp_path / "out" / extra[1])]
    try:
        status = main(_args(tmp_path / "out", tiny_checkpoint, "--n", "1", "--size", "16", *extra))
    except SystemExit as exit_info:  # refused by the argument parser
        status = exit_info.code
    assert status == 2
    assert words in _error_line(capsys)
    assert not list(tmp_path.rglob("*.tif"))
