"""Crafted checkpoint files: each ends in a prompt CheckpointError and costs no more memory than its own size."""

import contextlib
import copy
import json
import os
import re
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import safetensors.torch
import torch
from tests.test_checkpoint import make_config
from tests.tiny_models import perturbed_net, save_tiny_checkpoint, tiny_unet_config, uniform_contrast_prior

from napari_iscat_diffusion.diffusion import checkpoint
from napari_iscat_diffusion.diffusion.checkpoint import (
    METADATA_KEY,
    CheckpointError,
    load_checkpoint,
    read_model_config,
)
from napari_iscat_diffusion.diffusion.generate import generate
from napari_iscat_diffusion.diffusion.loaded_model import LoadedModel
from napari_iscat_diffusion.diffusion.model_config import ModelConfig
from napari_iscat_diffusion.diffusion.schedules import cosine_schedule
from napari_iscat_diffusion.diffusion.unet import MAX_CHANNEL_MULT, MAX_LEVELS, UNET_LIMITS


def tiny_document(path) -> dict:
    """The JSON document in the metadata of the checkpoint at ``path``."""
    with safetensors.safe_open(path, "pt") as file:
        return json.loads(file.metadata()[METADATA_KEY])


def write_with_metadata(path, source, text: str) -> None:
    """Write at ``path`` the tensors of the checkpoint ``source`` with ``text`` as our metadata value."""
    safetensors.torch.save_file(safetensors.torch.load_file(source), path, metadata={METADATA_KEY: text})


