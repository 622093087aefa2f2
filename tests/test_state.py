"""Training-state files: round trip, damage detection, newest-usable selection, pruning, optimiser flattening."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from training.state import (
    StateError,
    flatten_optimizer,
    list_states,
    load_newest,
    load_state,
    prune_states,
    save_state,
    state_path,
    unflatten_optimizer,
)


def _write(directory: Path, step: int) -> Path:
    path = state_path(directory, step)
    save_state(
        path,
        {"model.w": torch.full((64,), float(step)), "rng.0.noise": torch.arange(8, dtype=torch.uint8)},
        {"step": step},
    )
    return path


def test_round_trip_keeps_tensors_and_info(tmp_path: Path) -> None:
    path = _write(tmp_path, 3)
    tensors, info = load_state(path)
    assert info == {"step": 3}
    assert torch.equal(tensors["model.w"], torch.full((64,), 3.0))
    assert tensors["rng.0.noise"].dtype == torch.uint8
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the atomic write leaves no temporary file


def test_a_changed_byte_in_the_tensor_data_is_detected(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data at the end of the file: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum"):
        load_state(path)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_unreadable_files_raise_state_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = state_path(tmp_path, 1)
    path.write_bytes(content)
    with pytest.raises(StateError, match=str(path)):
        load_state(path)


def test_a_truncated_file_is_detected(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StateError, match="not a readable training state"):
        load_state(path)


def test_load_newest_skips_a_damaged_newest_file_with_a_warning(tmp_path: Path) -> None:
    _write(tmp_path, 10)
    newest = _write(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:50])
    with pytest.warns(UserWarning, match="skipping a damaged training checkpoint.*state-000000020"):
        path, _, info = load_newest(tmp_path)
    assert info["step"] == 10 and path == state_path(tmp_path, 10)


def test_load_newest_without_states(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_newest(tmp_path / "missing") is None
        assert load_newest(tmp_path) is None


def test_prune_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        _write(tmp_path, step)
    (tmp_path / "notes.txt").write_text("not a state")
    prune_states(tmp_path, keep_last=2, keep_steps={2})
    assert [step for step, _ in list_states(tmp_path)] == [5, 4, 2]
    assert (tmp_path / "notes.txt").exists()


def test_prune_removes_what_a_save_killed_while_writing_left(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from napari_iscat_diffusion.io import atomic

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    killed = tmp_path / f".{state_path(tmp_path, 7).name}.{atomic._HOST}-{dead_pid}-0123456789ab.tmp"
    writing = tmp_path / f".{state_path(tmp_path, 8).name}.{atomic._HOST}-{os.getpid()}-0123456789ab.tmp"
    for leftover in (killed, writing):
        leftover.write_bytes(b"half a state")
    _write(tmp_path, 9)
    prune_states(tmp_path, keep_last=2, keep_steps=set())
    assert not killed.exists() and writing.exists()


def test_optimizer_state_survives_flattening() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, info = flatten_optimizer(optimizer.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and tensors
    tensors = {name: tensor.clone() for name, tensor in tensors.items()}  # as read back from a file

    copy = torch.nn.Linear(3, 2)
    copy.load_state_dict(model.state_dict())
    restored = torch.optim.AdamW(copy.parameters(), lr=1.0)
    restored.load_state_dict(unflatten_optimizer(tensors, info))
    assert restored.param_groups[0]["betas"] == (0.8, 0.99)
    batch = torch.randn(4, 3)
    for net, opt in ((model, optimizer), (copy, restored)):
        opt.zero_grad()
        net(batch).sum().backward()
        opt.step()
    assert torch.equal(model.weight, copy.weight) and torch.equal(model.bias, copy.bias)
