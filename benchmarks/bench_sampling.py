"""Sampling speed: the project's U-Net and DPM-Solver++ against Hugging Face diffusers, side by side in one process.

For each architecture the project's ``ConditionalUNet`` and a diffusers ``UNet2DModel`` of matched
size (parameters and FLOPs within 10%, counted with ``FlopCounterMode``) generate the same number
of images from the same masks with classifier-free guidance (cond and uncond as one batch) and
second-order multistep DPM-Solver++ on the same log-SNR-uniform sigma grid at the same number of steps: the project
through ``generate()``, diffusers through its ``DPMSolverMultistepScheduler`` in the usual
denoising loop. Runs alternate between the two pipelines; the median time per image, the ratio
(diffusers / project, above 1 means the project is faster) and the achieved FLOP/s against the
measured fp32 matmul peak are printed and written to ``benchmarks/results/sampling.json``.

Architectures:
  matched: diffusers-style channels (64, 128, 256, 256), two residual blocks per level, attention at
    the third level (32x32 for a 128x128 image), as in the measurements of issue 7;
  default: the bundled default model's architecture (training/configs/default_model.yaml).

    python benchmarks/bench_sampling.py                   # 128 and 256 px, batch 1 and 8, 20 steps, 3 repeats
    python benchmarks/bench_sampling.py --quick           # 32 px, batch 1 and 2, 2 steps, 1 repeat
    python benchmarks/bench_sampling.py --configs default --sizes 256 --batches 1

Needs ``pip install -e .[bench]`` (diffusers). Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DModel

from common import (
    blob_mask,
    count_flops,
    default_model_unet,
    fresh_model,
    machine_info,
    matmul_peak_gflops,
    write_results,
)
from napari_iscat_diffusion.diffusion import LoadedModel, UNetConfig, encode_condition, generate, resolve_device

GUIDANCE = 1.5
MATCHED_UNET = UNetConfig(
    num_classes=3,
    base_channels=64,
    channel_mults=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_levels=(2,),
    num_heads=32,
    norm_groups=32,
)


def diffusers_twin(unet: UNetConfig) -> UNet2DModel:
    """A diffusers UNet2DModel with the same levels, blocks, attention placement, heads and groups as ``unet``."""
    channels = tuple(unet.base_channels * m for m in unet.channel_mults)
    attention = set(unet.attention_levels)
    last = len(channels) - 1
    heads_dim = [channels[level] // unet.num_heads for level in attention] or [8]
    torch.manual_seed(0)
    return UNet2DModel(
        in_channels=unet.image_channels + unet.condition_channels,
        out_channels=unet.image_channels,
        block_out_channels=channels,
        layers_per_block=unet.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(channels))),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(channels)))
        ),
        attention_head_dim=heads_dim[0],
        norm_num_groups=unet.norm_groups,
        add_attention=last in attention,  # the project's bottleneck has attention exactly when the deepest level has
        resnet_time_scale_shift="scale_shift",  # FiLM scale and shift, as in the project's residual blocks
    ).eval()


def diffusers_scheduler(model: LoadedModel) -> DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) on the project's default grid (uniform in log-SNR, ending at sigma = 0), for the model's
    schedule and parameterisation."""
    schedule = model.config.schedule
    return DPMSolverMultistepScheduler(
        num_train_timesteps=schedule["num_timesteps"],
        beta_schedule="squaredcos_cap_v2" if schedule["name"] == "cosine" else "linear",
        prediction_type={"v": "v_prediction", "eps": "epsilon", "x0": "sample"}[model.config.parameterization],
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_lu_lambdas=True,
        final_sigmas_type="zero",
    )