def write_raw(path, header: object, data: bytes = b"") -> None:
    """Write a file laid out like safetensors: the JSON ``header`` (any JSON value) and then ``data``."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def loads_within(path, seconds: float = 20.0) -> BaseException | None:
    """Load ``path`` in a thread; the exception it raised (None if it loaded). Fails the test if it hangs."""
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_checkpoint(path)
            outcome.append(None)
        except BaseException as err:  # handed to the test
            outcome.append(err)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"loading {path} hangs"
    return outcome[0]


HUGE_UNETS = {
    "num_res_blocks": {"num_res_blocks": 10**6},
    "channel_mults": {"channel_mults": [1] * 10**4},
    "base_channels": {"base_channels": 10**6},
    "num_classes": {"num_classes": 10**9},
    "image_channels": {"image_channels": 10**6},
    # Within every bound, but 2 * 10^12 parameters: refused by comparing the header's shapes before building it.
    "largest": {
        "image_channels": UNET_LIMITS["image_channels"],
        "base_channels": UNET_LIMITS["base_channels"],
        "channel_mults": [MAX_CHANNEL_MULT] * MAX_LEVELS,
        "num_res_blocks": UNET_LIMITS["num_res_blocks"],
        "attention_levels": list(range(MAX_LEVELS)),
        "num_heads": UNET_LIMITS["num_heads"],
        "norm_groups": UNET_LIMITS["norm_groups"],
    },
}


def write_huge(path, tiny_checkpoint, name: str) -> None:
    """Write at ``path`` the tiny checkpoint with ``HUGE_UNETS[name]`` as its network's config, the rest of the
    config made to agree with it, so that only the size is wrong."""
    document = tiny_document(tiny_checkpoint)
    config = document["config"]
    config["unet"].update(HUGE_UNETS[name])
    config["class_names"] = None
    channels = min(config["unet"]["image_channels"], UNET_LIMITS["image_channels"])
    config["normalization"] = {"mean": [0.0] * channels, "std": [1.0] * channels}
    write_with_metadata(path, tiny_checkpoint, json.dumps(document))


# Loads each file named on the command line, which must raise CheckpointError, and prints the seconds each took
# and the peak memory growth (MB) over all as JSON.
_LOAD_ALL = """
import json, resource, sys, time
from napari_iscat_diffusion.diffusion.checkpoint import CheckpointError, load_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = {}
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        load_checkpoint(path)
    except CheckpointError:
        seconds[path] = time.perf_counter() - start
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"seconds": seconds, "growth_mb": growth}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kB on Linux")
def test_hostile_files_under_10_mb_cost_neither_memory_nor_time(tiny_checkpoint, tmp_path):
    paths = [str(tmp_path / f"{name}.safetensors") for name in HUGE_UNETS]
    for name, path in zip(HUGE_UNETS, paths, strict=True):
        write_huge(path, tiny_checkpoint, name)
    # The costliest JSON to parse (an empty list per 3 bytes) filling the largest header allowed.
    paths.append(str(tmp_path / "lists.safetensors"))
    encoded = b'{"a": [' + b"[]," * ((checkpoint._MAX_HEADER_BYTES - 20) // 3) + b"[]]}"
    with open(paths[-1], "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
    assert all(os.path.getsize(path) < 10**7 for path in paths)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_ALL, *paths], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert sorted(report["seconds"]) == sorted(paths)  # every one refused with a CheckpointError
    assert max(report["seconds"].values()) < 15
    assert report["growth_mb"] < 300


@pytest.mark.parametrize("name", sorted(HUGE_UNETS))
def test_huge_configs_are_refused_naming_the_field(tiny_checkpoint, tmp_path, name):
    path = tmp_path / "huge.safetensors"
    write_huge(path, tiny_checkpoint, name)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    expected = {"largest": "do not fit", "channel_mults": "channel_mults: must list at least one resolution level and"}
    assert expected.get(name, f"{name}: must be a positive integer of at most") in str(info.value)
    if name != "largest":
        with pytest.raises(CheckpointError, match="model config is invalid"):
            read_model_config(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_at_once(tmp_path):
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    try:
        error = loads_within(path)
    finally:
        # Releases a reader that waits for a writer (the behaviour this test guards against).
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_link_to_an_endless_device_is_refused_at_once(tmp_path):
    path = tmp_path / "model.safetensors"
    path.symlink_to("/dev/zero")
    error = loads_within(path)
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_model_config(path)


def test_a_file_over_the_size_limit_is_refused_unread(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", os.path.getsize(tiny_checkpoint) - 1)
    with pytest.raises(CheckpointError, match="bytes, more than the"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("depth", [50, 100_000])
def test_deeply_nested_metadata_is_refused(tiny_checkpoint, tmp_path, depth):
    document = tiny_document(tiny_checkpoint)
    document["config"]["training"] = "NESTED"
    text = json.dumps(document).replace('"NESTED"', "[" * depth + "]" * depth)
    path = tmp_path / "deep.safetensors"
    write_with_metadata(path, tiny_checkpoint, text)
    with pytest.raises(CheckpointError, match=r"malformed JSON|nests deeper"):
        load_checkpoint(path)


def test_a_deeply_nested_header_is_refused(tmp_path):
    path = tmp_path / "deep.safetensors"
    encoded = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)


def test_huge_metadata_is_refused_before_it_is_parsed(tiny_checkpoint, tmp_path):
    document = tiny_document(tiny_checkpoint)
    document["config"]["training"] = {"notes": "x" * (9 << 20)}
    path = tmp_path / "big.safetensors"
    write_with_metadata(path, tiny_checkpoint, json.dumps(document))
    with pytest.raises(CheckpointError, match=r"its header is \d+ bytes, more than the 8 MiB"):
        load_checkpoint(path)


F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "phrase"),
    [
        ([1, 2], b"", "not a safetensors file"),
        ({"a": F32_PAIR, "__metadata__": {"k": 5}}, bytes(8), "metadata is not a map of strings"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**62]}}, bytes(8), "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "bad header entries: a"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "bad header entries: a"),
        ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8), "bad header entries: a"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**30]}}, bytes(8), "is too large"),
        ({"a": [1, 2]}, b"", "bad header entries: a"),
    ],
)
def test_malformed_headers(tmp_path, header, data, phrase):
    path = tmp_path / "crafted.safetensors"
    write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=phrase):
        load_checkpoint(path)


