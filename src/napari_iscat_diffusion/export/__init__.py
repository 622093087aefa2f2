"""Batch export of synthetic pairs: masks in; ``images/NAME.tif``, ``masks/NAME.tif`` and ``manifest.csv`` out.

Pure numpy and the diffusion core (no napari or Qt), so the Batch export widget and the command line
drive the same code. Each TIFF is written atomically (``write_tiff``) and carries its pair's provenance as
JSON in ImageJ's "Info" property; a pair counts as finished when both files exist and a manifest holds its
row, which is appended (and synced) after the files. An interrupted export therefore resumes by skipping
finished pairs and recording pairs whose files were written but not recorded (their stored provenance says
that they are this pair); nothing is ever overwritten.

Masks are made or read one at a time (:class:`MaskSequence`), so an export holds one mask and one batch of
images whatever the number of pairs. A lock file in the folder keeps a second export out while one writes.

Several processes (``torchrun``) share one export: pair ``i`` belongs to rank ``i % world_size``, and each
rank appends to its own ``manifest.rank{r}.csv``, so no two processes write one file. After all ranks have
finished, one process calls :func:`merge_manifests` to fold them into ``manifest.csv``.
"""

from .files import ExportError, check_output_paths
from .manifest import MANIFEST, MANIFEST_FIELDS, count_pairs, finished_pairs, merge_manifests
from .masks import MaskItem, MaskSequence, masks_from_arrays, masks_from_folder, random_masks
from .pairs import ExportProgress, ExportSummary, export_pairs
from .preview import write_preview

__all__ = [
    "MANIFEST",
    "MANIFEST_FIELDS",
    "ExportError",
    "ExportProgress",
    "ExportSummary",
    "MaskItem",
    "MaskSequence",
    "check_output_paths",
    "count_pairs",
    "export_pairs",
    "finished_pairs",
    "masks_from_arrays",
    "masks_from_folder",
    "merge_manifests",
    "random_masks",
    "write_preview",
]
