"""Classifier two-sample test: can a small CNN tell generated from reference images?

Half of each set trains the classifier (random crops, flips), the other half tests it on whole images.
Held-out accuracy 0.5 means the sets are indistinguishable to this classifier; 1.0 means they are
trivially different. Both sets are scaled by one shared median and robust std (of the training half),
never per image, so differences in absolute contrast and noise stay visible. CPU-friendly and
deterministic for a given seed (on a given machine and thread count).

Three details make the test's power reproducible across seeds: the learning rate decays to 0 (cosine), so the
network ends in a minimum instead of wherever the last constant-rate steps left it; it trains a fixed number of
steps whatever the number of images (80 passes over 2 x 144 images are too few for some seeds); and the decision
threshold is fitted on the training half's whole images, because a network trained on crops scores whole images on
a shifted scale. Without them some seeds score 0.50 on sets that others tell apart at 0.81.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from .detector import robust_std


@dataclass(frozen=True)
class C2STResult:
    """Outcome of :func:`classifier_two_sample_test`.

    Attributes:
        accuracy: held-out accuracy (0.5 = indistinguishable).
        ci_low, ci_high: 95 % Wilson interval of the accuracy.
        num_test: held-out images (both sets together).
        num_train: training images (both sets together).
    """

    accuracy: float
    ci_low: float
    ci_high: float
    num_test: int
    num_train: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready fields."""
        return asdict(self)


def _classifier() -> nn.Module:
    # Three strided convolutions and a global average: sees noise texture, PSF shapes and contrast levels.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 1),
    )


def classifier_two_sample_test(
    generated: np.ndarray,
    reference: np.ndarray,
    *,
    seed: int = 0,
    steps: int = 2000,
    crop: int = 32,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
) -> C2STResult:
    """Train a small CNN on half of each image set (N, H, W) and report its held-out accuracy.

    Args:
        generated: generated images (N, H, W), at least 4.
        reference: reference images (M, H, W) of the same (H, W), at least 4.
        seed: seeds the split, the network's initialisation and the training batches.
        steps: optimiser steps, whatever the number of images (passes over the training images in a
            random order, one random crop of each image per pass).
        crop: side (px) of the training crops (whole images when they are smaller).
        batch_size: crops per optimiser step.
        learning_rate: Adam learning rate.
    """
    generated, reference = np.asarray(generated, np.float32), np.asarray(reference, np.float32)
    if generated.ndim != 3 or reference.ndim != 3 or generated.shape[1:] != reference.shape[1:]:
        raise ValueError(f"expected two image sets (N, H, W) of one size, got {generated.shape} and {reference.shape}")
    if min(len(generated), len(reference)) < 4:
        raise ValueError("the classifier two-sample test needs at least 4 images in each set")
    rng = np.random.default_rng(seed)
    train_x, train_y, test_x, test_y = [], [], [], []
    for label, images in ((1.0, generated), (0.0, reference)):
        order = rng.permutation(len(images))
        half = len(images) // 2
        train_x.append(images[order[:half]])
        test_x.append(images[order[half:]])
        train_y.append(np.full(half, label, np.float32))
        test_y.append(np.full(len(images) - half, label, np.float32))
    x_train, y_train = np.concatenate(train_x), np.concatenate(train_y)
    x_test, y_test = np.concatenate(test_x), np.concatenate(test_y)
    centre, scale = float(np.median(x_train)), max(robust_std(x_train), 1e-12)

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((images - centre) / scale).float()[:, None]

    train_images = to_tensor(x_train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _classifier()
        _train(
            net,
            train_images,
            torch.from_numpy(y_train),
            steps,
            min(crop, *x_train.shape[1:]),
            batch_size,
            learning_rate,
        )
    with torch.no_grad():
        threshold = _best_threshold(net(train_images)[:, 0].numpy(), y_train > 0.5)
        predicted = net(to_tensor(x_test))[:, 0].numpy() > threshold
    correct = int(np.sum(predicted == (y_test > 0.5)))
    interval = binomtest(correct, len(y_test)).proportion_ci(confidence_level=0.95, method="wilson")
    return C2STResult(correct / len(y_test), float(interval.low), float(interval.high), len(y_test), len(y_train))


def repeated_two_sample_test(
    generated: np.ndarray, reference: np.ndarray, *, seed: int = 0, repeats: int = 1, **options: Any
) -> dict[str, Any]:
    """:func:`classifier_two_sample_test` with classifier seeds ``seed``, ..., ``seed + repeats - 1`` and its
    other keyword ``options`` (``steps``, ...).

    Returns the first test's JSON fields (``C2STResult.to_dict``) and, for ``repeats`` > 1, ``over_seeds``:
    ``seeds``, every ``accuracies``, their ``mean``, ``std``, ``min`` and ``max`` (the test's own variance,
    docs/evaluation.md). Raises ValueError for ``repeats`` < 1."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    seeds = [seed + k for k in range(repeats)]
    tests = [classifier_two_sample_test(generated, reference, seed=s, **options) for s in seeds]
    out: dict[str, Any] = tests[0].to_dict()
    if repeats > 1:
        out["over_seeds"] = {"seeds": seeds, **seed_spread([t.accuracy for t in tests])}
    return out


def seed_spread(accuracies: Sequence[float]) -> dict[str, float | list[float]]:
    """Accuracies of one test repeated with several classifier seeds (at least 2): each, their mean, sample
    std, min and max."""
    if len(accuracies) < 2:
        raise ValueError(f"seed_spread needs at least 2 accuracies, got {len(accuracies)}")
    values = [float(a) for a in accuracies]
    return {
        "accuracies": values,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)),
        "min": min(values),
        "max": max(values),
    }


def _train(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, crop: int, batch_size: int, learning_rate: float
) -> None:
    """Adam with a cosine decay to 0 over ``steps`` batches of random crops with random flips (flips keep
    the camera's column structure vertical)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = nn.BCEWithLogitsLoss()
    height, width = x.shape[-2:]
    batches = (index for _ in itertools.count() for index in torch.randperm(len(x)).split(batch_size))
    for index in itertools.islice(batches, steps):
        top = torch.randint(0, height - crop + 1, (1,)).item()
        left = torch.randint(0, width - crop + 1, (1,)).item()
        batch = x[index, :, top : top + crop, left : left + crop]
        flip = torch.rand(2)
        if flip[0] < 0.5:
            batch = batch.flip(-1)
        if flip[1] < 0.5:
            batch = batch.flip(-2)
        optimizer.zero_grad()
        loss_fn(net(batch)[:, 0], y[index]).backward()
        optimizer.step()
        schedule.step()


def _best_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The score threshold (``score > threshold`` means positive) with the highest accuracy on these
    scores (N,) and boolean labels (N,): midway between two neighbouring sorted scores, or below all."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_positive = scores[order], positive[order]
    # Threshold just above the first k sorted scores: those k are called negative, the rest positive.
    negatives_below = np.concatenate([[0], np.cumsum(~sorted_positive)])
    positives_above = np.concatenate([[0], np.cumsum(sorted_positive[::-1])])[::-1]
    best = int(np.argmax(negatives_below + positives_above))
    if best == 0:
        return float(sorted_scores[0]) - 1.0
    if best == len(scores):
        return float(sorted_scores[-1])
    return float(sorted_scores[best - 1] + sorted_scores[best]) / 2
