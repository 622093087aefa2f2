"""The reports of evaluate, calibrate and calibrate-contrast as lines of text for the terminal."""

from __future__ import annotations

from typing import Any

from ..diffusion.guidance import format_class_guidance
from .statistics import median_ratio


def format_number(value: float | None) -> str:
    """A measured number to 3 decimals, "-" where there is none."""
    return "-" if value is None else f"{value:.3f}"


def evaluation_summary(metrics: dict) -> str:
    """Per class F1 and peak-contrast distance (with its bootstrap standard error and the reference floor) and the
    contrasts' median and 10-90 % range over the simulator's, the background's noise and line-pattern ratios, each
    class's surroundings, the power spectrum's largest ratio, and the C2ST accuracy, a line each."""
    fidelity = metrics["fidelity"]["per_class"]
    contrast = metrics["physics"]["peak_contrast"]
    floor = metrics["reference_floor"]["peak_contrast"]
    lines = [
        f"class {k}: F1 {format_number(fidelity[k]['f1']) if k in fidelity else '-'}, "
        f"contrast W/spread {format_number(contrast[k]['relative_to_spread'])} "
        f"+- {format_number(contrast[k].get('relative_to_spread_se'))} "
        f"(two simulator sets: {format_number(floor.get(k, {}).get('relative_to_spread'))}), "
        f"median {format_number(median_ratio(contrast[k]))} and range {format_number(contrast[k]['range_ratio'])} "
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
            f"{label} {format_number(ours['ratio'])} (two simulator sets: {format_number(chance['ratio'])})"
            for label, ours, chance in ratios
        )
    )
    around, chance_around = physics["surroundings"], floor_physics["surroundings"]["per_class"]
    bands = ", ".join(f"{low:g}-{high:g}" for low, high in around["bands_psf_radii"])
    for k, values in around["per_class"].items():
        ours = " ".join(format_number(r) for r in values["ratio"])
        chance = " ".join(format_number(r) for r in chance_around.get(k, {}).get("ratio", []))
        lines.append(
            f"class {k} surroundings / simulator at {bands} PSF radii: {ours} (two simulator sets: {chance or '-'})"
        )
    largest, chance_largest = physics["power_spectrum"]["largest_ratio"], floor_physics["spectrum_largest_ratio"]
    lines.append(
        f"power spectrum / simulator: farthest from 1 at {largest['frequency_cycles_per_px']:.3f} cycles/px, "
        f"{format_number(largest['ratio'])} (two simulator sets: {format_number(chance_largest['ratio'])} at "
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


def calibration_summary(result: dict[str, Any]) -> list[str]:
    """Lines of ``calibrate_class_guidance``'s ``result``: each class's contrast distance at each scale (with the
    reference floor), the best per-class guidance, and the classes whose best scale is at the edge of the grid."""
    lines = []
    scales = ", ".join(f"{s:g}" for s in result["settings"]["scales"])
    for label, distances in result["contrast_w_rel"].items():
        shown = ", ".join("-" if d is None else f"{d:.2f}" for d in distances)
        floor = result["reference_floor"].get(label)
        floor_text = "" if floor is None else f" (two simulator sets: {floor:.2f})"
        lines.append(f"class {label}: contrast W/spread at w = {scales}: {shown}{floor_text}")
    best = {int(label): scale for label, scale in result["best"].items()}
    lines.append(f"best per-class guidance: {format_class_guidance(best)}")
    for label in result["at_grid_edge"]:
        lines.append(f"class {label}: the best scale is at the edge of --scales; its optimum may lie beyond it")
    return lines


def contrast_calibration_summary(result: dict[str, Any]) -> list[str]:
    """Lines of ``calibrate_contrast_channel``'s ``result``: each round's per-class distances, the classes left
    unmapped and the quantiles the map holds at its floor."""
    lines = []
    for index, measured in enumerate(result["rounds"]):
        rows = "; ".join(
            f"class {label} W/spread {format_number(row['relative_to_spread'])}, "
            f"median {format_number(row['median_ratio'])}, range {format_number(row['range_ratio'])}"
            for label, row in measured.items()
        )
        lines.append(f"round {index}{' (no map)' if index == 0 else ''}: {rows}")
    for label, correlation in result["left"].items():
        shown = "-" if correlation is None else f"{correlation:.2f}"
        lines.append(f"class {label} left unmapped: its peaks follow the channel with correlation {shown}")
    for label, levels in result["floored"].items():
        lines.append(
            f"class {label}: at the quantiles {', '.join(f'{level:.2f}' for level in levels)} the network draws the "
            "particles too bright whatever the channel says; the map holds them at its floor"
        )
    return lines
