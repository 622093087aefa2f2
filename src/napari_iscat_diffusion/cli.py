"""The ``iscat-diffusion`` command line: generate, export, simulate, dataset check, info, evaluate, calibrate,
calibrate-contrast.

Each command imports what it needs when it runs, so ``iscat-diffusion --help`` answers at once.
Errors in the user's input end the command with a one-line message and exit status 2; nothing
is left half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .io.atomic import atomic_open, atomic_write_text
from .io.output_paths import check_new_file
from .terminal import printable_line

if TYPE_CHECKING:  # imported when a command runs, so that --help answers at once
    from .synthetic import SamplerSettings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    # tifffile logs what it finds odd in a damaged file to stderr; the command's own one-line error says what is wrong.
    tifffile_log = logging.getLogger("tifffile")
    if not tifffile_log.handlers:
        tifffile_log.addHandler(logging.NullHandler())
    try:
        return args.run(args)
    # OSError: what the file system refuses about a path the user gave (a name too long, no permission, a full disk).
    except (ValueError, OSError) as err:
        print(f"iscat-diffusion {args.command}: error: {printable_line(str(err))}", file=sys.stderr)
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

    generate = commands.add_parser(
        "generate",
        help="synthetic iSCAT image(s) that follow a mask TIFF",
        description="Sample synthetic iSCAT images for a label mask (H, W) or a stack of masks (N, H, W) and write "
        "them as one float32 TIFF in the physical units of the model's training data.",
    )
    generate.add_argument("--mask", type=Path, required=True, help="label mask TIFF: 0 background, 1..K classes")
    generate.add_argument("--out", type=Path, required=True, help="output TIFF (never overwritten)")
    generate.add_argument("--n", type=_count_argument, default=1, help="samples per mask [1]")
    generate.add_argument(
        "--particle-contrast",
        type=Path,
        default=None,
        metavar="TIFF",
        help="models with a contrast channel: a float TIFF of the mask's shape whose value of largest magnitude "
        "over each particle's blob is its peak contrast (the images' units); NaN blobs, and every particle without "
        "this option, get one drawn from the model's distribution for the class (keep --guidance 1: guidance "
        "brightens given particles)",
    )
    _add_sampler_arguments(generate)
    generate.set_defaults(run=_run_generate)

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

    info = commands.add_parser(
        "info",
        help="versions, devices and bundled models, or what a checkpoint holds",
        description="Without a checkpoint: package, Python and torch versions, the devices torch finds and the "
        "bundled models. With one: what the checkpoint (.safetensors) holds, and its sha256.",
    )
    info.add_argument("checkpoint", type=Path, nargs="?", help="a .safetensors checkpoint to describe")
    info.set_defaults(run=_run_info)
    _add_export_parser(commands)
    _add_evaluate_parser(commands)
    _add_calibrate_parser(commands)
    _add_calibrate_contrast_parser(commands)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    from .diffusion.checkpoint import load_checkpoint
    from .diffusion.generate import GenerationProgress
    from .io import tiff_pairs
    from .synthetic import synthesize

    check_new_file(args.out, "--out")
    _check_output_size(args, math.prod(tiff_pairs.tiff_shape(args.mask)), 1)  # before a small file expands
    masks = tiff_pairs.read_mask(args.mask, allow_stack=True)
    contrasts = None if args.particle_contrast is None else tiff_pairs.read_image(args.particle_contrast)
    model = load_checkpoint(_checkpoint_path(args.checkpoint))
    _check_output_size(args, masks.size, model.config.image_channels)
    settings = _sampler_settings(args, args.device)

    with _progress_bar("step") as show:

        def report(progress: GenerationProgress) -> None:
            show("generate", progress.completed, progress.total)

        result = synthesize(
            masks,
            model,
            settings,
            samples=args.n,
            callback=report,
            name=str(args.mask),
            particle_contrast=contrasts,
            contrast_name=str(args.particle_contrast),
        )
    # Samples, then planes (then channels of multi-channel models) follow each other along one axis.
    images = result.images.reshape(-1, *masks.shape[-2:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tiff_pairs.write_tiff(args.out, images[0] if len(images) == 1 else images, pixel_size_nm=model.config.pixel_size_nm)
    print(f"wrote {len(images)} image(s) of {masks.shape[-2]}x{masks.shape[-1]} px to {args.out} ({model.summary()})")
    return 0


def _check_output_size(args: argparse.Namespace, mask_pixels: int, channels: int) -> None:
    """ValueError when ``generate``'s images of a mask of ``mask_pixels`` pixels would not fit one TIFF file."""
    from .io.tiff_pairs import MAX_TIFF_BYTES

    size = args.n * mask_pixels * channels * 4  # float32 pixels
    if size > MAX_TIFF_BYTES:
        raise ValueError(
            f"--n {args.n} images per mask of {args.mask} make {size / 2**30:.1f} GiB, more than one TIFF file holds "
            f"({MAX_TIFF_BYTES >> 30} GiB); use fewer, or the export command, which writes one file per image"
        )


