"""The measuring commands: ``evaluate``, ``calibrate`` and ``calibrate-contrast`` (JSON reports)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..io.output_paths import check_new_file
from .arguments import (
    add_sampler_arguments,
    check_report_and_save,
    checkpoint_path,
    measurement_options,
    progress_bar,
    write_report,
)


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command to the subcommands ``commands``."""
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
    add_sampler_arguments(evaluate)
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
    from ..diffusion.checkpoint import load_checkpoint
    from ..evaluation import evaluate_model, metric_curves, run_metadata, write_curves
    from ..evaluation.evaluate import DEFAULT_N
    from ..evaluation.summary import evaluation_summary

    check_new_file(args.out, "--out")
    args.n = DEFAULT_N if args.n is None else args.n
    if args.n < 4 or args.curves_n < 4:
        raise ValueError(f"--n and --curves-n must be at least 4, got {args.n} and {args.curves_n}")
    if args.classifier_seeds < 1:
        raise ValueError(f"--classifier-seeds must be at least 1, got {args.classifier_seeds}")
    if args.curves and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--curves draws its figures with matplotlib: pip install 'napari-iscat-diffusion[plots]'")
    model = load_checkpoint(checkpoint_path(args.checkpoint))
    options = measurement_options(args)
    report = {**run_metadata(), "checkpoint": {"summary": model.summary(), "sha256": model.sha256}}
    with progress_bar("step") as show:
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
    write_report(args.out, report)
    print(evaluation_summary(report["metrics"]))
    return 0


def add_calibrate_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` command to the subcommands ``commands``."""
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
    add_sampler_arguments(calibrate, guidance=False)
    calibrate.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    import dataclasses

    from ..diffusion.checkpoint import load_checkpoint, save_checkpoint
    from ..diffusion.guidance import format_class_guidance, format_guidance_interval
    from ..evaluation import run_metadata
    from ..evaluation.calibration import DEFAULT_N, DEFAULT_SCALES, calibrate_class_guidance
    from ..evaluation.summary import calibration_summary

    check_report_and_save(args)
    model = load_checkpoint(checkpoint_path(args.checkpoint))
    with progress_bar("step") as show:
        result = calibrate_class_guidance(
            model,
            scales=args.scales or DEFAULT_SCALES,
            n=DEFAULT_N if args.n is None else args.n,
            sampler=args.sampler,
            steps=args.steps,
            guidance_interval=args.guidance_interval,
            progress=show,
            **measurement_options(args),
        )
    report = {**run_metadata(), "checkpoint": {"summary": model.summary(), "sha256": model.sha256}, **result}
    write_report(args.out, report)
    for line in calibration_summary(result):
        print(line)
    if args.save is not None:
        best = {int(label): scale for label, scale in result["best"].items()}
        interval = model.config.default_guidance_interval if args.guidance_interval is None else args.guidance_interval
        config = dataclasses.replace(model.config, default_class_guidance=best, default_guidance_interval=interval)
        digest = save_checkpoint(args.save, model.net, config, dtype=model.storage_dtype)
        print(
            f"wrote {args.save} (sha256 {digest[:12]}) with per-class guidance {format_class_guidance(best)}, "
            f"guided at noise levels {format_guidance_interval(config.default_guidance_interval)}"
        )
    return 0


def add_calibrate_contrast_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``calibrate-contrast`` command to the subcommands ``commands``."""
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
    add_sampler_arguments(calibrate, guidance=False, interval=False)
    calibrate.set_defaults(run=_run_calibrate_contrast)


def _run_calibrate_contrast(args: argparse.Namespace) -> int:
    import dataclasses

    from ..diffusion.checkpoint import load_checkpoint, save_checkpoint
    from ..evaluation import run_metadata
    from ..evaluation.calibration import CALIBRATION_SEED
    from ..evaluation.contrast_calibration import (
        DEFAULT_N,
        DEFAULT_ROUNDS,
        calibrate_contrast_channel,
        calibration_masks,
    )
    from ..evaluation.summary import contrast_calibration_summary

    check_report_and_save(args)
    path = checkpoint_path(args.checkpoint)
    model = load_checkpoint(path)
    if model.config.particle_contrast is None:
        raise ValueError(f"{path}: this model has no contrast channel (model.contrast_channel); nothing to calibrate")
    n = DEFAULT_N if args.n is None else args.n
    options = measurement_options(args)
    masks = calibration_masks(model, n, options.pop("size"))
    with progress_bar("step") as show:
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
    write_report(args.out, report)
    for line in contrast_calibration_summary(result):
        print(line)
    if args.save is not None and prior.channel_map is None:
        print(f"no class could be mapped; {args.save} not written")
    elif args.save is not None:
        config = dataclasses.replace(model.config, particle_contrast=prior)
        digest = save_checkpoint(args.save, model.net, config, dtype=model.storage_dtype)
        print(
            f"wrote {args.save} (sha256 {digest[:12]}) with the contrast map for classes {', '.join(result['mapped'])}"
        )
    return 0
