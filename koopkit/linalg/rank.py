"""Rank rules: how many singular triplets of the snapshot matrix a truncated estimate keeps.

The same rules as PyDMD's ``svd_rank``, spelled out: an int keeps that many, a float in
(0, 1) the fewest that hold that fraction of the energy, ``"gd"`` the Gavish-Donoho optimal
hard threshold for unknown noise, ``None`` every singular value above the data's rounding
noise.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np

from ..errors import EstimationError

__all__ = ["RANK_RULES", "check_rank_rule", "select_rank", "optimal_hard_threshold"]

RANK_RULES = ("gd",)
"""Named rank rules, besides an int, a float in (0, 1) and None."""


def check_rank_rule(rank) -> None:
    """Raise :class:`EstimationError` unless ``rank`` is a valid rule."""
    if rank is None or rank in RANK_RULES:
        return
    if isinstance(rank, Integral) and not isinstance(rank, bool) and rank >= 1:
        return
    if isinstance(rank, Real) and not isinstance(rank, Integral) and 0 < rank < 1:
        return
    raise EstimationError(
        "Expected rank to be a positive int, a float in (0, 1), 'gd' or None. "
        f"Got {rank!r} instead."
    )


def select_rank(
    singular_values: np.ndarray,
    rank,
    shape: tuple[int, int],
    *,
    rounding_unit: float = float(np.finfo(np.float64).eps),
) -> int:
    """Number of leading singular values kept by the rule ``rank``.

    Parameters
    ----------
    singular_values : (k,) array
        Singular values of the snapshot matrix, descending.
    rank : int, float in (0, 1), "gd" or None
        The rule (see the module docstring); an int larger than ``k`` keeps ``k``, and
        ``"gd"`` keeps at least one. Every rule keeps none of all-zero singular values.
    shape : (int, int)
        Shape of the snapshot matrix, (features, snapshots); sets the noise levels. Values
        past ``min(shape)`` (rounding noise of a factor with more rows) are ignored.
    rounding_unit : float
        Relative precision of the data: ``rank=None`` keeps singular values above
        ``max(shape) * rounding_unit * s_max``, as ``numpy.linalg.matrix_rank`` does for the
        data's dtype (1.2e-7 for float32 data, even when computed in float64).
    """
    s = np.asarray(singular_values, dtype=np.float64)[: min(shape)]
    if s.size == 0 or s[0] == 0:
        return 0
    if rank is None:
        return int(np.count_nonzero(s > max(shape) * rounding_unit * s[0]))
    if rank == "gd":
        return max(1, int(np.count_nonzero(s > optimal_hard_threshold(s, shape))))
    if isinstance(rank, Integral):
        return min(int(rank), s.size)
    energy = np.cumsum(s**2) / np.sum(s**2)
    return min(int(np.searchsorted(energy, rank)) + 1, s.size)


def optimal_hard_threshold(singular_values: np.ndarray, shape: tuple[int, int]) -> float:
    """Gavish-Donoho threshold for white noise of unknown level: ``omega(beta) * median(s)``.

    ``beta`` is the aspect ratio (short side over long side) and ``omega`` the cubic
    approximation ``0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` of the paper [1]_ (as in
    PyDMD).

    References
    ----------
    .. [1] M. Gavish and D. L. Donoho, "The optimal hard threshold for singular values is
       4/sqrt(3)", IEEE Trans. Inf. Theory 60(8), 5040-5053, 2014.
    """
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return float(omega * np.median(singular_values))
