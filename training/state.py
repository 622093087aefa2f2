"""Resumable training state on disk: one ``.safetensors`` file per checkpoint, tensors plus JSON, no pickle.

Tensors (weights, EMA, optimiser moments, RNG states as uint8) are stored under flat names
(``model.*``, ``ema.*``, ``optim.<param>.<key>``, ``rng.<rank>.<name>``); everything else (step,
counters, optimiser hyper-parameters, scheduler state, the config) is one JSON document in the
safetensors metadata together with a SHA-256 over the tensor bytes, so a file damaged after it was
written is detected, not only a truncated one. Files are written atomically (temporary file, fsync,
rename) as ``state-<step>.safetensors`` in the checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import safetensors
import safetensors.torch
import torch

# The atomic writer of model checkpoints; one implementation for both kinds of file.
from napari_iscat_diffusion.io.atomic import atomic_write_bytes, remove_stale_temporaries

STATE_KEY = "napari_iscat_diffusion_training_state"
STATE_VERSION = 1
_NAME = re.compile(r"^state-(\d+)\.safetensors$")


class StateError(ValueError):
    """A training-state file that cannot be used (truncated, damaged or not a training state)."""


def state_path(directory: Path, step: int) -> Path:
    """The file of the state after ``step`` optimiser steps."""
    return directory / f"state-{step:09d}.safetensors"


def list_states(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every state file in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in directory.iterdir() if (m := _NAME.match(path.name))]
    return sorted(found, reverse=True)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and bytes of ``tensors`` (in name order), on any device."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write tensors and a JSON-serialisable ``info`` dict to ``path`` atomically."""
    cpu = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    document = {"version": STATE_VERSION, "checksum": checksum(cpu), "info": info}
    data = safetensors.torch.save(cpu, metadata={STATE_KEY: json.dumps(document)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state file; returns (tensors, info). Raises StateError for any problem with the file."""
    try:
        data = path.read_bytes()
        tensors = safetensors.torch.load(data)
        with safetensors.safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
        document = json.loads(metadata[STATE_KEY])
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as err:
        raise StateError(f"{path}: not a readable training state ({type(err).__name__}: {err})") from err
    if document.get("version") != STATE_VERSION:
        raise StateError(f"{path}: training-state version {document.get('version')!r}, expected {STATE_VERSION}")
    if document.get("checksum") != checksum(tensors):
        raise StateError(f"{path}: the tensor data does not match its checksum (the file is damaged)")
    return tensors, document["info"]


def load_newest(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest usable state in ``directory`` as (path, tensors, info), or None when there is none.

    A damaged or unreadable file is skipped with a warning and the next older one is tried.
    """
    for _, path in list_states(directory):
        try:
            tensors, info = load_state(path)
        except StateError as err:
            warnings.warn(f"skipping a damaged training checkpoint: {err}", stacklevel=2)
            continue
        return path, tensors, info
    return None


def prune_states(directory: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete state files except the ``keep_last`` newest and those at ``keep_steps`` (the best one), and the
    temporary files of saves killed while writing."""
    remove_stale_temporaries(directory)
    for index, (step, path) in enumerate(list_states(directory)):
        if index >= keep_last and step not in keep_steps:
            path.unlink(missing_ok=True)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser ``state_dict`` as tensors ``optim.<param>.<key>`` plus JSON (param groups, scalar state)."""
    tensors, scalars = {}, {}
    for param, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param}.{key}"] = value
            else:
                scalars.setdefault(str(param), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    """Inverse of ``flatten_optimizer``: an optimiser ``state_dict`` to pass to ``load_state_dict``."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optim."):
            _, param, key = name.split(".", 2)
            state.setdefault(int(param), {})[key] = tensor
    for param, entries in info["scalars"].items():
        state.setdefault(int(param), {}).update(entries)
    groups = [
        {key: tuple(value) if key == "betas" else value for key, value in group.items()}
        for group in info["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors renamed ``prefix + name``."""
    return {prefix + name: tensor for name, tensor in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, with it removed."""
    return {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
