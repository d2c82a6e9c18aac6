"""Least-squares DMD in feature space: small, exact, and a template for new estimators."""

from __future__ import annotations

from numbers import Integral

import numpy as np

from koopkit.errors import EstimationError, InsufficientDataError, NonFiniteDataError
from koopkit.results import Spectrum

__all__ = ["LstsqDMD"]


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise EstimationError(f"Expected {name} to be an int >= {minimum}. Got {value!r} instead.")


class LstsqDMD:
    """Exact DMD by a least-squares fit of ``x_{t+1} = A x_t`` in feature space.

    Parameters
    ----------
    rank : int, optional
        Keep the ``rank`` leading singular directions of the snapshots ``X``; None keeps every
        one above the rounding noise of the input's dtype.
    max_features : int
        Refuse wider data: the fit holds a ``(features, pairs)`` matrix in memory. Use the
        built-in ``"dmd"`` (method of snapshots, streamed) for weight trajectories.

    Notes
    -----
    ``fit(trajectories)`` takes a list of ``(steps, features)`` array-likes, or one such array.
    ``X`` and ``Y`` hold, as columns, the snapshots before and after every step inside each
    trajectory (no pair crosses from one trajectory into the next). With the truncated SVD
    ``X = U S V^*`` the reduced operator is

    .. math:: \\tilde A = U^* Y V S^{-1},

    whose eigenvalues are the DMD eigenvalues; at full rank they are those of the
    least-squares ``A = Y X^+``, so they do not change under an invertible change of
    coordinates ``x -> M x``. Modes are the exact modes ``Y V S^{-1} W``; amplitudes are
    ``|Phi^+ x_0|`` summed over the trajectories' first snapshots.

    References
    ----------
    .. [1] J. H. Tu, C. W. Rowley, D. M. Luchtenburg, S. L. Brunton, J. N. Kutz, "On dynamic
       mode decomposition: theory and applications", J. Comput. Dyn. 1(2), 2014.
    """

    name = "lstsq-dmd"

    def __init__(self, rank: int | None = None, *, max_features: int = 4096):
        if rank is not None:
            _check_int("rank", rank, 1)
        _check_int("max_features", max_features, 1)
        self.rank = rank
        self.max_features = max_features

    def __repr__(self) -> str:
        return f"LstsqDMD(rank={self.rank!r}, max_features={self.max_features!r})"

    def fit(self, trajectories) -> Spectrum:
        """Estimate the spectrum of the trajectories; the input is only read."""
        arrays, eps = self._read(trajectories)
        x = np.hstack([a[:-1].T for a in arrays])
        y = np.hstack([a[1:].T for a in arrays])
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        r = self._kept(s, x.shape, eps)
        u, s, v = u[:, :r], s[:r], vh[:r].conj().T
        y_v_sinv = (y @ v) / s
        eigenvalues, w = np.linalg.eig(u.conj().T @ y_v_sinv)
        order = np.lexsort((-np.angle(eigenvalues), -np.abs(eigenvalues)))
        eigenvalues, w = eigenvalues[order], w[:, order]
        modes = y_v_sinv @ w
        amplitudes = sum(np.abs(np.linalg.lstsq(modes, a[0], rcond=None)[0]) for a in arrays)
        return Spectrum(
            eigenvalues=eigenvalues,
            amplitudes=amplitudes,
            modes=modes,
            meta={
                "estimator": self.name,
                "params": {"rank": self.rank, "max_features": self.max_features},
                "rank": int(r),
                "trajectories": len(arrays),
                "snapshots": sum(len(a) for a in arrays),
                "features": int(x.shape[0]),
            },
        )

    def _read(self, trajectories) -> tuple[list[np.ndarray], float]:
        """float64 copies of the trajectories (shapes checked before any data is read), and the
        rounding unit of the input's dtype."""
        if hasattr(trajectories, "shape"):  # one (steps, features) array
            trajectories = [trajectories]
        trajectories = list(trajectories)
        if not trajectories:
            raise InsufficientDataError("Expected at least 1 trajectory. Got 0 instead.")
        shapes = [tuple(getattr(t, "shape", ())) for t in trajectories]
        for i, shape in enumerate(shapes):
            if len(shape) != 2:
                raise EstimationError(
                    f"Expected trajectory {i} to be 2-D (steps, features). "
                    f"Got shape {shape} instead."
                )
            if shape[1] != shapes[0][1]:
                raise EstimationError(
                    f"Expected {shapes[0][1]} features in trajectory {i}, as in trajectory 0. "
                    f"Got {shape[1]} instead."
                )
            if shape[0] < 2:
                raise InsufficientDataError(
                    f"Expected at least 2 steps in trajectory {i}. Got {shape[0]} instead."
                )
        if shapes[0][1] == 0:
            raise InsufficientDataError("Expected at least 1 feature. Got 0 instead.")
        if shapes[0][1] > self.max_features:
            raise EstimationError(
                f"Expected at most max_features={self.max_features} features. Got "
                f"{shapes[0][1]} instead; use the estimator 'dmd' for wide data."
            )
        out, eps = [], float(np.finfo(np.float64).eps)
        for i, t in enumerate(trajectories):
            data = np.asarray(t)
            if data.dtype.kind not in "fiu":
                raise EstimationError(
                    f"Expected real numbers in trajectory {i}. Got dtype {data.dtype} instead."
                )
            if data.dtype.kind == "f":
                eps = max(eps, float(np.finfo(data.dtype).eps))
            data = data.astype(np.float64)  # a copy: the input is never written
            if not np.isfinite(data).all():
                raise NonFiniteDataError(
                    f"Expected finite values in trajectory {i}. Got NaN or Inf instead."
                )
            out.append(data)
        return out, eps

    def _kept(self, s: np.ndarray, shape: tuple[int, int], eps: float) -> int:
        if self.rank is None:
            return max(1, int(np.count_nonzero(s > max(shape) * eps * s[0])))
        if self.rank > s.size or s[self.rank - 1] == 0:
            most = int(np.count_nonzero(s))
            raise InsufficientDataError(
                f"Expected rank at most {most} (features {shape[0]}, pairs {shape[1]}, "
                f"nonzero singular values {most}). Got {self.rank} instead."
            )
        return self.rank