def _sampler_settings(args: argparse.Namespace, device: str) -> SamplerSettings:
    """The sampler options of ``_add_sampler_arguments`` as ``SamplerSettings`` on ``device``."""
    from .synthetic import SamplerSettings

    return SamplerSettings(
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        class_guidance=args.class_guidance,
        guidance_interval=args.guidance_interval,
        seed=args.seed,
        device=device,
        precision=args.precision,
        batch_size=args.batch_size,
    )


def _checkpoint_path(choice: str | None) -> Path:
    """The checkpoint file for --checkpoint: a bundled model's name, a path, or None for the bundled default."""
    from .models import bundled_checkpoints

    bundled = bundled_checkpoints()
    if choice is None:
        if not bundled:
            raise ValueError("no bundled model ships with this version; pass --checkpoint FILE.safetensors")
        return next(iter(bundled.values()))
    return bundled.get(choice, Path(choice))


def _add_sampler_arguments(parser: argparse.ArgumentParser, *, guidance: bool = True, interval: bool = True) -> None:
    """The model and sampler options that generate, export, evaluate and calibrate share (calibrate chooses the
    guidance itself: ``guidance=False`` leaves the scales out; an unguided command leaves out the interval too)."""
    parser.add_argument(
        "--checkpoint", default=None, help="a .safetensors checkpoint or the name of a bundled model [bundled default]"
    )
    parser.add_argument(
        "--sampler", default=None, help="ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, euler or heun [the model's default]"
    )
    parser.add_argument(
        "--steps", type=_count_argument, default=None, help="sampler steps [the model's default for the sampler]"
    )
    if guidance:
        parser.add_argument(
            "--guidance", type=_guidance_argument, default=None, help="guidance scale [the model's default]"
        )
        parser.add_argument(
            "--class-guidance",
            type=_class_guidance_argument,
            default=None,
            metavar="K=W,...",
            help="guidance around the particles of single classes, e.g. 1=1.0,3=2.0; 'none' for --guidance "
            "everywhere [the model's calibrated values]",
        )
    if interval:
        parser.add_argument(
            "--guidance-interval",
            type=_guidance_interval_argument,
            default=None,
            metavar="LOW,HIGH",
            help="guide only at noise levels LOW < sigma <= HIGH (normalised units), the other steps run one "
            "network pass instead of two; 'all' for every step [the model's default]",
        )
    parser.add_argument(
        "--seed", type=_seed_argument, default=0, help="seed of the first image; image i uses seed + i [0]"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps [auto]")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 [auto]")
    parser.add_argument("--batch-size", type=_count_argument, default=4, help="images per forward pass [4]")


