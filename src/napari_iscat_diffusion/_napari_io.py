"""napari reader and writer for TIFF image/mask pairs (``io.tiff_pairs`` layouts; numpy and tifffile only).

Pixel sizes travel as layer scale in micrometres per pixel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .io.tiff_pairs import (
    MASK_SUFFIXES,
    TIFF_SUFFIXES,
    DataError,
    find_pairs,
    read_image,
    read_mask,
    read_pixel_size_nm,
    write_tiff,
)


def _mask_for(image: Path) -> Path | None:
    """The mask of an image file in one of the pair layouts, or None."""
    candidates = []
    if image.parent.name == "images":
        masks = image.parent.parent / "masks"
        candidates += [masks / f"{image.stem}{suffix}{ext}" for suffix in ("", *MASK_SUFFIXES) for ext in TIFF_SUFFIXES]
    candidates += [image.with_name(f"{image.stem}{suffix}{ext}") for suffix in MASK_SUFFIXES for ext in TIFF_SUFFIXES]
    return next((path for path in candidates if path.is_file()), None)


def get_reader(path: str | list[str]) -> Callable | None:
    """A reader for an image TIFF with a mask beside it, or a folder of pairs; None leaves the path to other readers."""
    if isinstance(path, list):
        return None
    path = Path(path)
    if path.is_dir():
        return read_pairs if (path / "images").is_dir() or any(path.glob("*_mask.tif*")) else None
    if path.suffix.lower() in TIFF_SUFFIXES and _mask_for(path) is not None:
        return read_pairs
    return None


def _scale(image: Path) -> dict:
    pixel_size = read_pixel_size_nm(image)
    return {} if pixel_size is None else {"scale": (pixel_size / 1000,) * 2, "units": "um"}


def _read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask; DataError when the mask is not the size of the image's planes."""
    image, mask = read_image(image_path), read_mask(mask_path)
    if mask.shape != image.shape[-2:]:
        raise DataError(
            mask_path,
            f"mask is {mask.shape[0]}x{mask.shape[1]} pixels but its image {image_path.name} is "
            f"{image.shape[-2]}x{image.shape[-1]}; they must be the same size",
        )
    return image, mask


def read_pairs(path: str) -> list[tuple]:
    """Layers for one image and its mask, or for a folder: all images as one stack and all masks as another."""
    path = Path(path)
    if path.is_file():
        image, mask = _read_pair(path, _mask_for(path))
        meta = _scale(path)
        return [
            (image, {"name": path.stem, **meta}, "image"),
            (mask, {"name": f"{path.stem} mask", **meta}, "labels"),
        ]
    pairs = find_pairs(path).pairs
    missing = [p.image.name for p in pairs if p.mask is None]
    if missing:
        raise DataError(path, f"{len(missing)} image(s) without a mask, for example {missing[0]}; open them one by one")
    images, masks = zip(*(_read_pair(p.image, p.mask) for p in pairs), strict=True)
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise DataError(path, f"images of different sizes {sorted(shapes)}; open them one by one")
    meta = _scale(pairs[0].image)
    return [
        (np.stack(images), {"name": path.name, **meta}, "image"),
        (np.stack(masks), {"name": f"{path.name} masks", **meta}, "labels"),
    ]


def write_pair(path: str, layer_data: list[tuple]) -> list[str]:
    """Write one Image and one Labels layer as ``images/NAME.tif`` and ``masks/NAME.tif`` next to ``path``.

    ``NAME`` is the stem of ``path``; the pixel size comes from the image layer's scale (micrometres).
    Existing files are not overwritten (FileExistsError).
    """
    kinds = {kind: (data, meta) for data, meta, kind in layer_data}
    if sorted(kinds) != ["image", "labels"] or len(layer_data) != 2:
        raise ValueError("select exactly one Image layer and one Labels layer to save them as an image/mask pair")
    target = Path(path)
    root, name = target.parent, target.name.removesuffix(target.suffix) if target.suffix else target.name
    image, image_meta = kinds["image"]
    mask, _ = kinds["labels"]
    scale = image_meta.get("scale")
    pixel_size = float(scale[-1]) * 1000 if scale is not None and float(scale[-1]) != 1.0 else None
    targets = {root / "images" / f"{name}.tif": image, root / "masks" / f"{name}.tif": mask}
    existing = [str(out) for out in targets if out.exists()]
    if existing:  # checked before writing either file, so a pair is never half replaced
        raise FileExistsError(f"{', '.join(existing)} already exist(s); choose another name")
    written: list[Path] = []
    try:
        for out, array in targets.items():
            out.parent.mkdir(parents=True, exist_ok=True)
            write_tiff(out, np.asarray(array), pixel_size_nm=pixel_size)
            written.append(out)
    except BaseException:  # a pair is saved whole or not at all (a full disk, a read-only folder)
        for out in written:
            out.unlink(missing_ok=True)
        raise
    return [str(out) for out in targets]
