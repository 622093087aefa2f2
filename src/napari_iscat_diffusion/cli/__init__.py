"""The ``iscat-diffusion`` command line: generate, export, simulate, dataset check, info, evaluate, calibrate,
calibrate-contrast.

Each command imports what it needs when it runs, so ``iscat-diffusion --help`` answers at once.
Errors in the user's input end the command with a one-line message and exit status 2; nothing
is left half-written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..terminal import printable_line
from .data import add_dataset_parser, add_info_parser, add_simulate_parser
from .evaluate import add_calibrate_contrast_parser, add_calibrate_parser, add_evaluate_parser
from .export import add_export_parser
from .generate import add_generate_parser


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
    parser = argparse.ArgumentParser(
        prog="iscat-diffusion", description="Synthetic iSCAT images from segmentation masks, and the data around them."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (
        add_generate_parser,
        add_simulate_parser,
        add_dataset_parser,
        add_info_parser,
        add_export_parser,
        add_evaluate_parser,
        add_calibrate_parser,
        add_calibrate_contrast_parser,
    ):
        add_parser(commands)
    return parser
