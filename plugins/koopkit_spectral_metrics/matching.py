"""The optimal-matching mean distance of Redman et al., kept to reproduce their figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from koopkit.errors import EstimationError

from ._validate import eigenvalues_of

__all__ = ["MatchedMean"]


@dataclass(frozen=True)
class MatchedMean:
    """Mean distance between eigenvalues paired by an optimal one-to-one matching.

    Notes
    -----
    For equal-size sets :math:`x_1..x_k`, :math:`y_1..y_k`,

    .. math:: d = \\min_{\\sigma} \\frac{1}{k} \\sum_i |x_i - y_{\\sigma(i)}|,

    found with the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``). It equals
    the uniform-weight 1-Wasserstein distance (``"wasserstein"``). The original code also
    accepted sets of different sizes and silently dropped the unmatched points, which is
    not a distance between the spectra; here that is an error.

    References
    ----------
    .. [1] W. T. Redman et al., "Identifying Equivalent Training Dynamics", NeurIPS 2024,
       ``wass_dist`` in the authors' code.
    """

    def __call__(self, a, b) -> float:
        x, y = eigenvalues_of(a, "a"), eigenvalues_of(b, "b")
        if x.size != y.size:
            raise EstimationError(
                f"Invalid spectra with {x.size} and {y.size} eigenvalues; matched-mean expects "
                "equal sizes (use 'wasserstein' for sets of different sizes)."
            )
        cost = np.abs(x[:, None] - y[None, :])
        rows, cols = linear_sum_assignment(cost)
        return float(cost[rows, cols].mean())
