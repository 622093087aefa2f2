"""The ``iscat-diffusion`` command line: simulate, dataset check, info.

Each command imports what it needs when it runs, so ``iscat-diffusion --help`` answers at once.
Errors in the user's input end the command with a one-line message and exit status 2; nothing
is left half-written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"iscat-diffusion {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iscat-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    from .iscat.simulate import add_cli_arguments

    parser = argparse.ArgumentParser(
        prog="iscat-diffusion", description="Synthetic iSCAT images from segmentation masks, and the data around them."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    info = commands.add_parser("info", help="describe a model checkpoint (.safetensors)")
    info.add_argument("checkpoint", type=Path)
    info.set_defaults(run=_run_info)
    return parser


def _run_simulate(args: argparse.Namespace) -> int:
    from .io.tiff_pairs import write_tiff
    from .iscat.simulate import parameters_from_cli, simulate

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    params = parameters_from_cli(args)
    out: Path = args.out
    names = [f"{args.prefix}_{i:05d}" for i in range(args.n)]
    image_paths = [out / "images" / f"{name}.tif" for name in names]
    mask_paths = [out / "masks" / f"{name}.tif" for name in names]
    table_path = out / "particles.csv"
    existing = [p for p in [*image_paths, *mask_paths, table_path] if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} files in the way); choose another --out")
    for folder in (out / "images", out / "masks"):
        folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    fields: Sequence[str] = ()
    for i, (name, image_path, mask_path) in enumerate(zip(names, image_paths, mask_paths, strict=True)):
        result = simulate(params, args.seed + i)
        write_tiff(image_path, result.image, pixel_size_nm=params.pixel_size_nm)
        write_tiff(mask_path, result.mask, pixel_size_nm=params.pixel_size_nm)
        fields = result.particles.dtype.names
        rows.extend(
            {"image": name, **{field: particle[field].item() for field in fields}} for particle in result.particles
        )
        print(f"\rsimulate: {i + 1}/{args.n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    _write_csv(table_path, rows, ["image", *fields])
    print(f"wrote {args.n} image/mask pairs and {len(rows)} particles to {out}")
    return 0


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def _run_dataset_check(args: argparse.Namespace) -> int:
    from .io.dataset_check import check_dataset

    report = check_dataset(args.path, num_classes=args.classes)
    print(report.format())
    return 0 if report.ok else 1


def _run_info(args: argparse.Namespace) -> int:
    from .diffusion.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    print(f"{args.checkpoint}: {model.summary()}")
    print(f"sha256 {model.sha256}")
    print(f"written by napari-iscat-diffusion {model.versions.get('package', 'unknown')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
