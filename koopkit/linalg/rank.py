"""Rank rules: how many singular triplets of the snapshot matrix a truncated estimate keeps.

The same rules as PyDMD's ``svd_rank``, spelled out: an int keeps that many, a float in
(0, 1) the fewest that hold that fraction of the energy, ``"gd"`` the Gavish-Donoho optimal
hard threshold for unknown noise, ``None`` every singular value above the data's rounding
noise. No rule keeps a singular value at or below that noise: its direction is rounding
error, and its eigenvalue would be too.

The noise floor is ``10 (u / sqrt 3) ||Z||_F (1 / sqrt(n) + 1 / sqrt(T))`` for n features, T
snapshots and data of relative precision ``u``: independent roundings of entries of similar
size make a random matrix whose spectral norm is about ``(u / sqrt 3) rms(Z) (sqrt n +
sqrt T)`` (and never less than float64's arithmetic error, ``10 eps ||Z||_F``). It does
not grow with the features, as ``numpy.linalg.matrix_rank``'s
``max(shape) u s_max`` does (which, for float32 data, passes ``s_max`` itself at 8.4 million
features), and it is hundreds of times below the worst case ``u ||Z||_F``, which refused
modes of float32 weights far above their actual rounding.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np

from ..errors import EstimationError

__all__ = [
    "RANK_RULES",
    "check_rank_rule",
    "rounding_noise",
    "select_rank",
    "optimal_hard_threshold",
]

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


ROUNDING_NOISE_FACTOR = 10.0
"""Margin of the noise floor over the expected spectral norm of the rounding errors."""


def rounding_noise(rounding_unit: float, frobenius_norm: float, shape: tuple[int, int]) -> float:
    """The singular value below which data of precision ``rounding_unit``, Frobenius norm
    ``frobenius_norm`` and ``shape`` (features, snapshots) hold only rounding noise.

    Never below ``10 eps ||Z||_F``: the float64 arithmetic of the factorization errs by that
    much whatever the data's precision.
    """
    spread = 1 / np.sqrt(max(shape[0], 1)) + 1 / np.sqrt(max(shape[1], 1))
    stored = rounding_unit / np.sqrt(3) * spread
    arithmetic = float(np.finfo(np.float64).eps)
    return float(ROUNDING_NOISE_FACTOR * max(stored, arithmetic) * frobenius_norm)


def select_rank(
    singular_values: np.ndarray, rank, shape: tuple[int, int], *, noise: float | None = None
) -> int:
    """Number of leading singular values kept by the rule ``rank``.

    Parameters
    ----------
    singular_values : (k,) array
        Singular values of the snapshot matrix, descending.
    rank : int, float in (0, 1), "gd" or None
        The rule (see the module docstring); an int larger than ``k`` keeps ``k``, and
        ``"gd"`` keeps at least one value above the noise.
    shape : (int, int)
        Shape of the snapshot matrix, (features, snapshots); sets the Gavish-Donoho noise
        level. Values past ``min(shape)`` (rounding noise of a factor with more rows) are
        ignored.
    noise : float, optional
        Singular values at or below this are rounding noise (see :func:`rounding_noise`);
        by default that of float64 data whose Frobenius norm the values give.

    Raises
    ------
    EstimationError
        When an int rank asks for a singular value at or below the noise.
    """
    s = np.asarray(singular_values, dtype=np.float64)[: min(shape)]
    if noise is None:
        norm = float(np.sqrt(np.sum(s**2)))
        noise = rounding_noise(float(np.finfo(np.float64).eps), norm, shape)
    resolved = int(np.count_nonzero(s > noise))
    if resolved == 0:
        return 0
    if rank is None:
        return resolved
    if rank == "gd":
        kept = max(1, int(np.count_nonzero(s > optimal_hard_threshold(s, shape))))
    elif isinstance(rank, Integral):
        kept = min(int(rank), s.size)
        if kept > resolved:
            values = "value" if resolved == 1 else "values"
            raise EstimationError(
                f"Expected rank at most {resolved}: the data have {resolved} singular {values} "
                f"above their rounding noise ({noise:.3g}). Got {rank} instead."
            )
    else:
        energy = np.cumsum(s**2) / np.sum(s**2)
        kept = min(int(np.searchsorted(energy, rank)) + 1, s.size)
    return min(kept, resolved)


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