def test_a_tensor_name_given_twice_is_refused(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    name = next(key for key in header if key != "__metadata__")
    entry = json.dumps({name: header[name]})[1:-1]
    encoded = b"{" + entry.encode() + b"," + data[9 : 8 + size]
    path = tmp_path / "twice.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    with pytest.raises(CheckpointError, match="a key is given twice"):
        load_checkpoint(path)


def rewrite_tensors(source, path, change) -> None:
    """Write at ``path`` the checkpoint ``source`` with its tensors passed through ``change(tensors)``."""
    with safetensors.safe_open(source, "pt") as file:
        metadata = file.metadata()
    tensors = safetensors.torch.load_file(source)
    change(tensors)
    safetensors.torch.save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool, torch.int8])
def test_weights_of_other_dtypes_are_refused(tiny_checkpoint, tmp_path, dtype):
    # float64 could hold values that are infinite in the network's float32.
    path = tmp_path / "typed.safetensors"
    rewrite_tensors(tiny_checkpoint, path, lambda tensors: tensors.update({k: v.to(dtype) for k, v in tensors.items()}))
    with pytest.raises(CheckpointError, match="of the wrong shape or type"):
        load_checkpoint(path)


def test_a_zero_dimensional_weight_is_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "scalar.safetensors"
    name = sorted(safetensors.torch.load_file(tiny_checkpoint))[0]
    rewrite_tensors(tiny_checkpoint, path, lambda tensors: tensors.update({name: torch.tensor(1.0)}))
    with pytest.raises(CheckpointError, match=r"of the wrong shape or type: .*file \(\) F32"):
        load_checkpoint(path)


