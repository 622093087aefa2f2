"""Choosing the torch device that generation runs on."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """Names of the devices usable here: "auto", "cpu", then "cuda:N" for each GPU and "mps" on Apple silicon."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` into a torch.device.

    ``"auto"`` picks CUDA, then MPS, then the CPU. A device that is not available here raises
    ValueError naming the devices that are.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; available here: {', '.join(available_devices())}") from err
    usable = (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and torch.backends.mps.is_available())
    )
    if not usable:
        available = ", ".join(available_devices())
        raise ValueError(f"device {name!r} is not available on this machine; available here: {available}")
    return device