def _count_argument(text: str) -> int:
    """A whole number of at least 1 (steps, images, batch size), with the parser's own message otherwise."""
    count = _whole_number(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def _seed_argument(text: str) -> int:
    """A seed from 0 to ``LARGEST_SEED``, with the parser's own message otherwise."""
    from .diffusion.generate import LARGEST_SEED

    seed = _whole_number(text)
    if not 0 <= seed <= LARGEST_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {seed}")
    return seed


def _whole_number(text: str) -> int:
    """``text`` as an int; ArgumentTypeError quoting it otherwise."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _guidance_argument(text: str) -> float:
    """--guidance as a number from 0 to ``guidance.MAX_GUIDANCE``, with the parser's own message otherwise."""
    from .diffusion.guidance import check_guidance_scale

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_guidance_scale(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _class_guidance_argument(text: str) -> dict[int, float]:
    """--class-guidance parsed, with the parser's own message on a bad value."""
    from .diffusion.guidance import parse_class_guidance

    try:
        return parse_class_guidance(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _guidance_interval_argument(text: str) -> tuple[float, float]:
    """--guidance-interval parsed, with the parser's own message on a bad value."""
    from .diffusion.guidance import parse_guidance_interval

    try:
        return parse_guidance_interval(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="batch-export synthetic image/mask TIFF pairs for random masks or a folder of masks",
        description="Write synthetic iSCAT image/mask pairs as OUT/images/NAME.tif, OUT/masks/NAME.tif and "
        "OUT/manifest.csv (provenance per pair, also stored in each TIFF's ImageJ Info). Exporting again into OUT "
        "resumes and never overwrites; one export at a time writes to OUT. Under torchrun (RANK, WORLD_SIZE) the "
        "processes share the pairs and make the same files as one process.",
    )
    export.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    # --count because torchrun's own parser takes a bare --n as an abbreviation of its --nnodes
    export.add_argument(
        "--n", "--count", dest="n", type=int, default=None, help="number of random masks (or give --masks)"
    )
    export.add_argument("--size", type=int, nargs="+", default=[256], metavar="PX", help="random masks: H [W] [256]")
    export.add_argument("--masks", type=Path, default=None, help="a folder of mask TIFFs instead of random masks")
    export.add_argument("--particles", type=int, default=20, help="random masks: particles per mask [20]")
    export.add_argument(
        "--class-proportions",
        type=float,
        nargs="+",
        default=None,
        metavar="P",
        help="random masks: relative frequency of classes 1..K [equal for the model's classes]",
    )
    export.add_argument("--samples-per-mask", type=int, default=1, help="images per mask [1]")
    export.add_argument(
        "--preview", type=Path, default=None, help="also write a .png of the first pairs (mask | image), replacing it"
    )
    _add_sampler_arguments(export)
    export.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:

    from .diffusion.checkpoint import load_checkpoint
    from .export import (
        ExportProgress,
        check_output_paths,
        count_pairs,
        export_pairs,
        masks_from_folder,
        merge_manifests,
        random_masks,
        write_preview,
    )

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if (args.n is None) == (args.masks is None):
        raise ValueError("give either --n (random masks) or --masks FOLDER")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if len(args.size) > 2:
        raise ValueError(f"--size takes H or H W, got {len(args.size)} numbers")
    if not all(1 <= side <= 8192 for side in args.size):
        raise ValueError(f"--size: sides of 1 to 8192 pixels, got {' '.join(map(str, args.size))}")
    if args.samples_per_mask < 1:
        raise ValueError(f"--samples-per-mask must be at least 1, got {args.samples_per_mask}")
    check_output_paths(args.out, args.preview)
    # the file list and the pair names are checked before the model loads; each mask is read when its turn comes
    folder_masks = None if args.masks is None else masks_from_folder(args.masks)
    model = load_checkpoint(_checkpoint_path(args.checkpoint))
    if folder_masks is not None:
        masks = folder_masks
    else:
        proportions = args.class_proportions or [1.0] * model.config.num_classes
        size = (args.size[0], args.size[-1])
        masks = random_masks(args.n, size, particles=args.particles, class_proportions=proportions, seed=args.seed)
    device = args.device
    if device == "auto" and world_size > 1:
        device = _rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    settings = _sampler_settings(args, device)

    label = "export" if world_size == 1 else f"export (rank 0 of {world_size})"

    with _process_group(world_size) as all_sum:
        with _progress_bar("pair", disable=rank != 0) as show:

            def report(progress: ExportProgress) -> None:
                show(label, progress.pairs_done, progress.pairs_total, f"step {progress.step}/{progress.steps}")

            summary = export_pairs(
                masks,
                model,
                args.out,
                settings,
                samples_per_mask=args.samples_per_mask,
                callback=report,
                rank=rank,
                world_size=world_size,
            )
            pairs = summary.written + summary.skipped
            show(label, pairs, pairs)  # the last pair done: no step count
        # every rank reaches this sum only after its pairs are written: rank 0 then merges what all of them made
        written, skipped = all_sum([summary.written, summary.skipped])
    if rank != 0:
        return 0
    manifest = merge_manifests(args.out)
    if args.preview is not None:
        write_preview(args.out, args.preview)
    listed = count_pairs(args.out)
    print(f"wrote {written} pair(s), skipped {skipped} finished; {manifest} lists {listed} pair(s)")
    return 0


def _rank_device(local_rank: int) -> str:
    """One GPU per process under torchrun; the automatic choice otherwise."""
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "auto"


@contextlib.contextmanager
def _process_group(world_size: int) -> Iterator[Callable[[list[int]], list[int]]]:
    """Yield a function that sums integers over all processes (gloo under torchrun; the identity for one process)."""
    if world_size == 1:
        yield lambda values: values
        return
    import datetime

    import torch
    import torch.distributed as dist

    # ranks wait for the slowest one before the manifests are merged; a resumed rank may wait for hours
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
    try:

        def all_sum(values: list[int]) -> list[int]:
            tensor = torch.tensor(values, dtype=torch.int64)
            dist.all_reduce(tensor)
            return tensor.tolist()

        yield all_sum
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _progress_bar(unit: str, *, disable: bool = False) -> Iterator[Callable[..., None]]:
    """Yield ``show(label, done, total, postfix="")``, which draws a tqdm bar of ``unit`` on stderr: a new bar when
    the label or the total changes or the count starts over (each stage of an evaluation); the bar ends with the
    block, so an error message gets a line of its own. Nothing is drawn with ``disable``."""
    from tqdm import tqdm

    bar = None

    def show(label: str, done: int, total: int, postfix: str = "") -> None:
        nonlocal bar
        if disable:
            return
        if bar is None or bar.desc != label or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix_str(postfix, refresh=False)
        bar.update(done - bar.n)

    try:
        yield show
    finally:
        if bar is not None:
            bar.close()


def _run_simulate(args: argparse.Namespace) -> int:
    from .io.tiff_pairs import write_tiff
    from .iscat.simulate import parameters_from_cli, simulate

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
    with atomic_open(table_path, "w", newline="") as table, _progress_bar("pair") as show:
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
    from .io.dataset_check import check_dataset

    report = check_dataset(args.path, num_classes=args.classes)
    print(report.format())
    return 0 if report.ok else 1


def _run_info(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .diffusion.checkpoint import load_checkpoint
    from .diffusion.guidance import format_class_guidance, format_guidance_interval
    from .diffusion.samplers import SAMPLERS
    from .terminal import printable

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

    from .diffusion.checkpoint import load_checkpoint
    from .models import bundled_checkpoints

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


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="measure a model's quality on held-out simulator masks (JSON report)",
        description="Generate images for held-out simulator masks and compare them with the simulator's images: "
        "mask fidelity (detected particles vs mask), peak contrast per class, background noise, power spectrum, "
        "a classifier two-sample test, diversity and edited masks. See docs/evaluation.md.",
    )
    evaluate.add_argument("--out", type=Path, required=True, help="output JSON file (never overwritten)")
    evaluate.add_argument("--n", type=int, default=None, help="held-out masks and reference images [288]")
    evaluate.add_argument("--size", type=int, default=128, help="image side in pixels [128]")
    _add_sampler_arguments(evaluate)
    evaluate.add_argument(
        "--curves",
        action="store_true",
        help="also write metrics against steps (every sampler) and guidance next to --out (JSON, markdown, PNG)",
    )
    evaluate.add_argument("--curves-n", type=int, default=16, help="masks per point of the curves [16]")
    evaluate.add_argument(
        "--classifier-seeds",
        type=int,
        default=1,
        help="repeat the two-sample test with this many classifier seeds and report their spread [1]",
    )
    evaluate.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .diffusion.checkpoint import load_checkpoint
    from .evaluation import evaluate_model, metric_curves, run_metadata, write_curves
    from .evaluation.evaluate import DEFAULT_N

    check_new_file(args.out, "--out")
    args.n = DEFAULT_N if args.n is None else args.n
    if args.n < 4 or args.curves_n < 4:
        raise ValueError(f"--n and --curves-n must be at least 4, got {args.n} and {args.curves_n}")
    if args.classifier_seeds < 1:
        raise ValueError(f"--classifier-seeds must be at least 1, got {args.classifier_seeds}")
    if args.curves and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--curves draws its figures with matplotlib: pip install 'napari-iscat-diffusion[plots]'")
    model = load_checkpoint(_checkpoint_path(args.checkpoint))
    options = _measurement_options(args)
    report = {**run_metadata(), "checkpoint": {"summary": model.summary(), "sha256": model.sha256}}
    with _progress_bar("step") as show:
        report["metrics"] = evaluate_model(
            model,
            n=args.n,
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            class_guidance=args.class_guidance,
            guidance_interval=args.guidance_interval,
            classifier_seeds=args.classifier_seeds,
            progress=show,
            **options,
        )
        curves = metric_curves(model, n=args.curves_n, progress=show, **options) if args.curves else None
    if curves is not None:
        written = write_curves({**run_metadata(), **curves}, args.out.with_name(f"{args.out.stem}_curves"))
        print(f"wrote {len(written)} curve files to {written[0].parent}")
    _write_report(args.out, report)
    print(_evaluation_summary(report["metrics"]))
    return 0


def _add_calibrate_parser(commands: argparse._SubParsersAction) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="find the guidance scale at which each class's contrast matches the simulator (JSON report)",
        description="Generate a calibration set of simulator masks (seeds apart from training and evaluation) at "
        "several uniform guidance scales and measure each class's peak-contrast distance to the simulator's "
        "images. --save writes a copy of the checkpoint whose per-class guidance is the best scale of each class.",
    )
    calibrate.add_argument("--out", type=Path, required=True, help="output JSON file (never overwritten)")
    calibrate.add_argument("--save", type=Path, default=None, help="write the calibrated checkpoint here (new file)")
    calibrate.add_argument("--n", type=int, default=None, help="calibration masks [144]")
    calibrate.add_argument("--size", type=int, default=128, help="image side in pixels [128]")
    calibrate.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="uniform guidance scales to try [0.5 to 3 in steps of 0.5]",
    )
    _add_sampler_arguments(calibrate, guidance=False)
    calibrate.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    import dataclasses

    from .diffusion.checkpoint import load_checkpoint, save_checkpoint
    from .diffusion.guidance import format_class_guidance, format_guidance_interval
    from .evaluation import run_metadata
    from .evaluation.calibration import DEFAULT_N, DEFAULT_SCALES, calibrate_class_guidance

    _check_report_and_save(args)
    model = load_checkpoint(_checkpoint_path(args.checkpoint))
    with _progress_bar("step") as show:
        result = calibrate_class_guidance(
            model,
            scales=args.scales or DEFAULT_SCALES,
            n=DEFAULT_N if args.n is None else args.n,
            sampler=args.sampler,
            steps=args.steps,
            guidance_interval=args.guidance_interval,
            progress=show,
            **_measurement_options(args),
        )
    report = {**run_metadata(), "checkpoint": {"summary": model.summary(), "sha256": model.sha256}, **result}
    _write_report(args.out, report)
    scales = ", ".join(f"{s:g}" for s in result["settings"]["scales"])
    for label, distances in result["contrast_w_rel"].items():
        shown = ", ".join("-" if d is None else f"{d:.2f}" for d in distances)
        floor = result["reference_floor"].get(label)
        floor_text = "" if floor is None else f" (two simulator sets: {floor:.2f})"
        print(f"class {label}: contrast W/spread at w = {scales}: {shown}{floor_text}")
    best = {int(label): scale for label, scale in result["best"].items()}
    print(f"best per-class guidance: {format_class_guidance(best)}")
    for label in result["at_grid_edge"]:
        print(f"class {label}: the best scale is at the edge of --scales; its optimum may lie beyond it")
    if args.save is not None:
        interval = model.config.default_guidance_interval if args.guidance_interval is None else args.guidance_interval
        config = dataclasses.replace(model.config, default_class_guidance=best, default_guidance_interval=interval)
        digest = save_checkpoint(args.save, model.net, config, dtype=model.storage_dtype)
        print(
            f"wrote {args.save} (sha256 {digest[:12]}) with per-class guidance {format_class_guidance(best)}, "
            f"guided at noise levels {format_guidance_interval(config.default_guidance_interval)}"
        )
    return 0


def _add_calibrate_contrast_parser(commands: argparse._SubParsersAction) -> None:
    calibrate = commands.add_parser(
        "calibrate-contrast",
        help="fit a contrast-channel model's map so that drawn particle contrasts come out as in its training data",
        description="For a model trained with model.contrast_channel: generate images for simulator masks "
        "(calibration seeds) with each particle's peak drawn from the model's distributions, unguided, measure the "
        "generated peaks and move the channel values until each class's generated peak magnitudes follow its "
        "distribution (quantile mapping, --rounds times). --save writes a copy of the checkpoint with the map.",
    )
    calibrate.add_argument("--out", type=Path, required=True, help="output JSON file (never overwritten)")
    calibrate.add_argument("--save", type=Path, default=None, help="write the calibrated checkpoint here (new file)")
    calibrate.add_argument("--n", type=int, default=None, help="calibration masks [192]")
    calibrate.add_argument("--rounds", type=int, default=None, help="map updates; each generates the set once more [5]")
    calibrate.add_argument("--size", type=int, default=128, help="image side in pixels [128]")
    _add_sampler_arguments(calibrate, guidance=False, interval=False)
    calibrate.set_defaults(run=_run_calibrate_contrast)


def _run_calibrate_contrast(args: argparse.Namespace) -> int:
    import dataclasses

    from .diffusion.checkpoint import load_checkpoint, save_checkpoint
    from .evaluation import run_metadata
    from .evaluation.calibration import CALIBRATION_SEED
    from .evaluation.contrast_calibration import DEFAULT_N, DEFAULT_ROUNDS, calibrate_contrast_channel
    from .evaluation.evaluate import simulated_set, simulation_parameters_for

    _check_report_and_save(args)
    path = _checkpoint_path(args.checkpoint)
    model = load_checkpoint(path)
    if model.config.particle_contrast is None:
        raise ValueError(f"{path}: this model has no contrast channel (model.contrast_channel); nothing to calibrate")
    n = DEFAULT_N if args.n is None else args.n
    options = _measurement_options(args)
    masks = simulated_set(simulation_parameters_for(model, options.pop("size")), n, CALIBRATION_SEED).masks
    with _progress_bar("step") as show:
        prior, result = calibrate_contrast_channel(
            model,
            masks,
            rounds=DEFAULT_ROUNDS if args.rounds is None else args.rounds,
            sampler=args.sampler,
            steps=args.steps,
            progress=show,
            **options,
        )
    result["settings"]["mask_seeds"] = f"{CALIBRATION_SEED}..{CALIBRATION_SEED + n - 1}"
    report = {
        **run_metadata(),
        "checkpoint": {"summary": model.summary(), "sha256": model.sha256},
        **result,
        "channel_map": prior.to_dict().get("channel_map"),
    }
    _write_report(args.out, report)
    for index, measured in enumerate(result["rounds"]):
        rows = "; ".join(
            f"class {label} W/spread {_number(row['relative_to_spread'])}, median {_number(row['median_ratio'])}, "
            f"range {_number(row['range_ratio'])}"
            for label, row in measured.items()
        )
        print(f"round {index}{' (no map)' if index == 0 else ''}: {rows}")
    for label, correlation in result["left"].items():
        shown = "-" if correlation is None else f"{correlation:.2f}"
        print(f"class {label} left unmapped: its peaks follow the channel with correlation {shown}")
    for label, levels in result["floored"].items():
        print(
            f"class {label}: at the quantiles {', '.join(f'{level:.2f}' for level in levels)} the network draws the "
            "particles too bright whatever the channel says; the map holds them at its floor"
        )
    if args.save is not None and prior.channel_map is None:
        print(f"no class could be mapped; {args.save} not written")
    elif args.save is not None:
        config = dataclasses.replace(model.config, particle_contrast=prior)
        digest = save_checkpoint(args.save, model.net, config, dtype=model.storage_dtype)
        print(
            f"wrote {args.save} (sha256 {digest[:12]}) with the contrast map for classes {', '.join(result['mapped'])}"
        )
    return 0


def _check_report_and_save(args: argparse.Namespace) -> None:
    """Check, before the work, that the report (``--out``) and the calibrated model (``--save``) can be written."""
    check_new_file(args.out, "--out")
    if args.save is not None:
        check_new_file(args.save, "--save")


def _write_report(path: Path, report: dict) -> None:
    """Write a JSON report atomically (its folder created) and say so."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")


def _measurement_options(args: argparse.Namespace) -> dict:
    """The image size and generation options that evaluate and calibrate share."""
    return {
        "size": args.size,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
    }


def _number(value: float | None) -> str:
    """A measured number to 3 decimals, "-" where there is none."""
    return "-" if value is None else f"{value:.3f}"


def _evaluation_summary(metrics: dict) -> str:
    """Per class F1 and peak-contrast distance (with its bootstrap standard error and the reference floor) and the
    contrasts' median and 10-90 % range over the simulator's, the background's noise and line-pattern ratios, each
    class's surroundings, the power spectrum's largest ratio, and the C2ST accuracy, a line each."""
    from .evaluation.statistics import median_ratio

    fidelity = metrics["fidelity"]["per_class"]
    contrast = metrics["physics"]["peak_contrast"]
    floor = metrics["reference_floor"]["peak_contrast"]
    lines = [
        f"class {k}: F1 {_number(fidelity[k]['f1']) if k in fidelity else '-'}, "
        f"contrast W/spread {_number(contrast[k]['relative_to_spread'])} "
        f"+- {_number(contrast[k].get('relative_to_spread_se'))} "
        f"(two simulator sets: {_number(floor.get(k, {}).get('relative_to_spread'))}), "
        f"median {_number(median_ratio(contrast[k]))} and range {_number(contrast[k]['range_ratio'])} "
        "of the simulator's"
        for k in contrast
    ]
    physics, floor_physics = metrics["physics"], metrics["reference_floor"]
    ratios = [("noise", physics["background_noise"], floor_physics["background_noise"])]
    ratios += [
        (f"{name} pattern", physics["line_pattern"][name], floor_physics["line_pattern"][name])
        for name in ("columns", "rows")
    ]
    lines.append(
        "background / simulator: "
        + ", ".join(
            f"{label} {_number(ours['ratio'])} (two simulator sets: {_number(chance['ratio'])})"
            for label, ours, chance in ratios
        )
    )
    around, chance_around = physics["surroundings"], floor_physics["surroundings"]["per_class"]
    bands = ", ".join(f"{low:g}-{high:g}" for low, high in around["bands_psf_radii"])
    for k, values in around["per_class"].items():
        ours = " ".join(_number(r) for r in values["ratio"])
        chance = " ".join(_number(r) for r in chance_around.get(k, {}).get("ratio", []))
        lines.append(
            f"class {k} surroundings / simulator at {bands} PSF radii: {ours} (two simulator sets: {chance or '-'})"
        )
    largest, chance_largest = physics["power_spectrum"]["largest_ratio"], floor_physics["spectrum_largest_ratio"]
    lines.append(
        f"power spectrum / simulator: farthest from 1 at {largest['frequency_cycles_per_px']:.3f} cycles/px, "
        f"{_number(largest['ratio'])} (two simulator sets: {_number(chance_largest['ratio'])} at "
        f"{chance_largest['frequency_cycles_per_px']:.3f})"
    )
    if "c2st" in metrics:
        chance = metrics["reference_floor"].get("c2st")
        chance_text = "0.5: indistinguishable" if chance is None else f"two simulator sets: {chance['accuracy']:.3f}"
        lines.append(f"C2ST accuracy {metrics['c2st']['accuracy']:.3f} ({chance_text})")
        spread, chance_spread = metrics["c2st"].get("over_seeds"), (chance or {}).get("over_seeds")
        if spread is not None:
            over = f"over {len(spread['seeds'])} classifier seeds: {spread['min']:.3f}-{spread['max']:.3f}"
            if chance_spread is not None:
                over += f" (two simulator sets: {chance_spread['min']:.3f}-{chance_spread['max']:.3f})"
            lines.append(f"C2ST {over}, mean {spread['mean']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
