"""The 1-Wasserstein distance between eigenvalue sets, in the complex plane or in log space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from koopkit.errors import EstimationError

from ._validate import amplitude_weights, eigenvalues_of

__all__ = ["Wasserstein", "LogWasserstein"]

WEIGHTS = ("uniform", "amplitude")


@dataclass(frozen=True)
class Wasserstein:
    """Exact 1-Wasserstein distance between two spectra's eigenvalues in the complex plane.

    Parameters
    ----------
    weights : {"uniform", "amplitude"}
        Mass of each eigenvalue: equal, or proportional to ``|amplitude|`` (normalised to
        one per spectrum), so that modes that carry little of the trajectory count little.

    Notes
    -----
    For eigenvalues :math:`x_1..x_m`, :math:`y_1..y_n` with masses :math:`a, b`
    (each summing to one),

    .. math:: W_1 = \\min_{P \\ge 0,\\ P1 = a,\\ P^T 1 = b} \\sum_{ij} P_{ij} |x_i - y_j|,

    solved exactly by the network simplex (POT ``ot.emd2``). With equal sizes and uniform
    masses an optimal :math:`P` is a permutation matrix over :math:`m` (Birkhoff), so
    :math:`W_1` equals the optimal-matching mean of Redman et al. (``"matched-mean"``);
    with unequal sizes mass is split instead of points being dropped. :math:`W_1` is a
    metric on probability measures: symmetric, zero between equal sets, and it obeys the
    triangle inequality.

    References
    ----------
    .. [1] G. Peyré and M. Cuturi, "Computational Optimal Transport", Foundations and
       Trends in Machine Learning 11(5-6), 2019.
    .. [2] R. Flamary et al., "POT: Python Optimal Transport", JMLR 22(78), 2021.
    .. [3] W. T. Redman et al., "Identifying Equivalent Training Dynamics", NeurIPS 2024.
    """

    weights: str = "uniform"

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise EstimationError(
                f"Invalid weights {self.weights!r}; expected one of {', '.join(WEIGHTS)}."
            )

    def __call__(self, a, b) -> float:
        import ot  # imports torch: load it only when a distance is computed

        x, y = self._points(a, "a"), self._points(b, "b")
        cost = np.abs(x[:, None] - y[None, :])
        return float(ot.emd2(self._masses(a, x.size, "a"), self._masses(b, y.size, "b"), cost))

    def _points(self, spectrum, arg: str) -> np.ndarray:
        return eigenvalues_of(spectrum, arg)

    def _masses(self, spectrum, size: int, arg: str) -> np.ndarray:
        if self.weights == "amplitude":
            return amplitude_weights(spectrum, arg)
        return np.full(size, 1.0 / size)


@dataclass(frozen=True)
class LogWasserstein(Wasserstein):
    """1-Wasserstein distance between continuous-time rates ``log(lambda) / dt``.

    Runs sampled every ``k`` steps have discrete-time eigenvalues :math:`\\lambda^k`; their
    logarithms divided by the sampling interval are comparable across runs, the raw
    eigenvalues are not.

    Parameters
    ----------
    weights : {"uniform", "amplitude"}
        As for :class:`Wasserstein`.
    dt : float
        Sampling interval (optimizer steps between snapshots); both spectra share it. To
        compare runs recorded at different intervals, rescale one spectrum or compare each
        against references sampled alike.

    Notes
    -----
    The logarithm is the principal branch, :math:`\\log|\\lambda| + i \\arg\\lambda` with
    :math:`\\arg \\in (-\\pi, \\pi]`, so :math:`\\log(\\lambda^k)/k = \\log\\lambda` only while
    :math:`k|\\arg\\lambda| < \\pi`. Eigenvalues near the negative real axis sit on the
    branch cut: two close ones on either side land :math:`2\\pi/dt` apart. A real negative
    eigenvalue is put on the upper side (argument :math:`+\\pi`) whatever the sign of its
    zero imaginary part, so equal spectra are at distance 0. A zero eigenvalue has no
    logarithm and is an error.
    """

    dt: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (np.isfinite(self.dt) and self.dt > 0):
            raise EstimationError(f"Invalid dt {self.dt!r}; expected a positive finite number.")

    def _points(self, spectrum, arg: str) -> np.ndarray:
        values = eigenvalues_of(spectrum, arg)
        zero = np.flatnonzero(values == 0)
        if zero.size:
            raise EstimationError(
                f"Invalid spectrum {arg!r}: eigenvalue 0 at index {int(zero[0])} has no "
                "logarithm; expected nonzero eigenvalues (truncate the rank to drop them)."
            )
        # -0.0 + 0.0 == +0.0: a real negative eigenvalue whose imaginary part is a negative
        # zero (from conj, sorting, a round trip) takes the same side of the cut as its
        # +0.0 twin, so equal spectra stay at distance 0.
        return np.log(values + 0j) / self.dt
