"""Model checkpoints: one ``.safetensors`` file with the network weights and a JSON config in its metadata.

The safetensors metadata (a ``dict[str, str]``) holds one key, ``METADATA_KEY``, whose value is a JSON
document ``{"format_version": 1, "versions": {...}, "config": ModelConfig.to_dict()}``. Nothing is
ever unpickled: a checkpoint cannot run code when it is loaded.

``load_checkpoint`` reads the file once, hashes those bytes (the provenance of what was loaded) and
checks everything before building the network; every failure raises ``CheckpointError`` with a
message that names the file, says what is wrong and what to do about it.

A crafted file costs no more than its own size: only a regular file of at most ``MAX_CHECKPOINT_BYTES`` is read
(never a FIFO or a device), its header is capped and parsed without deep recursion, every size in the config is
bounded (``unet.UNET_LIMITS`` and the limits in ``model_config``), and the names and shapes of the tensors the
config asks for are compared with the header's on the ``meta`` device, so that no network is allocated for a config
that the file's weights do not fill.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .. import __version__
from ..io.atomic import atomic_write_bytes, remove_stale_temporaries
from ..terminal import printable
from .device import resolve_device
from .loaded_model import LoadedModel
from .model_config import ModelConfig
from .unet import ConditionalUNet, UNetConfig

FORMAT_VERSION = 1
METADATA_KEY = "napari_iscat_diffusion"
STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_HEADER_DTYPES = ("F32", "F16", "BF16")  # STORAGE_DTYPES as safetensors names them
# The largest file read: the bundled model is 2.4 MB, and 4 GiB hold a billion float32 weights, far beyond any model
# this project trains.
MAX_CHECKPOINT_BYTES = 4 << 30

# A checkpoint's header (tensor index and our metadata) is 28 kB for the bundled model and under 2 MB at the
# UNET_LIMITS with 255 classes; parsing 8 MiB of the worst JSON costs about 200 MB and 2 s, where safetensors' own
# limit of 100 MB could cost gigabytes.
_MAX_HEADER_BYTES = 8 << 20
_MAX_JSON_DEPTH = 32  # our metadata nests 5 deep; deeper JSON would overflow the stack in copies of it
_MESSAGE_CHARS = 1000  # of a problem quoted from a file in an error message
_LISTED = 5  # names shown per kind of problem in an error message
_RESAVE = "Export the model again with napari_iscat_diffusion.diffusion.checkpoint.save_checkpoint."


class CheckpointError(ValueError):
    """A file could not be loaded as a model checkpoint; the message says why and what to do."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    net: ConditionalUNet,
    config: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
) -> str:
    """Write ``net``'s weights and ``config`` to one ``.safetensors`` file, atomically.

    Args:
        path: the file to write; an existing file is replaced only once the new one is complete.
        net: the network; its ``config`` must equal ``config.unet``.
        config: the model config stored in the file's metadata.
        dtype: storage dtype of the floating-point weights: None (as they are), torch.float32,
            torch.float16 (half the size, for a bundled model) or torch.bfloat16.

    Returns:
        the hex SHA-256 of the written file.

    Raises:
        ValueError: for a bad dtype, a config that does not match the network, or weights that are
            not finite (in the storage dtype).
    """
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be None or one of {STORAGE_DTYPES}, got {dtype}")
    if net.config != config.unet:
        raise ValueError(f"config.unet {config.unet} differs from the network's config {net.config}")
    # Round trip through the serialised form, so that a config mutated after construction is checked again.
    config_dict = ModelConfig.from_dict(config.to_dict()).to_dict()
    tensors = {}
    for name, tensor in net.state_dict().items():
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensors[name] = tensor.detach().to(device="cpu", dtype=target).contiguous()
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(
            f"weights hold NaN or Inf values{' after conversion to ' + str(dtype) if dtype else ''}: {bad}"
        )
    document = {
        "format_version": FORMAT_VERSION,
        "versions": {"package": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "config": config_dict,
    }
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(document, allow_nan=False)})
    remove_stale_temporaries(path)  # what an earlier save, killed while writing, left behind
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The checked model config stored in a checkpoint's metadata, without loading its weights.

    Raises:
        CheckpointError: as ``load_checkpoint`` for a file that cannot be read or whose metadata is not ours.
    """
    path = Path(path)
    return _parse_metadata(path, _parse_header(path, _read_bytes(path))[0])[0]


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load and check a checkpoint written by ``save_checkpoint``.

    Args:
        path: the ``.safetensors`` file.
        device: where to put the network: "cpu", "cuda", "cuda:N", "mps" or "auto".

    Returns:
        the network (float32, eval mode, no gradients) with its config, path, SHA-256 and versions.

    Raises:
        CheckpointError: the file is missing, unreadable, not a regular file, larger than ``MAX_CHECKPOINT_BYTES``,
            truncated, not a safetensors file, not a checkpoint of this package, of an unsupported format version,
            or its config or weights are invalid.
        ValueError: the device is not available here.
    """
    path = Path(path)
    torch_device = resolve_device(device)
    data = _read_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    metadata, stored = _parse_header(path, data)
    config, versions = _parse_metadata(path, metadata)
    _check_fit(path, _expected_shapes(config.unet), stored)
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, KeyError) as err:
        raise _error(path, f"it is a corrupt safetensors file ({err})", _RESAVE) from err
    bad = _non_finite(tensors)
    if bad:
        raise _error(
            path,
            f"the weights hold NaN or Inf values: {bad}",
            "The model diverged in training or the file is corrupt; use another checkpoint.",
        )
    storage_dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    net = ConditionalUNet(config.unet)
    net.load_state_dict(tensors)  # copies into the float32 parameters, so fp16 weights become float32
    net.requires_grad_(False).eval().to(torch_device)
    return LoadedModel(
        net=net,
        config=config,
        path=path.resolve(),
        sha256=sha256,
        versions=versions,
        storage_dtype=storage_dtype,
    )