def diffusers_generate(
    unet: UNet2DModel, scheduler: DPMSolverMultistepScheduler, masks: np.ndarray, num_classes: int, steps: int
) -> torch.Tensor:
    """The standard diffusers guided sampling loop on the same condition tensor as the project."""
    with torch.inference_mode():
        cond = encode_condition(torch.from_numpy(masks.astype(np.int64)), num_classes)
        both = torch.cat([cond, torch.zeros_like(cond)])
        scheduler.set_timesteps(steps)
        # Near sigma_max several sigmas of the grid map to one timestep; without a begin index the scheduler's lookup
        # by timestep then skips a step and runs off the end of its sigma table.
        scheduler.set_begin_index(0)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(len(masks), 1, *masks.shape[1:], generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out_cond, out_uncond = unet(torch.cat([model_input, both], dim=1), t).sample.chunk(2)
            guided = out_uncond + GUIDANCE * (out_cond - out_uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
    return latents


def size_report(model: LoadedModel, twin: UNet2DModel, size: int) -> dict:
    """Parameters and FLOPs of one forward (batch 1) of both networks at ``size`` and whether they match within 10%."""
    k = model.config.num_classes
    x, cond, t = torch.randn(1, 1, size, size), torch.zeros(1, k + 1, size, size), torch.full((1,), 500.0)
    ours = {"params": sum(p.numel() for p in model.net.parameters()), "flops": count_flops(model.net, x, t, cond)}
    theirs = {
        "params": sum(p.numel() for p in twin.parameters()),
        "flops": count_flops(twin, torch.cat([x, cond], dim=1), t),
    }
    matched = all(abs(theirs[key] / ours[key] - 1) <= 0.10 for key in ours)
    return {"project": ours, "diffusers": theirs, "within_10_percent": matched}


def time_case(model: LoadedModel, twin: UNet2DModel, size: int, batch: int, steps: int, repeats: int) -> dict:
    """Alternate the two pipelines ``repeats`` times after one warm-up each; median seconds per image."""
    masks = np.stack([blob_mask(size, model.config.num_classes, seed) for seed in range(batch)])
    scheduler = diffusers_scheduler(model)

    def ours() -> None:
        generate(masks, model, steps=steps, guidance=GUIDANCE, batch_size=batch, device="cpu", tile_size=None)

    def theirs() -> None:
        diffusers_generate(twin, scheduler, masks, model.config.num_classes, steps)

    times: dict[str, list[float]] = {"project": [], "diffusers": []}
    for run in range(repeats + 1):
        for name, pipeline in (("project", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            pipeline()
            if run:  # the first round is the warm-up
                times[name].append((time.perf_counter() - start) / batch)
    return {name: statistics.median(values) for name, values in times.items()} | {"all_seconds_per_image": times}


def main() -> None:
    """Run every architecture, size and batch; print a table and save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 px, batch 1 and 2, 2 steps, 1 repeat")
    parser.add_argument("--configs", nargs="+", choices=("matched", "default"), default=["matched", "default"])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default 128 256)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per pipeline (default 3)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([32] if args.quick else [128, 256])
    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    steps = args.steps or (2 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)

    peak = matmul_peak_gflops(resolve_device("cpu"), seconds=0.5 if args.quick else 3.0)
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s with {torch.get_num_threads()} thread(s)")
    results = []
    machine = machine_info() | {"matmul_peak_gflops": peak}
    for name in args.configs:
        unet = MATCHED_UNET if name == "matched" else default_model_unet()
        model = fresh_model(unet)
        twin = diffusers_twin(unet)
        for size in sizes:
            sizes_info = size_report(model, twin, size)
            ours, theirs = sizes_info["project"], sizes_info["diffusers"]
            print(
                f"[{name} {size}px] params {ours['params'] / 1e6:.2f} M vs {theirs['params'] / 1e6:.2f} M, "
                f"GFLOP/forward {ours['flops'] / 1e9:.2f} vs {theirs['flops'] / 1e9:.2f} "
                f"({'matched' if sizes_info['within_10_percent'] else 'NOT within 10%'})"
            )
            for batch in batches:
                timing = time_case(model, twin, size, batch, steps, repeats)
                flops_per_image = {key: 2 * steps * sizes_info[key]["flops"] for key in ("project", "diffusers")}
                gflops = {key: flops_per_image[key] / timing[key] / 1e9 for key in flops_per_image}
                ratio = timing["diffusers"] / timing["project"]
                results.append(
                    {
                        "config": name,
                        "unet": unet.to_dict(),
                        "size": size,
                        "batch": batch,
                        "steps": steps,
                        "guidance": GUIDANCE,
                        "sizes": sizes_info,
                        "seconds_per_image": {key: timing[key] for key in ("project", "diffusers")},
                        "all_seconds_per_image": timing["all_seconds_per_image"],
                        "speedup_vs_diffusers": ratio,
                        "achieved_gflops": gflops,
                        "fraction_of_matmul_peak": {key: value / peak for key, value in gflops.items()},
                    }
                )
                print(
                    f"  batch {batch}: project {timing['project']:.3f} s/image ({gflops['project']:.1f} GFLOP/s, "
                    f"{gflops['project'] / peak:.0%} of peak), diffusers {timing['diffusers']:.3f} s/image "
                    f"({gflops['diffusers']:.1f} GFLOP/s): project {ratio:.2f}x faster"
                )
                # After every case, so that a run stopped part-way keeps what it measured.
                write_results("sampling", machine, results, args.out)


if __name__ == "__main__":
    main()
