"""Evaluation suite: a classical particle detector, mask fidelity, physics statistics, a classifier two-sample
test, diversity and ``evaluate_model`` (numpy, scipy, scikit-image and torch; no napari or Qt).
See docs/evaluation.md."""

from .c2st import C2STResult, classifier_two_sample_test, repeated_two_sample_test
from .calibration import CALIBRATION_SEED, calibrate_class_guidance
from .contrast_calibration import calibrate_contrast_channel
from .detector import Detections, DetectorSettings, detect_particles, robust_std
from .diversity import sample_diversity
from .edits import EditedMask, edit_mask, edit_scores
from .evaluate import (
    ImageSet,
    compare_image_sets,
    evaluate_model,
    metric_curves,
    reference_floor,
    run_metadata,
    simulated_set,
    write_curves,
)
from .matching import MatchCounts, fidelity_scores, mask_particles, match_image, match_points

__all__ = [
    "CALIBRATION_SEED",
    "C2STResult",
    "Detections",
    "DetectorSettings",
    "EditedMask",
    "ImageSet",
    "MatchCounts",
    "calibrate_class_guidance",
    "calibrate_contrast_channel",
    "classifier_two_sample_test",
    "compare_image_sets",
    "detect_particles",
    "edit_mask",
    "edit_scores",
    "evaluate_model",
    "fidelity_scores",
    "mask_particles",
    "match_image",
    "match_points",
    "metric_curves",
    "reference_floor",
    "repeated_two_sample_test",
    "robust_std",
    "run_metadata",
    "sample_diversity",
    "simulated_set",
    "write_curves",
]
