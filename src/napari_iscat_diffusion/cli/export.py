"""``iscat-diffusion export``: batch export of image/mask TIFF pairs, one process or several under torchrun."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .arguments import add_sampler_arguments, checkpoint_path, progress_bar, sampler_settings


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``export`` command to the subcommands ``commands``."""
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
    add_sampler_arguments(export)
    export.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:

    from ..diffusion.checkpoint import load_checkpoint
    from ..export import (
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
    model = load_checkpoint(checkpoint_path(args.checkpoint))
    if folder_masks is not None:
        masks = folder_masks
    else:
        proportions = args.class_proportions or [1.0] * model.config.num_classes
        size = (args.size[0], args.size[-1])
        masks = random_masks(args.n, size, particles=args.particles, class_proportions=proportions, seed=args.seed)
    device = args.device
    if device == "auto" and world_size > 1:
        device = _rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    settings = sampler_settings(args, device)

    label = "export" if world_size == 1 else f"export (rank 0 of {world_size})"

    with _process_group(world_size) as all_sum:
        with progress_bar("pair", disable=rank != 0) as show:

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
