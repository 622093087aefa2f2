"""The rules for training images' pixel values, shared by ``iscat-diffusion dataset check`` and training.

An image is refused when a pixel is

- NaN or infinite: it turns the loss of every batch that holds it into NaN;
- larger in magnitude than ``MAX_MAGNITUDE``: squared (the loss, the power spectrum) it no longer fits float32;
- further than ``MAX_SPREADS`` robust spreads from the training set's median (``ValueBounds``). The training set
  is normalised by its median and robust spread, so such a pixel becomes a value above ``MAX_SPREADS`` in
  normalised units: one of them dominates the loss of its batch and the spectral density stored in the model.
  No recorded iSCAT image comes near it: a pixel whose noise is shot noise has a spread of sqrt(counts), so a
  16-bit camera's full scale lies at most (65535 - B) / sqrt(B) spreads above a background of B counts, below
  ``MAX_SPREADS`` for any B above about 40 counts, and iSCAT records on a bright reference field; contrast or
  ratio images (around 0 or 1) have a noise far above 1e-4 of their range. A fixed bound in physical units
  would refuse raw camera counts (0..65535) or pass contrasts of 1e6 alike.

The spread is the median absolute deviation times ``MAD_TO_STD`` (the standard deviation for Gaussian data,
the background noise and speckle that make up almost every pixel); it tolerates up to 50 % outliers, so a few
absurd pixels cannot widen their own bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# MAD to standard deviation for a normal distribution: 1 / Phi^-1(3/4).
MAD_TO_STD = 1.4826
MAX_MAGNITUDE = 1e18  # its square, 1e36, leaves float32 (max 3.4e38) room for sums of a few hundred such
MAX_SPREADS = 10_000


def robust_centre_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, MAD spread) of the finite ``values``; the plain standard deviation where the MAD is 0.

    Raises ValueError when no value is finite or all finite values are equal.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("no finite pixel")
    centre = float(np.median(finite))
    scale = MAD_TO_STD * float(np.median(np.abs(finite - centre)))
    if scale == 0:
        # More than half the pixels share one value (clipped or padded data): the MAD says nothing, so
        # fall back to the plain standard deviation rather than dividing by zero.
        scale = float(finite.std())
    if scale == 0:
        raise ValueError(f"constant ({centre:g})")
    return centre, scale


def value_problem(values: np.ndarray) -> str | None:
    """What is wrong with an image's pixel values on their own (NaN, Inf, a magnitude above ``MAX_MAGNITUDE``),
    as a phrase for an error message; None when nothing is."""
    if not np.issubdtype(values.dtype, np.floating):
        return _magnitude_problem(values)  # integers are finite
    finite = np.isfinite(values)
    if not finite.all():
        nan = int(np.isnan(values).sum())
        return f"{nan} NaN and {values.size - int(finite.sum()) - nan} Inf pixels"
    return _magnitude_problem(values)


def _magnitude_problem(values: np.ndarray) -> str | None:
    if not values.size:
        return None
    largest = max(abs(float(values.min())), abs(float(values.max())))
    if largest > MAX_MAGNITUDE:
        return f"a pixel of magnitude {largest:.3g}, above {MAX_MAGNITUDE:g} (too large for float32 arithmetic)"
    return None


@dataclass(frozen=True)
class ValueBounds:
    """The plausible pixel values of a data set: ``centre`` +- ``MAX_SPREADS`` times ``scale`` (its median and
    robust spread, see the module docstring)."""

    centre: float
    scale: float

    def problem(self, low: float, high: float) -> str | None:
        """Why an image whose values span ``low`` .. ``high`` is refused, as a phrase; None when it is not."""
        worst = low if self.centre - low > high - self.centre else high
        spreads = abs(worst - self.centre) / self.scale
        if spreads > MAX_SPREADS:
            return (
                f"a pixel of {worst:.4g} lies {spreads:.3g} robust spreads from the data's median {self.centre:.4g} "
                f"(spread {self.scale:.3g}); more than {MAX_SPREADS} is not a measured value (a hot pixel, a "
                "wrong file or a unit mix-up)"
            )
        return None
