"""One checkpoint from two: a main network and a high-noise expert that takes over above a noise level.

An ensemble of expert denoisers (Balaji et al. 2022, eDiff-I): the expert is a run with ``train.sigma_range``
(usually fine-tuned from the main model), and the plugin samples the combined file like any other, one network
pass per step (``ModelConfig.high_noise_expert``, ``denoiser.NoiseLevelSwitch``); with ``--classes`` the expert
draws only around the particles of those classes, and both networks run above the switch::

    python -m training.experts --main MAIN.safetensors --expert EXPERT.safetensors --sigma-switch 8 --out OUT \
        [--classes 2 3 [--reach-px 4]]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from napari_iscat_diffusion.diffusion.checkpoint import CheckpointError, LoadedModel, load_checkpoint, save_checkpoint
from napari_iscat_diffusion.diffusion.denoiser import std_ratio


def combine_experts(
    main_path: str | os.PathLike,
    expert_path: str | os.PathLike,
    sigma_switch: float,
    out: str | os.PathLike,
    *,
    classes: list[int] | None = None,
    reach_px: float | None = None,
) -> str:
    """Write ``out``: the main checkpoint's network and config, plus the expert's network for sigma > ``sigma_switch``
    (the main model's normalised units), stored in the main file's dtype. ``classes`` (particle labels) limits the
    expert to the zones around those classes, ``reach_px`` (px) wide (``conditioning.class_zone``); None: the
    whole image.

    Returns:
        the hex SHA-256 of the written file.

    Raises:
        CheckpointError: a file cannot be loaded.
        ValueError: either file already holds an expert or has a contrast channel; the two differ in architecture,
            schedule or parameterisation; or the expert was trained (``train.sigma_range``) on noise levels that do
            not cover those above ``sigma_switch`` at which the main model samples.
    """
    main, expert = load_checkpoint(main_path), load_checkpoint(expert_path)
    for name, model in (("main", main), ("expert", expert)):
        if model.config.high_noise_expert is not None:
            raise ValueError(f"the {name} checkpoint {model.path} already holds a high-noise expert")
    for field in ("unet", "schedule", "parameterization"):
        if getattr(main.config, field) != getattr(expert.config, field):
            raise ValueError(
                f"the two checkpoints differ in {field}: {getattr(main.config, field)!r} in {main.path}, "
                f"{getattr(expert.config, field)!r} in {expert.path}"
            )
    _check_coverage(main, expert, sigma_switch)
    zone = {} if classes is None else {"classes": list(classes)}
    if reach_px is not None:
        zone["reach_px"] = reach_px
    config = dataclasses.replace(
        main.config,
        high_noise_expert={
            "sigma_switch": sigma_switch,
            "normalization": expert.config.normalization,
            "training": {**expert.config.training, "sha256": expert.sha256},
            **zone,
        },
    )
    return save_checkpoint(out, main.net, config, dtype=main.storage_dtype, expert_net=expert.net)


def _check_coverage(main: LoadedModel, expert: LoadedModel, sigma_switch: float) -> None:
    trained = expert.config.training.get("config", {}).get("train", {}).get("sigma_range")
    if trained is None:
        return
    ratio = std_ratio(expert.config.normalization, main.config.normalization)
    # The expert's units: its timesteps start at the first whose sigma reaches trained[0].
    first, last = expert.schedule.timesteps_between(*trained)
    low, high = float(expert.schedule.sigmas[first]) / ratio, float(expert.schedule.sigmas[last]) / ratio
    if sigma_switch < low or main.sampling_sigma_max > high:
        raise ValueError(
            f"the expert {expert.path} was trained on sigma {low:.4g} to {high:.4g} (the main model's units), "
            f"but would denoise from sigma {sigma_switch:g} up to {main.sampling_sigma_max:.4g}"
        )


def main(argv: list[str] | None = None) -> int:
    """Command line: combine two checkpoints; returns the exit status (2 with a message for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m training.experts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", required=True, help="the checkpoint for the low noise levels (and the config)")
    parser.add_argument("--expert", required=True, help="the checkpoint trained on the high noise levels")
    parser.add_argument(
        "--sigma-switch",
        type=float,
        required=True,
        help="noise level (main model's units) above which the expert denoises",
    )
    parser.add_argument(
        "--classes",
        type=int,
        nargs="+",
        help="particle labels: the expert draws only around these classes (default: the whole image)",
    )
    parser.add_argument("--reach-px", type=float, help="with --classes: the zone's full width around a particle (px)")
    parser.add_argument("--out", required=True, help="the combined .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        digest = combine_experts(
            args.main, args.expert, args.sigma_switch, args.out, classes=args.classes, reach_px=args.reach_px
        )
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (sha256 {digest[:12]}): {load_checkpoint(args.out).summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