def _error(path: Path, problem: str, advice: str) -> CheckpointError:
    # The problem and the advice may quote the file, and the message ends up on a terminal.
    shown, problem, advice = (printable(text, _MESSAGE_CHARS) for text in (str(path), problem, advice))
    return CheckpointError(f"Cannot load model checkpoint '{shown}': {problem}. {advice}")


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file of 1 to ``MAX_CHECKPOINT_BYTES`` bytes (never a FIFO or a
    device such as /dev/zero, which would hang or never end)."""
    if path.is_dir():
        raise _error(path, "it is a folder, not a file", "Choose the .safetensors checkpoint file inside it.")
    try:
        # Non-blocking: opening a FIFO would otherwise wait for a writer. The checks below are on what was opened.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as err:
        raise _error(path, "file not found", "Check the path and choose a .safetensors checkpoint file.") from err
    except OSError as err:
        raise _error(path, f"the file cannot be read ({err})", "Check that it exists and is readable.") from err
    with open(descriptor, "rb") as file:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise _error(path, "it is a folder, not a file", "Choose the .safetensors checkpoint file inside it.")
        if not stat.S_ISREG(info.st_mode):
            raise _error(
                path, "it is not a regular file (a device, FIFO or socket)", "Choose a .safetensors checkpoint file."
            )
        if info.st_size > MAX_CHECKPOINT_BYTES:
            raise _error(
                path,
                f"the file is {info.st_size} bytes, more than the {MAX_CHECKPOINT_BYTES >> 30} GiB a checkpoint may be",
                "Choose a checkpoint written by napari-iscat-diffusion.",
            )
        try:
            # No more than the size it had when opened (+1 to notice growth), whatever a special file system says.
            data = file.read(info.st_size + 1)
        except OSError as err:
            raise _error(path, f"the file cannot be read ({err})", "Check that it exists and is readable.") from err
    if not data:
        raise _error(path, "the file is empty (0 bytes)", "It was not written completely; save or download it again.")
    if len(data) > info.st_size:
        raise _error(path, "the file grew while it was read", "Load it again once it is written.")
    return data


def _parse_header(path: Path, data: bytes) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """The safetensors header's metadata and its tensors ``{name: (dtype, shape)}``, with clear errors for files
    that are not safetensors, are cut short or have an oversized or malformed header."""
    # A safetensors file starts with its header length (8 bytes, little-endian) and then "{": test that
    # first, since a header length whose low byte is 0x80 also starts like a pickle.
    looks_like_safetensors = len(data) >= 9 and data[8:9] == b"{"
    if not looks_like_safetensors and (data.startswith(b"PK\x03\x04") or data.startswith(b"\x80")):
        raise _error(
            path,
            "it is a pickle file (such as a PyTorch .pt/.pth/.ckpt from torch.save), not a safetensors file; "
            "pickle files can run arbitrary code and are never loaded",
            _RESAVE,
        )
    if len(data) < 8:
        raise _error(
            path, f"the file is only {len(data)} bytes long: truncated, or not a safetensors file", "Use another file."
        )
    header_size = int.from_bytes(data[:8], "little")
    if not looks_like_safetensors:
        raise _error(
            path, "it is not a safetensors file", "Choose a .safetensors checkpoint written by napari-iscat-diffusion."
        )
    if header_size > _MAX_HEADER_BYTES:
        raise _error(
            path,
            f"its header is {header_size} bytes, more than the {_MAX_HEADER_BYTES >> 20} MiB a checkpoint's may be",
            _RESAVE,
        )
    if 8 + header_size > len(data):
        raise _error(
            path,
            f"the file is truncated (its header needs {8 + header_size} bytes, the file has {len(data)})",
            "It was not written or downloaded completely; save or download it again.",
        )
    try:
        header = json.loads(data[8 : 8 + header_size], object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except (ValueError, RecursionError) as err:
        raise _error(path, f"it is not a safetensors file (bad header: {err})", _RESAVE) from err
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _error(path, "it is not a safetensors file (its metadata is not a map of strings)", _RESAVE)
    bad = [name for name, entry in header.items() if not _is_tensor_entry(entry)]
    if bad:
        raise _error(path, f"it is not a safetensors file (bad header entries: {_listing(bad)})", _RESAVE)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_size + end > len(data):
        raise _error(
            path,
            f"the file is truncated ({len(data)} of {8 + header_size + end} bytes)",
            "It was not written or downloaded completely; save or download it again.",
        )
    return metadata, {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; ValueError for a key given twice, which readers may resolve differently."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key is given twice")
    return result


def _bounded_int(text: str) -> int:
    """A JSON integer of at most 19 digits (beyond, numbers would overflow float and int64 conversions later)."""
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"the integer {text[:30]}... is too large")
    return int(text)


def _is_tensor_entry(entry: object) -> bool:
    """Whether a header entry is ``{"dtype": str, "shape": [ints >= 0], "data_offsets": [begin, end]}``."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return False
    shape, offsets = entry["shape"], entry["data_offsets"]
    return (
        isinstance(entry["dtype"], str)
        and isinstance(shape, list)
        and all(type(n) is int and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(n) is int for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def _json_depth(value: object) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar), without recursion."""
    depth, level = 0, [value]
    while level:
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        depth += 1
    return depth - 1


def _parse_metadata(path: Path, metadata: dict) -> tuple[ModelConfig, dict]:
    """The model config and the versions from our key of the safetensors metadata."""
    if METADATA_KEY not in metadata:
        raise _error(
            path,
            f"it is a safetensors file without a napari-iscat-diffusion model config (no {METADATA_KEY!r} "
            "metadata), perhaps the weights of another model",
            "Choose a checkpoint written by napari-iscat-diffusion.",
        )
    try:
        document = json.loads(metadata[METADATA_KEY], object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except (ValueError, RecursionError) as err:
        raise _error(path, f"its {METADATA_KEY!r} metadata is malformed JSON ({err})", _RESAVE) from err
    if _json_depth(document) > _MAX_JSON_DEPTH:
        raise _error(path, f"its {METADATA_KEY!r} metadata nests deeper than {_MAX_JSON_DEPTH} levels", _RESAVE)
    if not isinstance(document, dict) or set(document) != {"format_version", "versions", "config"}:
        keys = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise _error(
            path,
            f"its {METADATA_KEY!r} metadata is malformed (expected config, format_version and versions; got {keys})",
            _RESAVE,
        )
    version = document["format_version"]
    versions = document["versions"]
    writer = versions.get("package", "unknown") if isinstance(versions, dict) else "unknown"
    if type(version) is int and version > FORMAT_VERSION:
        raise _error(
            path,
            f"it uses checkpoint format {version}, newer than format {FORMAT_VERSION} that napari-iscat-diffusion "
            f"{__version__} reads; it was written by napari-iscat-diffusion {writer}",
            f"Upgrade napari-iscat-diffusion to {writer} or newer (pip install -U napari-iscat-diffusion).",
        )
    if type(version) is not int or version != FORMAT_VERSION:
        raise _error(
            path,
            f"it has an unknown checkpoint format version {version!r} (this version reads format {FORMAT_VERSION})",
            _RESAVE,
        )
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise _error(path, f"its recorded versions are malformed: {versions!r}", _RESAVE)
    try:
        config = ModelConfig.from_dict(_without_retired_fields(path, document["config"]))
    except ValueError as err:
        raise _error(path, f"its model config is invalid ({err})", _RESAVE) from err
    return config, {**versions, "format_version": version}  # the checked version, whatever else the file says


def _without_retired_fields(path: Path, data: object) -> object:
    """A stored model config without the fields that earlier versions wrote with a value that means nothing now
    (``"high_noise_expert": null``); CheckpointError for a file that needs such a field."""
    if not isinstance(data, dict) or "high_noise_expert" not in data:
        return data
    if data["high_noise_expert"] is not None:
        raise _error(
            path,
            "it holds a high-noise expert network, which this version no longer uses",
            "Load the checkpoint of its main network, the run the expert was combined with.",
        )
    return {key: value for key, value in data.items() if key != "high_noise_expert"}


def _expected_shapes(unet: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the state dict of a network of ``unet``, found without allocating its weights."""
    with torch.device("meta"):
        net = ConditionalUNet(unet)
    return {name: tuple(tensor.shape) for name, tensor in net.state_dict().items()}


def _check_fit(
    path: Path,
    expected: dict[str, tuple[int, ...]],
    stored: dict[str, tuple[str, tuple[int, ...]]],
) -> None:
    """Raise CheckpointError unless the stored tensors ``{name: (safetensors dtype, shape)}`` match the network's
    state dict ``{name: shape}`` in names and shapes and are stored in one of ``STORAGE_DTYPES``."""
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    mismatched = [
        f"{name} (file {stored[name][1]} {stored[name][0]}, network {want})"
        for name, want in expected.items()
        if name in stored and (stored[name][1] != want or stored[name][0] not in _HEADER_DTYPES)
    ]
    problems = [
        f"{len(names)} {kind}: {_listing(names)}"
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of the wrong shape or type", mismatched),
        )
        if names
    ]
    if problems:
        raise _error(
            path,
            "the weights do not fit the network described in its config (" + "; ".join(problems) + ")",
            "The file was edited or written by incompatible code. " + _RESAVE,
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _non_finite(tensors: dict[str, torch.Tensor]) -> str:
    """Names of the floating-point tensors holding NaN or Inf (a few), or "" when all are finite."""
    names = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return _listing(names) if names else ""
