"""The randomized eigenvalue-swap control of Redman et al., kept to reproduce their figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from koopkit.errors import EstimationError, InsufficientDataError
from koopkit.results import Spectrum, TestResult

from ._params import check_positive_int, check_seed
from .distances import distance_matrix, two_conditions

__all__ = ["EigenSwapControl"]


@dataclass(frozen=True)
class EigenSwapControl:
    """Fraction of random swaps of matched eigenvalues that cannot lower the matching cost.

    Parameters
    ----------
    n_shuffles : int
        Random swaps per pair of spectra (100 in the original).
    seed : int
        Seed of the ``numpy.random.Generator`` (the original drew from an unseeded
        ``np.random``).

    Notes
    -----
    For spectra :math:`x, y` of :math:`k` eigenvalues each, with ground cost :math:`c`,
    :math:`W = \\min_\\sigma \\frac1k \\sum_i c(x_i, y_{\\sigma(i)})` (Hungarian algorithm).
    With :math:`W_{true}` and its matching :math:`\\sigma`, each shuffle swaps every matched
    pair :math:`x_i \\leftrightarrow y_{\\sigma(i)}` between the two sets with probability
    1/2 and recomputes :math:`W_{shuffle}`; then

    .. math:: p = \\#\\{W_{true} \\le W_{shuffle}\\} / n_{shuffles}.

    Swapping matched pairs keeps the same pairs, so a matching of cost :math:`W_{true}`
    still exists and :math:`W_{shuffle} \\le W_{true}` always: p is the fraction of swaps
    after which re-matching cannot lower the cost. It is one-sided by construction. A large
    p means interleaved spectra (no evidence of non-conjugacy), a small p separated ones.
    It is not a two-sample test and has no size guarantee (``calibrated = False``: the
    pipeline reports it as an uncalibrated score and does not Holm-correct it; it can be
    exactly 0); use ``"permutation"`` for a p-value.

    The ground cost comes from the metric between single eigenvalues,
    :math:`c(\\lambda, \\mu) = \\mathrm{metric}(\\{\\lambda\\}, \\{\\mu\\})`: ``|lambda - mu|``
    for ``"wasserstein"`` and ``"matched-mean"`` (as in the original), the distance of
    log-rates for ``"wasserstein-log"``.

    When a condition holds several spectra, the i-th spectrum of one condition is paired
    with the i-th of the other (e.g. the same seed), the control runs on each pair, and the
    counts are pooled, as the paper pooled over 25 seeds. The statistic is the mean
    :math:`W_{true}` over pairs and ``null`` holds every :math:`W_{shuffle}`, pair by pair.

    The original OMD script has two bugs, fixed here: its 2nd and 3rd loops compared
    against an empty shuffled set (and the 3rd swapped with the wrong spectrum), so the
    distance was NaN and both p-values printed 0.0 whatever the data.

    References
    ----------
    .. [1] W. T. Redman et al., "Identifying Equivalent Training Dynamics", NeurIPS 2024,
       ``*_computing_significance.py`` in the authors' code.
    """

    n_shuffles: int = 100
    seed: int = 0

    calibrated = False  # the paper's fraction, not a p-value with a size guarantee
    null_label = "W_shuffle (matching cost after random swaps)"

    def __post_init__(self):
        check_positive_int("n_shuffles", self.n_shuffles)
        check_seed(self.seed)

    def run(self, groups, metric) -> TestResult:
        """Run the control on two conditions.

        Parameters
        ----------
        groups : mapping of label to list of Spectrum
            Exactly two conditions with the same number of spectra, paired by position;
            paired spectra have the same number of eigenvalues.
        metric : callable (Spectrum, Spectrum) -> float
            Gives the ground cost between single eigenvalues.
        """
        first, second = _paired_spectra(groups)
        rng = np.random.default_rng(self.seed)
        statistics, nulls, hits = [], [], 0
        for a, b in zip(first, second, strict=True):
            w_true, w_shuffle, scale = self._shuffle(a, b, metric, rng)
            # Every W_shuffle <= W_true; "equal" means the swap cannot lower the cost. The
            # fresh assignment sums the same pair costs in another order, so equality holds
            # only up to rounding (the original relied on bit-identical sums), and that
            # rounding is relative to the costs: so is the tolerance, and the fraction does
            # not depend on the unit of the eigenvalues.
            hits += np.count_nonzero(w_true <= w_shuffle + 1e-12 * scale)
            statistics.append(w_true)
            nulls.append(w_shuffle)
        null = np.concatenate(nulls)
        return TestResult(float(np.mean(statistics)), hits / null.size, null, n_perm=null.size)

    def _shuffle(self, a, b, metric, rng) -> tuple[float, np.ndarray, float]:
        """``W_true``, the ``n_shuffles`` values of ``W_shuffle`` and the largest pair cost."""
        k = a.eigenvalues.size
        cost = distance_matrix(_singletons(a) + _singletons(b), metric)
        between = cost[:k, k:]
        _, sigma = linear_sum_assignment(between)
        w_true = float(between[np.arange(k), sigma].mean())
        own = np.arange(k)
        w_shuffle = np.empty(self.n_shuffles)
        for t, swap in enumerate(rng.random((self.n_shuffles, k)) < 0.5):
            rows = np.where(swap, k + sigma, own)  # x_i, or its partner y_sigma(i) swapped in
            cols = k + own
            cols[sigma] = np.where(swap, own, k + sigma)
            shuffled = cost[np.ix_(rows, cols)]
            r, c = linear_sum_assignment(shuffled)
            w_shuffle[t] = shuffled[r, c].mean()
        return w_true, w_shuffle, float(cost.max())


def _paired_spectra(groups) -> tuple[list, list]:
    """The two conditions' spectra, checked to pair up by position and by size."""
    (name_a, first), (name_b, second) = two_conditions(groups)
    if not first or not second or len(first) != len(second):
        raise InsufficientDataError(
            f"Invalid conditions {name_a!r} and {name_b!r} with {len(first)} and {len(second)} "
            "spectra; expected the same positive number, paired by replicate."
        )
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.eigenvalues.size != b.eigenvalues.size or a.eigenvalues.size == 0:
            raise EstimationError(
                f"Invalid spectrum pair {i} with {a.eigenvalues.size} and {b.eigenvalues.size} "
                "eigenvalues; expected the same positive number (swaps exchange matched pairs)."
            )
    return first, second


def _singletons(spectrum) -> list[Spectrum]:
    """One single-eigenvalue spectrum per eigenvalue, with its amplitude when there is one."""
    amplitudes = spectrum.amplitudes
    return [
        Spectrum(
            eigenvalues=spectrum.eigenvalues[i : i + 1],
            amplitudes=None if amplitudes is None else amplitudes[i : i + 1],
        )
        for i in range(spectrum.eigenvalues.size)
    ]