def test_offsets_that_overlap_are_refused(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[1]
    header[second]["data_offsets"][0] -= 4  # the second tensor starts inside the first
    encoded = json.dumps(header).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_checkpoint(path)


def test_control_characters_from_a_file_never_reach_the_message(tiny_checkpoint, tmp_path):
    path = tmp_path / "escape.safetensors"
    rewrite_tensors(tiny_checkpoint, path, lambda tensors: tensors.update({"\x1b[2J\x1b[31mred\nline": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="1 unexpected") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message and "\\x1b[31mred\\nline" in message


ODD_VALUES = [None, True, -1, 0, 10**400, -1e308, 1e308, 1e-320, "x", "", [], {}, [[]], {"1": None}, [None, 1]]


def fuzz_bases() -> list[dict]:
    """Configs that between them set every field: plain, with a contrast prior, with every sampling default."""
    contrast = ModelConfig(
        unet=tiny_unet_config(contrast_channel=True),
        schedule=cosine_schedule(100).to_config(),
        parameterization="v",
        normalization={"mean": [0.0], "std": [1.0]},
        particle_contrast=uniform_contrast_prior({1: (-1.0, 1.0), 2: (0.0, 2.0)}),
    ).to_dict()
    contrast["particle_contrast"]["channel_map"] = {"1": [[0.1, 0.5], [0.2, 0.6]]}
    sampling = make_config(
        default_guidance_interval=(1.0, 50.0),
        sampling_density_range=(0.3, 100.0),
        default_steps={"ddim": 10},
        default_sampler="ddim",
        sde_sigma_min=0.1,
        sampling_sigma_max=80.0,
    ).to_dict()
    sampling["high_noise_expert"] = None  # written by earlier versions, dropped on reading
    return [make_config().to_dict(), contrast, sampling]


def value_paths(value, prefix=()):
    """The paths (key sequences) of every value nested in ``value``, the first three items of long lists only."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value[:3]))
    else:
        items = []
    for key, child in items:
        yield (*prefix, key)
        yield from value_paths(child, (*prefix, key))


def test_every_odd_value_in_every_field_gives_a_checkpoint_error(tmp_path):
    path = tmp_path / "fuzz.safetensors"
    versions = {"package": "0", "torch": "0", "safetensors": "0"}
    for base in fuzz_bases():
        for keys in value_paths(base):
            for value in [*ODD_VALUES, "deleted"]:
                config = copy.deepcopy(base)
                parent = config
                for key in keys[:-1]:
                    parent = parent[key]
                if value == "deleted":
                    del parent[keys[-1]]
                else:
                    parent[keys[-1]] = value
                document = {"format_version": 1, "versions": versions, "config": config}
                metadata = {METADATA_KEY: json.dumps(document)}
                try:
                    # The metadata step of load_checkpoint, on the text a file would hold.
                    checkpoint._parse_metadata(path, metadata)
                except CheckpointError:
                    pass
                except Exception as err:  # the test reports it
                    pytest.fail(f"{keys} = {value!r}: {type(err).__name__}: {err}")


def test_a_stale_temporary_file_of_a_killed_save_is_removed(tmp_path, tiny_checkpoint):
    from napari_iscat_diffusion.io import atomic

    target = tmp_path / "model.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".{target.name}.{atomic._HOST}-{dead_pid}-0123456789ab.tmp"
    live = tmp_path / f".{target.name}.{atomic._HOST}-{os.getpid()}-0123456789ab.tmp"
    other_host = tmp_path / f".{target.name}.00000000-{dead_pid}-0123456789ab.tmp"
    other_target = tmp_path / f".other.safetensors.{atomic._HOST}-{dead_pid}-0123456789ab.tmp"
    for leftover in (stale, live, other_host, other_target):
        leftover.write_bytes(b"half a checkpoint")
    save_tiny_checkpoint(target)
    assert not stale.exists()
    assert live.exists() and other_host.exists() and other_target.exists()
    load_checkpoint(target)


def contrast_config(**prior_fields) -> dict:
    """The config of a tiny model with a contrast channel, as JSON, with ``prior_fields`` in its prior."""
    config = fuzz_bases()[1]
    config["particle_contrast"].update(prior_fields)
    return config


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        (contrast_config(scale=1e-300), "particle_contrast.scale: must be from"),
        (contrast_config(quantiles={"1": [1e300] * 129, "2": [0.0] * 129}), "contrasts of magnitude at most"),
        (contrast_config(channel_map={"1": [[0.1, 0.2], [1e300, 1e300]]}), "contrasts of magnitude at most"),
    ],
)
def test_contrasts_that_would_make_the_image_non_finite_are_refused(config, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        ModelConfig.from_dict(config)


@pytest.mark.parametrize(
    "config",
    [
        contrast_config(scale=1e-6, quantiles={"1": [-1e6] * 129, "2": [1e6] * 129}),
        {**fuzz_bases()[0], "normalization": {"mean": [-1e15], "std": [1e-15]}, "default_guidance": 100.0},
        {**fuzz_bases()[0], "normalization": {"mean": [1e15], "std": [1e15]}, "sampling_density_range": [1e-30, 1e30]},
    ],
)
def test_configs_at_the_bounds_still_generate_finite_images(config):
    model_config = ModelConfig.from_dict(config)
    model = LoadedModel(
        net=perturbed_net(model_config.unet), config=model_config, path=None, sha256="0" * 64, versions={}
    )
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8], mask[10:13, 9:12] = 1, 2
    assert np.isfinite(generate(mask, model, steps=3, device="cpu")).all()


def test_the_writer_named_in_a_newer_format_message_is_escaped(tiny_checkpoint, tmp_path):
    document = tiny_document(tiny_checkpoint)
    document["format_version"] += 1
    document["versions"]["package"] = "\x1b]0;owned\x07"
    path = tmp_path / "newer.safetensors"
    write_with_metadata(path, tiny_checkpoint, json.dumps(document))
    with pytest.raises(CheckpointError, match="newer than format") as info:
        load_checkpoint(path)
    assert "\x1b" not in str(info.value) and "\x07" not in str(info.value)


def test_the_recorded_format_version_cannot_be_overridden_by_the_versions(tiny_checkpoint, tmp_path):
    document = tiny_document(tiny_checkpoint)
    document["versions"]["format_version"] = "99"
    path = tmp_path / "versions.safetensors"
    write_with_metadata(path, tiny_checkpoint, json.dumps(document))
    assert load_checkpoint(path).versions["format_version"] == 1
