"""Two-sample permutation test on runs: are spectra farther apart across conditions than within?"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from koopkit.results import TestResult

from ._params import check_positive_int, check_seed
from .distances import DistanceTest, check_distances, condition_mask

__all__ = ["PermutationTest"]


@dataclass(frozen=True)
class PermutationTest(DistanceTest):
    """Permutation test of the between-minus-within distance of two conditions' spectra.

    Each condition holds several spectra (runs or replicates, e.g. seeds). Under the null
    hypothesis the spectra of both conditions are exchangeable, so every relabelling that
    keeps the two group sizes is equally likely.

    Parameters
    ----------
    n_perm : int
        Random relabellings. When the number of distinct arrangements,
        :math:`\\binom{n_a + n_b}{n_a}`, is at most ``n_perm``, all of them are enumerated
        instead and the p-value is exact.
    seed : int
        Seed of the ``numpy.random.Generator`` that draws the relabellings.

    Notes
    -----
    For a distance matrix :math:`D` and conditions :math:`A, B` of sizes :math:`n_a, n_b`,

    .. math:: T = \\frac{1}{n_a n_b} \\sum_{i \\in A, j \\in B} D_{ij}
              - \\frac{1}{\\binom{n_a}{2} + \\binom{n_b}{2}}
                \\sum_{i < j \\text{ in the same condition}} D_{ij}.

    Sampled: :math:`p = (1 + \\#\\{T^* \\ge T\\}) / (1 + n_{perm})`, which is valid and never
    zero [1]_. Exact: :math:`p = \\#\\{T^* \\ge T\\} / \\binom{n}{n_a}` over all arrangements,
    the observed one included. With equal sizes, swapping the two labels leaves :math:`T`
    unchanged, so every value occurs twice and the smallest exact p is
    :math:`2 / \\binom{n}{n_a}` (0.1 for 3 + 3, 2/252 for 5 + 5).

    Only :math:`D` enters, and each arrangement costs one row of a matrix product: with
    indicator rows :math:`m` of :math:`A`, :math:`m D m^T` is twice the within-:math:`A`
    sum and :math:`m D (1 - m)^T` the between sum. So :meth:`run` computes :math:`D` once
    (:math:`n(n-1)/2` metric calls) and :meth:`run_on_distances` does the rest by index
    and matrix work; memory is :math:`O(n_{perm} \\cdot n)`.

    References
    ----------
    .. [1] B. Phipson and G. K. Smyth, "Permutation p-values should never be zero",
       Statistical Applications in Genetics and Molecular Biology 9(1), 39, 2010.
    """

    n_perm: int = 10_000
    seed: int = 0

    calibrated = True  # a valid p-value: P(p <= alpha) <= alpha under the null
    null_label = "between − within distance, relabelled"

    def __post_init__(self):
        check_positive_int("n_perm", self.n_perm)
        check_seed(self.seed)

    def run_on_distances(self, distances, labels) -> TestResult:
        """Test two conditions given the distances among their spectra.

        A pipeline computes the distance matrix among all spectra once, then, for each pair
        of conditions, passes the rows and columns of that pair
        (``D[np.ix_(idx, idx)]``, ``labels[idx]``).

        Parameters
        ----------
        distances : (n, n) array_like of float
            Symmetric distances among the spectra; the diagonal is ignored.
        labels : sequence of hashable, length n
            The condition of each spectrum: exactly two conditions, at least two each.
        """
        in_a = condition_mask(labels)
        d = check_distances(distances, in_a.size)
        n, n_a = in_a.size, int(in_a.sum())
        observed = float(_statistic(d, in_a[None, :])[0])
        # Tolerance: an arrangement with the same statistic (e.g. the label swap) can
        # differ from the observed one in the last bits because its sums are formed in a
        # different order; it must still count as "at least as extreme". The rounding is
        # relative to the distances, so the tolerance is too: the p-value does not depend
        # on the unit the distances are measured in.
        threshold = observed - 1e-12 * max(abs(observed), float(d.max()))
        n_arrangements = math.comb(n, n_a)
        exact = n_arrangements <= self.n_perm
        if exact:
            null = _statistic(d, _all_arrangements(n, n_a))
            p = np.count_nonzero(null >= threshold) / n_arrangements
        else:
            rng = np.random.default_rng(self.seed)
            null = _statistic(d, rng.permuted(np.broadcast_to(in_a, (self.n_perm, n)), axis=1))
            p = (1 + np.count_nonzero(null >= threshold)) / (1 + self.n_perm)
        return TestResult(observed, float(p), null, n_perm=null.size, exact=exact)


def _statistic(d: np.ndarray, in_a: np.ndarray) -> np.ndarray:
    """Between-minus-within mean distance for each row of a ``(P, n)`` indicator of ``A``.

    The sums are formed in units of the largest distance: in the distances' own unit they
    can overflow to inf, and inf - inf is a NaN that no arrangement counts as "at least as
    extreme", which would drive p to 0.
    """
    n_a = int(in_a[0].sum())
    n_b = in_a.shape[1] - n_a
    scale = float(np.abs(d).max()) or 1.0
    d = d / scale
    m = in_a.astype(np.float64)
    md = m @ d
    twice_aa = np.einsum("pi,pi->p", md, m)
    between = md.sum(axis=1) - twice_aa
    twice_bb = d.sum() - twice_aa - 2.0 * between
    within_pairs = math.comb(n_a, 2) + math.comb(n_b, 2)
    return scale * (between / (n_a * n_b) - (twice_aa + twice_bb) / (2.0 * within_pairs))


def _all_arrangements(n: int, n_a: int) -> np.ndarray:
    """Every way to choose ``n_a`` of ``n`` spectra as ``A``, as a ``(C(n, n_a), n)`` mask."""
    chosen = np.array(list(itertools.combinations(range(n), n_a)))
    out = np.zeros((chosen.shape[0], n), dtype=bool)
    out[np.arange(chosen.shape[0])[:, None], chosen] = True
    return out
