"""Bootstrap confidence interval for the distance between two conditions' spectra."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from koopkit.errors import EstimationError
from koopkit.results import TestResult

from ._params import check_positive_int, check_seed
from .distances import DistanceTest, check_distances, condition_mask

__all__ = ["BootstrapTest"]


@dataclass(frozen=True)
class BootstrapTest(DistanceTest):
    """Percentile bootstrap of the mean between-condition distance, resampling runs.

    Parameters
    ----------
    n_boot : int
        Bootstrap draws.
    level : float
        Confidence level of the interval, in (0, 1).
    seed : int
        Seed of the ``numpy.random.Generator`` that draws the resamples.

    Notes
    -----
    Each draw resamples the spectra (runs or replicates) of each condition with
    replacement, keeping the sizes :math:`n_a, n_b`. The statistic is the mean between
    distance :math:`\\bar D_{AB}`; the interval is the :math:`(1 \\mp \\text{level})/2`
    percentiles of its draws, which are returned as ``null``.

    ``p_value`` is the share of draws in which the mean between distance does not
    exceed the mean within-condition distance (pairs of distinct spectra in the same
    condition, pooled over both), counted as :math:`(1 + h) / (1 + m)` for :math:`h` such
    draws among :math:`m`, so that it is never exactly 0. It estimates
    :math:`\\Pr^*(\\bar D^*_{AB} - \\bar D^*_{within} \\le 0)` and measures how robust the
    separation is to which runs were drawn: small means almost every resample puts the
    conditions farther apart than runs within a condition. It is not a calibrated test of
    exchangeability (``calibrated = False``: the pipeline does not Holm-correct it); use
    ``"permutation"`` for that. Draws with no within pair (every resampled run the same
    one, in both conditions) are left out of it.

    Like :class:`PermutationTest`, :meth:`run` computes the distance matrix once and
    :meth:`run_on_distances` does the rest by index work; memory is
    :math:`O(n_{boot} \\cdot n^2)`.

    References
    ----------
    .. [1] B. Efron and R. J. Tibshirani, "An Introduction to the Bootstrap", Chapman &
       Hall, 1993, ch. 13 (percentile intervals).
    """

    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0

    calibrated = False  # a robustness score, not a p-value with a size guarantee
    null_label = "bootstrap draws of the mean between distance"

    def __post_init__(self):
        check_positive_int("n_boot", self.n_boot)
        check_seed(self.seed)
        if not 0 < self.level < 1:
            raise EstimationError(f"Invalid level {self.level!r}; expected a number in (0, 1).")

    def run_on_distances(self, distances, labels) -> TestResult:
        """Bootstrap two conditions given the distances among their spectra.

        Parameters
        ----------
        distances : (n, n) array_like of float
            Symmetric distances among the spectra; the diagonal is ignored.
        labels : sequence of hashable, length n
            The condition of each spectrum: exactly two conditions, at least two each.
        """
        in_a = condition_mask(labels)
        d = check_distances(distances, in_a.size)
        # Work in units of the largest distance and scale back: in the distances' own unit
        # sums over many pairs can overflow to inf (inf - inf is NaN, never <= 0), and a
        # draw whose between mean equals its within mean can differ in the last bits,
        # whichever the unit; the tolerance below is relative to the distances.
        scale = float(np.abs(d).max()) or 1.0
        d = d / scale
        a, b = np.flatnonzero(in_a), np.flatnonzero(~in_a)
        rng = np.random.default_rng(self.seed)
        draw_a = a[rng.integers(0, a.size, (self.n_boot, a.size))]
        draw_b = b[rng.integers(0, b.size, (self.n_boot, b.size))]
        between = d[draw_a[:, :, None], draw_b[:, None, :]].mean(axis=(1, 2))
        sum_a, pairs_a = _within(d, draw_a)
        sum_b, pairs_b = _within(d, draw_b)
        pairs = pairs_a + pairs_b
        defined = pairs > 0
        gap = between[defined] - (sum_a + sum_b)[defined] / pairs[defined]
        p = (1 + np.count_nonzero(gap <= 1e-12)) / (1 + gap.size) if gap.size else float("nan")
        tails = [(1 - self.level) / 2, (1 + self.level) / 2]
        low, high = scale * np.quantile(between, tails)
        observed = scale * float(d[np.ix_(a, b)].mean())
        return TestResult(
            observed,
            float(p),
            scale * between,
            n_perm=self.n_boot,
            interval=(float(low), float(high)),
        )


def _within(d: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per draw, the summed distance and the number of pairs of distinct spectra drawn."""
    block = d[draws[:, :, None], draws[:, None, :]]  # zero wherever a spectrum meets itself
    distinct = draws[:, :, None] != draws[:, None, :]
    return block.sum(axis=(1, 2)) / 2, distinct.sum(axis=(1, 2)) / 2
