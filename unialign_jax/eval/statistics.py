"""Means over seeds with Student-t 95% confidence intervals, and paired differences.

For n values x_1..x_n (one per seed) the interval of the mean is
    mean ± t_{(1+c)/2, n-1} · s / sqrt(n),     s² = Σ (x_i - mean)² / (n - 1)
with t the Student-t quantile (scipy.stats.t.ppf) and c the confidence (0.95). For two methods
run on the same seeds the interval is that of the per-seed differences d_i = a_i - b_i (a paired
t interval): a gap is resolved when the interval excludes 0, noise when it contains 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The Student-t quantile t_{probability, dof}, e.g. t_{0.975, 4} = 2.776."""
    if not 0 < probability < 1:
        raise ValueError(f"probability must lie in (0, 1), got {probability}")
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom must be >= 1, got {degrees_of_freedom}")
    return float(stats.t.ppf(probability, degrees_of_freedom))


class Interval(NamedTuple):
    """Mean of n values and its confidence interval [low, high] (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def resolved(self) -> bool:
        """True when the interval excludes 0 (the sign of the mean is resolved)."""
        return bool(self.low > 0 or self.high < 0)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The t interval of the mean of `values` (module docstring); one value gives NaN bounds."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"mean_interval needs a non-empty list of numbers, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"mean_interval needs finite values, got {values.tolist()}")
    mean = float(values.mean())
    if values.size < 2:
        return Interval(mean, float("nan"), float("nan"), 1)
    half = t_quantile((1 + confidence) / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return Interval(mean, mean - half, mean + half, int(values.size))
