"""The commands about data and the installation: ``simulate``, ``dataset check`` and ``info``."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .. import __version__
from ..io.atomic import atomic_open
from .arguments import progress_bar


def add_simulate_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` command to the subcommands ``commands``."""
    from ..iscat.simulate import add_cli_arguments

    simulate = commands.add_parser(
        "simulate",
        help="write simulated iSCAT image/mask TIFF pairs and their particle table",
        description="Simulate labelled iSCAT images with the physics simulator and write them as TIFF pairs "
        "(OUT/images/NAME.tif, OUT/masks/NAME.tif) plus OUT/particles.csv.",
    )
    simulate.add_argument("--n", type=int, required=True, help="number of image/mask pairs")
    simulate.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of the first pair; pair i uses seed + i")
    simulate.add_argument("--prefix", default="sim", help="file name prefix (default: sim)")
    add_cli_arguments(simulate)
    simulate.set_defaults(run=_run_simulate)


def add_dataset_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``dataset check`` command to the subcommands ``commands``."""
    dataset = commands.add_parser("dataset", help="inspect training data")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    check = dataset_commands.add_parser(
        "check",
        help="check a TIFF-pair folder or an HDF5 file and print a summary",
        description="Report counts, unmatched names, size and dtype mismatches, mask values, NaNs and empty "
        "masks. Exits with status 1 when there are errors.",
    )
    check.add_argument("path", type=Path, help="folder of TIFF pairs, or .h5/.hdf5 file")
    check.add_argument("--classes", type=int, default=None, help="number of particle classes K (labels 1..K)")
    check.set_defaults(run=_run_dataset_check)


def add_info_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``info`` command to the subcommands ``commands``."""
    info = commands.add_parser(
        "info",
        help="versions, devices and bundled models, or what a checkpoint holds",
        description="Without a checkpoint: package, Python and torch versions, the devices torch finds and the "
        "bundled models. With one: what the checkpoint (.safetensors) holds, and its sha256.",
    )
    info.add_argument("checkpoint", type=Path, nargs="?", help="a .safetensors checkpoint to describe")
    info.set_defaults(run=_run_info)


def _run_simulate(args: argparse.Namespace) -> int:
    from ..io.tiff_pairs import write_tiff
    from ..iscat.simulate import parameters_from_cli, simulate

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    params = parameters_from_cli(args)
    out: Path = args.out
    folders = (out / "images", out / "masks")
    table_path = out / "particles.csv"
    for path in (out, *folders):
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file, not a folder; choose another --out")
    existing = [p for folder in folders if folder.is_dir() for p in folder.glob(f"{args.prefix}_*.tif")]
    existing += [table_path] if table_path.exists() else []
    if existing:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} files in the way); choose another --out")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    particles = 0
    # Rows are written as each pair is made, so memory does not grow with --n; the table appears only when complete.
    with atomic_open(table_path, "w", newline="") as table, progress_bar("pair") as show:
        writer = None
        for i in range(args.n):
            name = f"{args.prefix}_{i:05d}"
            result = simulate(params, args.seed + i)
            write_tiff(folders[0] / f"{name}.tif", result.image, pixel_size_nm=params.pixel_size_nm)
            write_tiff(folders[1] / f"{name}.tif", result.mask, pixel_size_nm=params.pixel_size_nm)
            fields = result.particles.dtype.names
            if writer is None:
                writer = csv.DictWriter(table, fieldnames=["image", *fields])
                writer.writeheader()
            writer.writerows(
                {"image": name, **{field: particle[field].item() for field in fields}} for particle in result.particles
            )
            particles += len(result.particles)
            show("simulate", i + 1, args.n)
    print(f"wrote {args.n} image/mask pairs and {particles} particles to {out}")
    return 0


def _run_dataset_check(args: argparse.Namespace) -> int:
    from ..io.dataset_check import check_dataset

    report = check_dataset(args.path, num_classes=args.classes)
    print(report.format())
    return 0 if report.ok else 1


def _run_info(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from ..diffusion.checkpoint import load_checkpoint
    from ..diffusion.guidance import format_class_guidance, format_guidance_interval
    from ..diffusion.samplers import SAMPLERS
    from ..terminal import printable

    if args.checkpoint is None:
        return _print_environment()
    model = load_checkpoint(args.checkpoint)
    # Text from the file (and its name) is printed with control characters escaped: they could drive the terminal.
    print(f"{printable(str(args.checkpoint), 1000)}: {model.summary()}")
    print(f"sha256 {model.sha256}")
    print(f"written by napari-iscat-diffusion {printable(model.versions.get('package', 'unknown'), 100)}")
    # The model section a training config needs to fine-tune this checkpoint (model.init_from).
    architecture = {
        key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(model.config.unet).items()
    }
    print(f"model: {json.dumps(architecture)}")
    print(f"parameterization: {model.config.parameterization}, schedule: {json.dumps(model.config.schedule)}")
    per_class = format_class_guidance(model.config.default_class_guidance) or "none"
    interval = format_guidance_interval(model.config.default_guidance_interval)
    print(
        f"default guidance: {model.config.default_guidance:g}, per class: {per_class}, guided noise levels: {interval}"
    )
    print(f"DPM-Solver++, Euler and Heun start at sigma {model.sampling_sigma_max:g}")
    densities = model.config.sampling_density_range
    fitted = (
        "log-SNR (no sampling_density_range)"
        if densities is None
        else f"fitted to Gaussian data of spectral density {densities[0]:g}-{densities[1]:g}"
    )
    print(f"DPM-Solver++ 2M sigma grid: {fitted}")
    print("default steps: " + ", ".join(f"{name} {model.default_steps(name)}" for name in SAMPLERS))
    sde = model.config.sde_sigma_min
    noise = "every step" if sde is None else f"steps ending above sigma {sde:g}"
    print(f"default sampler: {model.default_sampler}; the SDE samplers add fresh noise on {noise}")
    return 0


def _print_environment() -> int:
    import platform

    import numpy as np
    import torch

    from ..diffusion.checkpoint import load_checkpoint
    from ..models import bundled_checkpoints

    print(f"napari-iscat-diffusion {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    devices = ["cpu"]
    devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    print(f"devices: {', '.join(devices)}")
    bundled = bundled_checkpoints()
    print(f"bundled models: {len(bundled) or 'none'}")
    for name, path in bundled.items():
        print(f"  {name}: {load_checkpoint(path).summary()}")
    return 0
