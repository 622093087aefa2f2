"""Model and sampler options, argument types, the progress bar and the JSON report that the commands share."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.atomic import atomic_write_text
from ..io.output_paths import check_new_file

if TYPE_CHECKING:  # imported when a command runs, so that --help answers at once
    from ..synthetic import SamplerSettings


def sampler_settings(args: argparse.Namespace, device: str) -> SamplerSettings:
    """The sampler options of ``add_sampler_arguments`` as ``SamplerSettings`` on ``device``."""
    from ..synthetic import SamplerSettings

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


def checkpoint_path(choice: str | None) -> Path:
    """The checkpoint file for --checkpoint: a bundled model's name, a path, or None for the bundled default."""
    from ..models import bundled_checkpoints

    bundled = bundled_checkpoints()
    if choice is None:
        if not bundled:
            raise ValueError("no bundled model ships with this version; pass --checkpoint FILE.safetensors")
        return next(iter(bundled.values()))
    return bundled.get(choice, Path(choice))


def add_sampler_arguments(parser: argparse.ArgumentParser, *, guidance: bool = True, interval: bool = True) -> None:
    """The model and sampler options that generate, export, evaluate and calibrate share (calibrate chooses the
    guidance itself: ``guidance=False`` leaves the scales out; an unguided command leaves out the interval too)."""
    parser.add_argument(
        "--checkpoint", default=None, help="a .safetensors checkpoint or the name of a bundled model [bundled default]"
    )
    parser.add_argument(
        "--sampler", default=None, help="ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, euler or heun [the model's default]"
    )
    parser.add_argument(
        "--steps", type=count_argument, default=None, help="sampler steps [the model's default for the sampler]"
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
        "--seed", type=seed_argument, default=0, help="seed of the first image; image i uses seed + i [0]"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps [auto]")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 [auto]")
    parser.add_argument("--batch-size", type=count_argument, default=4, help="images per forward pass [4]")


def count_argument(text: str) -> int:
    """A whole number of at least 1 (steps, images, batch size), with the parser's own message otherwise."""
    count = _whole_number(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def seed_argument(text: str) -> int:
    """A seed from 0 to ``LARGEST_SEED``, with the parser's own message otherwise."""
    from ..diffusion.generate import LARGEST_SEED

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
    from ..diffusion.guidance import check_guidance_scale

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
    from ..diffusion.guidance import parse_class_guidance

    try:
        return parse_class_guidance(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _guidance_interval_argument(text: str) -> tuple[float, float]:
    """--guidance-interval parsed, with the parser's own message on a bad value."""
    from ..diffusion.guidance import parse_guidance_interval

    try:
        return parse_guidance_interval(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@contextlib.contextmanager
def progress_bar(unit: str, *, disable: bool = False) -> Iterator[Callable[..., None]]:
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


def check_report_and_save(args: argparse.Namespace) -> None:
    """Check, before the work, that the report (``--out``) and the calibrated model (``--save``) can be written."""
    check_new_file(args.out, "--out")
    if args.save is not None:
        check_new_file(args.save, "--save")


def write_report(path: Path, report: dict) -> None:
    """Write a JSON report atomically (its folder created) and say so."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")


def measurement_options(args: argparse.Namespace) -> dict:
    """The image size and generation options that evaluate and calibrate share."""
    return {
        "size": args.size,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
    }
