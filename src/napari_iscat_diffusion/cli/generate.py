"""``iscat-diffusion generate``: synthetic images for a mask TIFF, written as one TIFF."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..io.output_paths import check_new_file
from .arguments import add_sampler_arguments, checkpoint_path, count_argument, progress_bar, sampler_settings


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command to the subcommands ``commands``."""
    generate = commands.add_parser(
        "generate",
        help="synthetic iSCAT image(s) that follow a mask TIFF",
        description="Sample synthetic iSCAT images for a label mask (H, W) or a stack of masks (N, H, W) and write "
        "them as one float32 TIFF in the physical units of the model's training data.",
    )
    generate.add_argument("--mask", type=Path, required=True, help="label mask TIFF: 0 background, 1..K classes")
    generate.add_argument("--out", type=Path, required=True, help="output TIFF (never overwritten)")
    generate.add_argument("--n", type=count_argument, default=1, help="samples per mask [1]")
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
    add_sampler_arguments(generate)
    generate.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from ..diffusion.checkpoint import load_checkpoint
    from ..diffusion.generate import GenerationProgress
    from ..io import tiff_pairs
    from ..synthetic import synthesize

    check_new_file(args.out, "--out")
    _check_output_size(args, math.prod(tiff_pairs.tiff_shape(args.mask)), 1)  # before a small file expands
    masks = tiff_pairs.read_mask(args.mask, allow_stack=True)
    contrasts = None if args.particle_contrast is None else tiff_pairs.read_image(args.particle_contrast)
    model = load_checkpoint(checkpoint_path(args.checkpoint))
    _check_output_size(args, masks.size, model.config.image_channels)
    settings = sampler_settings(args, args.device)

    with progress_bar("step") as show:

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
    from ..io.tiff_pairs import MAX_TIFF_BYTES

    size = args.n * mask_pixels * channels * 4  # float32 pixels
    if size > MAX_TIFF_BYTES:
        raise ValueError(
            f"--n {args.n} images per mask of {args.mask} make {size / 2**30:.1f} GiB, more than one TIFF file holds "
            f"({MAX_TIFF_BYTES >> 30} GiB); use fewer, or the export command, which writes one file per image"
        )
