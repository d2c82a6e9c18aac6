"""Holm's step-down correction of p-values, for a vector or a matrix of pairwise tests."""

from __future__ import annotations

import numpy as np

from .errors import EstimationError, NonFiniteDataError

__all__ = ["holm", "holm_matrix"]


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values, controlling the family-wise error rate.

    Parameters
    ----------
    p_values : (m,) array_like of float
        p-values in [0, 1]; NaN marks a missing test, which is left NaN and not counted in
        the family.

    Returns
    -------
    (m,) float ndarray
        Adjusted p-values, in the input order.

    Notes
    -----
    With the :math:`m` present p-values sorted, :math:`p_{(1)} \\le \\dots \\le p_{(m)}`,

    .. math:: \\tilde p_{(i)} = \\min\\Big(1, \\max_{j \\le i} (m - j + 1)\\, p_{(j)}\\Big).

    The running maximum keeps the adjusted values in the order of the raw ones, so that
    rejecting :math:`\\tilde p \\le \\alpha` is the step-down procedure.

    References
    ----------
    .. [1] S. Holm, "A simple sequentially rejective multiple test procedure",
       Scandinavian Journal of Statistics 6(2), 65-70, 1979.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise EstimationError(f"Invalid p_values of shape {p.shape}; expected a 1-D array.")
    present = ~np.isnan(p)
    if np.isinf(p).any():
        raise NonFiniteDataError("Invalid p_values holding Inf; expected values in [0, 1] or NaN.")
    if ((p[present] < 0) | (p[present] > 1)).any():
        bad = p[present][(p[present] < 0) | (p[present] > 1)][0]
        raise EstimationError(f"Invalid p-value {float(bad)!r}; expected values in [0, 1] or NaN.")
    values = p[present]
    m = values.size
    order = np.argsort(values, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * values[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    out = np.full(p.shape, np.nan)
    out[present] = adjusted
    return out


def holm_matrix(p_matrix) -> np.ndarray:
    """Holm-adjusted p-values of a symmetric matrix of pairwise tests.

    Parameters
    ----------
    p_matrix : (k, k) array_like of float
        Symmetric p-values, entry ``(i, j)`` for conditions ``i`` and ``j``; the diagonal is
        ignored and NaN off-diagonal entries mark missing tests.

    Returns
    -------
    (k, k) float ndarray
        Symmetric adjusted p-values with a NaN diagonal.

    Notes
    -----
    The :math:`k(k-1)/2` tests of the upper triangle form one family (:func:`holm`); the
    lower triangle mirrors it.
    """
    p = np.asarray(p_matrix, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise EstimationError(f"Invalid p_matrix of shape {p.shape}; expected a square matrix.")
    rows, cols = np.triu_indices(p.shape[0], k=1)
    if not np.allclose(p[rows, cols], p[cols, rows], rtol=1e-12, atol=0, equal_nan=True):
        raise EstimationError("Invalid p_matrix that is not symmetric; expected P == P.T.")
    out = np.full(p.shape, np.nan)
    out[rows, cols] = holm(p[rows, cols])
    out[cols, rows] = out[rows, cols]
    return out
