"""Experiment harness: autoguidance (Karras et al. 2024) with a weaker checkpoint as the guide.

Autoguidance replaces classifier-free guidance's unconditional prediction by the *conditional* prediction of
a weaker model of the same data ("guiding a diffusion model with a bad version of itself"). Here it is
combined, per pixel, with the checkpoint's classifier-free guidance:

    x0 = x0_cond + (w_cfg - 1) (x0_cond - x0_uncond) + (w_ag - 1) (x0_cond - x0_guide)

with ``w_cfg`` the usual (per-class) guidance map and ``w_ag`` a per-class autoguidance map
(``guidance.guidance_scale_map`` with 1 in the background). Both act only inside the guidance interval,
autoguidance only above ``--autoguidance-low``. The guide runs in the main model's normalised units (the two
were trained with slightly different normalisation statistics). The library does not offer this: it was not
adopted for the bundled model (docs/model-history.md, *Autoguidance*). This script wraps ``iscat-diffusion
evaluate`` and ``calibrate``, and ``benchmarks/diagnose_c2st.py`` (``diagnose``), by replacing the guided denoiser
that ``generate`` builds, so that those numbers can be reproduced:

    python benchmarks/autoguidance_experiment.py --guide runs/guide.safetensors --calibrate -- \\
        calibrate --scales 5 6 7 --out OUT.json        # the calibration's uniform scale becomes w_ag
    python benchmarks/autoguidance_experiment.py --guide runs/guide.safetensors --autoguidance 2=6,3=5 -- \\
        evaluate --class-guidance 1=1,2=1,3=1 --out OUT.json
    python benchmarks/autoguidance_experiment.py --guide runs/guide.safetensors --autoguidance 2=6,3=5 -- \\
        diagnose --class-guidance 1=1,2=1,3=1 --out OUT.json

The guide those numbers used is the bundled file of commit 9734c85: ``git show 9734c85:src/napari_iscat_diffusion/
models/iscat-sim-3class.safetensors > runs/guide.safetensors``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from napari_iscat_diffusion.cli import main as cli_main
from napari_iscat_diffusion.diffusion import LoadedModel, load_checkpoint
from napari_iscat_diffusion.diffusion.checkpoint import file_sha256
from napari_iscat_diffusion.diffusion.denoiser import ConditionalDenoiser
from napari_iscat_diffusion.diffusion.guidance import (
    EVERY_NOISE_LEVEL,
    check_guidance_interval,
    guidance_scale_map,
    parse_class_guidance,
)
from napari_iscat_diffusion.io.atomic import atomic_write_text

generate_module = importlib.import_module("napari_iscat_diffusion.diffusion.generate")
evaluate_module = importlib.import_module("napari_iscat_diffusion.evaluation.evaluate")


def labels_of(cond: torch.Tensor) -> torch.Tensor:
    """Label masks (N, H, W) back from a condition (N, K+1, H, W): K one-hot class channels, then one more."""
    classes = cond.shape[1] - 1
    weights = torch.arange(1, classes + 1, dtype=cond.dtype, device=cond.device).view(1, classes, 1, 1)
    return (cond[:, :classes] * weights).sum(1).round().long()


def in_other_units(cond_denoise: ConditionalDenoiser, own: dict, target: dict) -> ConditionalDenoiser:
    """A conditional denoiser trained in the normalised units ``own`` (``{"mean": [C], "std": [C]}``), called in
    the units ``target``: inputs, noise levels and predictions are converted, so that two networks trained on
    the same data with slightly different normalisation statistics can share one sampler. Every channel's std
    must differ by the same factor (sigma is one number per image); ValueError otherwise."""
    ratios = [t / o for o, t in zip(own["std"], target["std"], strict=True)]
    if max(ratios) > min(ratios) * (1 + 1e-6):
        raise ValueError(f"the two normalisations scale the channels differently (std ratios {ratios})")
    ratio = ratios[0]
    shift = ((torch.tensor(target["mean"]) - torch.tensor(own["mean"])) / torch.tensor(own["std"])).view(1, -1, 1, 1)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        offset = shift.to(device=x.device, dtype=x.dtype)
        x0_own = cond_denoise(x * ratio + offset, sigma * ratio, cond)
        return (x0_own - offset) / ratio

    return denoise


def autoguided_denoiser_factory(
    guide: LoadedModel,
    class_autoguidance: dict[int, float],
    autoguidance_low: float,
    calibrate: bool,
    background_cfg_below: float,
) -> tuple[Callable, Callable[[LoadedModel], None]]:
    """A replacement for ``guidance.guided_denoiser`` and a hook that binds the guide to the model in use.

    At noise levels at or below ``background_cfg_below`` the autoguided classes also get the model's background
    guidance scale (classifier-free) and the other classes the checkpoint's own scales: without guidance there,
    the shot noise and speckle around the autoguided particles come out too smooth.
    """
    state: dict = {}

    def bind(model: LoadedModel) -> None:
        state["guide"] = in_other_units(guide.denoiser(), guide.config.normalization, model.config.normalization)
        state["background"] = model.config.default_guidance
        state["class_guidance"] = model.config.default_class_guidance

    def guided_denoiser(cond_denoise, cond, null_cond, scale, interval=EVERY_NOISE_LEVEL):
        low, high = check_guidance_interval(interval)
        cfg_low = None
        if calibrate:
            cfg, ag = 1.0, scale
        else:
            labels = labels_of(cond).cpu().numpy()
            ag_map = guidance_scale_map(labels, 1.0, class_autoguidance)
            cfg, ag = scale, 1.0 if ag_map is None else torch.from_numpy(ag_map).to(cond.device)
            if ag_map is not None and background_cfg_below > 0 and isinstance(scale, torch.Tensor):
                # The autoguided classes take the background's scale, the others the checkpoint's own.
                low_scales = {**state["class_guidance"], **dict.fromkeys(class_autoguidance, state["background"])}
                low_map = guidance_scale_map(labels, state["background"], low_scales)
                cfg_low = scale if low_map is None else torch.from_numpy(low_map).to(cond.device)
        plain_cfg = not isinstance(cfg, torch.Tensor) and cfg == 1.0
        plain_ag = not isinstance(ag, torch.Tensor) and ag == 1.0
        guide_denoise = state["guide"]

        def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            inside = (sigma > low) & (sigma <= high)
            if not bool(inside.any()) or (plain_cfg and plain_ag):
                return cond_denoise(x, sigma, cond)
            if plain_cfg:
                x0_cond = cond_denoise(x, sigma, cond)
                x0 = x0_cond
            else:
                both = torch.cat([cond, null_cond])
                x0_cond, x0_uncond = cond_denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
                low_sigma = cfg_low is not None and bool((sigma <= background_cfg_below).all())
                x0 = x0_cond + ((cfg_low if low_sigma else cfg) - 1) * (x0_cond - x0_uncond)
            if not plain_ag and bool((sigma > autoguidance_low).all()):
                x0 = x0 + (ag - 1) * (x0_cond - guide_denoise(x, sigma, cond))
            return torch.where(inside.view(-1, *[1] * (x.ndim - 1)), x0, x0_cond)

        return guided

    return guided_denoiser, bind


def main() -> int:
    """Parse this script's options, patch the evaluation's ``generate`` and run the ``iscat-diffusion evaluate`` or
    ``calibrate`` command, or ``diagnose`` (``benchmarks/diagnose_c2st.py``), given after ``--``; returns its exit
    status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guide", required=True, help="the weaker checkpoint (safetensors)")
    parser.add_argument("--autoguidance", default="", help="per-class autoguidance scales, e.g. 2=6,3=5")
    parser.add_argument("--autoguidance-low", type=float, default=0.0, help="autoguide only above this noise level [0]")
    parser.add_argument(
        "--background-cfg-below",
        type=float,
        default=0.0,
        help="at noise levels <= this, guide the autoguided classes' zones with the background's scale too [0]",
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="use the command's uniform guidance scale as w_ag, no CFG"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the iscat-diffusion command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command[:1] not in (["evaluate"], ["calibrate"], ["diagnose"]):
        parser.error(
            f"the command after -- must be 'evaluate', 'calibrate' or 'diagnose', got {' '.join(command) or 'nothing'}"
        )
    for option in ("autoguidance_low", "background_cfg_below"):
        if not math.isfinite(getattr(args, option)):
            parser.error(f"--{option.replace('_', '-')} must be a finite noise level")
    guided_denoiser, bind = autoguided_denoiser_factory(
        load_checkpoint(args.guide),
        parse_class_guidance(args.autoguidance),
        args.autoguidance_low,
        args.calibrate,
        args.background_cfg_below,
    )
    plain_generate = generate_module.generate

    def generate(mask, model, **options):
        bind(model)
        return plain_generate(mask, model, **options)

    generate_module.guided_denoiser = guided_denoiser
    evaluate_module.generate = generate
    if command[0] == "diagnose":
        import diagnose_c2st  # benchmarks/, this script's directory

        sys.argv = ["diagnose_c2st.py", *command[1:]]
        diagnose_c2st.main()
        status = 0
    else:
        status = cli_main(command)
    if status == 0 and "--out" in command:
        record_experiment(Path(command[command.index("--out") + 1]), args)
    return status


def record_experiment(path: Path, args: argparse.Namespace) -> None:
    """Add this script's options to the report the command wrote, which knows nothing of the guide."""
    report = json.loads(path.read_text())
    report["autoguidance_experiment"] = {
        "guide": str(args.guide),
        "guide_sha256": file_sha256(args.guide),
        "class_autoguidance": args.autoguidance,
        "autoguidance_low": args.autoguidance_low,
        "background_cfg_below": args.background_cfg_below,
        "calibrate": args.calibrate,
    }
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
