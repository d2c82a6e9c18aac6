"""Exact DMD, with ResDMD residuals, from a small factor or from the Gram of the snapshots.

Every estimator reduces its data to T x T objects. Either a factor ``F`` (k x T) with
``Z^T = Q F`` for some ``Q`` with orthonormal columns (the snapshots themselves when they have
few features, or a streamed QR factor): since ``Q`` preserves inner products, the SVD-based
exact DMD of ``F`` has the eigenvalues, residuals and amplitudes of the data. Or the Gram
``G = Z Z^T``, whose blocks ``X^T X``, ``X^T Y``, ``Y^T Y`` give the same quantities by the
method of snapshots, faster, with the square of the condition number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg

from koopkit.errors import EstimationError, NonFiniteDataError
from koopkit.linalg import delay_window_starts, select_rank

__all__ = [
    "ExactDMD",
    "exact_dmd",
    "exact_dmd_from_gram",
    "fix_mode_phases",
    "snapshot_pairs",
    "trajectory_starts",
]


def trajectory_starts(lengths: Sequence[int]) -> np.ndarray:
    """Stacked column of each trajectory's first snapshot."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.intp)


def snapshot_pairs(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked columns ``(x, y)`` of every pair ``(z_t, z_{t+1})`` inside one trajectory."""
    x = delay_window_starts(lengths, 1)  # a pair is a window of one delay
    return x, x + 1


def _largest_entries(modes: np.ndarray, rows: int = 65536) -> np.ndarray:
    """Each column's first entry of largest modulus, found in blocks of rows: ``np.abs`` of
    all the modes at once would take half as much memory again as the modes."""
    columns = np.arange(modes.shape[1])
    largest = np.full(modes.shape[1], -1.0)
    entries = np.zeros(modes.shape[1], modes.dtype)
    for start in range(0, modes.shape[0], rows):
        block = modes[start : start + rows]
        sizes = np.abs(block)
        at = np.argmax(sizes, axis=0)
        better = sizes[at, columns] > largest  # strict: an earlier block keeps a tie
        largest[better] = sizes[at, columns][better]
        entries[better] = block[at, columns][better]
    return entries


def fix_mode_phases(modes: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Modes rotated so each one's largest entry is real and positive.

    Eigenvectors are defined up to a complex factor, and different factorizations of the same
    data return different ones; this makes the modes a function of the data alone. With
    ``overwrite``, ``modes`` (complex) is rotated in place and returned.
    """
    rotations = np.exp(-1j * np.angle(_largest_entries(modes)))
    if overwrite:
        modes *= rotations
        return modes
    return modes * rotations


@dataclass(frozen=True)
class ExactDMD:
    """Exact DMD of a set of snapshot pairs, eigenvalues sorted by descending modulus, then angle.

    Attributes
    ----------
    eigenvalues : (r,) complex array
    singular_values : (r,) array
        Kept singular values of ``X``.
    mode_coefficients : (pairs, r) complex array
        ``V S^{-1} W``: the exact DMD modes are ``Y @ mode_coefficients``.
    residuals : (r,) array or None
    amplitudes : (r,) array or None
    """

    eigenvalues: np.ndarray
    singular_values: np.ndarray
    mode_coefficients: np.ndarray
    residuals: np.ndarray | None
    amplitudes: np.ndarray | None


def exact_dmd(
    factor: np.ndarray,
    lengths: Sequence[int],
    rank,
    features: int,
    *,
    noise: float | None = None,
    residuals: bool = True,
    amplitudes: bool = False,
) -> ExactDMD:
    """Exact DMD of the pairs of consecutive snapshots of each trajectory.

    Parameters
    ----------
    factor : (k, T) array
        Factor ``F`` of the stacked snapshots of all trajectories, ``Z^T = Q F`` (see the
        module docstring).
    lengths : sequence of int
        Snapshots of each trajectory, in stacking order.
    rank : int, float in (0, 1), "gd" or None
        Rank rule, see :func:`koopkit.linalg.select_rank`.
    features : int
        Features of one snapshot in the data (not in the factor); sets the noise levels of
        the rank rules.
    noise : float, optional
        Singular values at or below this are rounding noise, kept by no rank rule (see
        :func:`koopkit.linalg.select_rank`).
    residuals, amplitudes : bool
        Also compute the ResDMD residual and the amplitude of each eigenpair.

    Notes
    -----
    With ``X = U S V^T`` truncated to rank r, ``A~ = U^T Y V S^{-1}``, ``A~ W = W diag(lambda)``
    and exact modes ``Y V S^{-1} W`` [1]_.

    Residuals use the ResDMD matrices [2]_ of the linear dictionary of the kept POD
    coordinates, ``Psi_X = X^T U = V S`` and ``Psi_Y = Y^T U``: ``G = Psi_X^* Psi_X``,
    ``A = Psi_X^* Psi_Y``, ``L = Psi_Y^* Psi_Y``. For an eigenvalue ``lambda`` with coefficient
    vector ``g`` (an eigenvector of ``G^{-1} A = A~^T``, i.e. a left eigenvector of ``A~``)

    ``res(lambda, g)^2 = g^* (L - lambda A^* - conj(lambda) A + |lambda|^2 G) g / (g^* G g)``,

    evaluated as ``||Psi_Y g - lambda Psi_X g|| / ||Psi_X g||``, which is the same number
    without the cancellation of the quadratic form. It is the relative one-step error of the
    candidate eigenfunction ``x -> (U g)^T x`` on the data; large values flag spurious
    eigenvalues. With no more pairs than the rank (``Psi_X`` square) every residual is zero.

    Amplitudes are the least-squares fit ``b_i`` of the modes to the first snapshot of
    trajectory ``i``, summed in magnitude over trajectories: ``sum_i |b_i|`` (for one
    trajectory, the modulus of PyDMD's ``amplitudes``).

    References
    ----------
    .. [1] J. H. Tu, C. W. Rowley, D. M. Luchtenburg, S. L. Brunton, J. N. Kutz, "On dynamic
       mode decomposition: theory and applications", J. Comput. Dyn. 1(2), 391-421, 2014.
    .. [2] M. J. Colbrook and A. Townsend, "Rigorous data-driven computation of spectral
       properties of Koopman operators for dynamical systems", Comm. Pure Appl. Math. 77(1),
       221-283, 2024.
    """
    x, y = snapshot_pairs(lengths)
    u, s, vt = np.linalg.svd(factor[:, x], full_matrices=False)
    r = _kept_rank(s, rank, (features, x.size), noise)
    u, s, v = u[:, :r], s[:r], vt[:r].T
    dmd = _reduced_dmd(v, s, u.T @ factor[:, y], residuals)
    if amplitudes:
        modes = factor[:, y] @ dmd.mode_coefficients
        fits = np.linalg.lstsq(modes, factor[:, trajectory_starts(lengths)], rcond=None)[0]
        dmd = replace(dmd, amplitudes=np.abs(fits).sum(axis=1))
    return dmd


def exact_dmd_from_gram(
    gram: np.ndarray,
    lengths: Sequence[int],
    rank,
    features: int,
    *,
    noise: float | None = None,
    residuals: bool = True,
    amplitudes: bool = False,
) -> ExactDMD:
    """:func:`exact_dmd` by the method of snapshots, from the Gram ``G = Z Z^T`` (T x T).

    ``X^T X = V S^2 V^T`` by an eigendecomposition; ``U^T Y = S^{-1} V^T X^T Y``; the
    amplitudes solve the normal equations ``(Phi^* Phi) b = Phi^* z_0`` with
    ``Phi^* Phi = C^* Y^T Y C`` for the modes ``Phi = Y C``. Singular values below about
    ``sqrt(eps)`` of the largest are rounding noise here: pass a ``noise`` that says so (see
    :func:`koopkit.linalg.gram_noise`).
    """
    x, y = snapshot_pairs(lengths)
    eigenvalues, eigenvectors = np.linalg.eigh(gram[np.ix_(x, x)])
    s = np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))
    r = _kept_rank(s, rank, (features, x.size), noise)
    s, v = s[:r], eigenvectors[:, ::-1][:, :r]
    with np.errstate(divide="ignore", invalid="ignore"):
        projected_y = (v / s).T @ gram[np.ix_(x, y)]
    dmd = _reduced_dmd(v, s, projected_y, residuals)
    if amplitudes:
        c = dmd.mode_coefficients
        normal = c.conj().T @ gram[np.ix_(y, y)] @ c
        rhs = c.conj().T @ gram[np.ix_(y, trajectory_starts(lengths))]
        fits = np.linalg.lstsq(normal, rhs, rcond=None)[0]
        dmd = replace(dmd, amplitudes=np.abs(fits).sum(axis=1))
    return dmd


def _kept_rank(singular_values, rank, shape, noise) -> int:
    r = select_rank(singular_values, rank, shape, noise=noise)
    if r == 0:
        raise EstimationError(
            "Expected snapshots with at least one singular value above rounding noise. "
            "Got none instead."
        )
    return r


def _reduced_dmd(v, s, projected_y, residuals: bool) -> ExactDMD:
    """Eigenpairs of ``A~ = U^T Y V S^{-1}``, sorted, from ``V``, ``S`` and ``U^T Y``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v_over_s = v / s
        atilde = projected_y @ v_over_s
    if not np.isfinite(atilde).all():
        raise NonFiniteDataError(
            f"Expected finite eigenvalues at rank {s.size}. Got NaN or Inf instead: the data "
            f"have fewer than {s.size} nonzero singular values; lower the rank."
        )
    eigenvalues, left, right = scipy.linalg.eig(atilde, left=True, right=True)
    # moduli equal to 12 digits are one: +-0.95 in the same order whatever the method
    modulus = np.abs(eigenvalues)
    modulus = np.round(modulus / (modulus.max(initial=0.0) or 1.0), 12)
    order = np.lexsort((-np.angle(eigenvalues), -modulus))
    eigenvalues, left, right = eigenvalues[order], left[:, order], right[:, order]
    return ExactDMD(
        eigenvalues=eigenvalues,
        singular_values=s,
        mode_coefficients=v_over_s @ right,
        residuals=_residuals(eigenvalues, left.conj(), v * s, projected_y.T) if residuals else None,
        amplitudes=None,
    )


def _residuals(eigenvalues, coefficients, psi_x, psi_y) -> np.ndarray:
    """``||Psi_Y g - lambda Psi_X g|| / ||Psi_X g||`` for each eigenvalue and its ``g``.

    Both are divided by their largest entry first: the ratio stays, and the squares inside
    the norms of data near 1e-160 would underflow to zero.
    """
    scale = max(float(np.abs(psi_x).max(initial=0.0)), float(np.abs(psi_y).max(initial=0.0)))
    if scale > 0:
        psi_x, psi_y = psi_x / scale, psi_y / scale
    along_x = psi_x @ coefficients
    error = psi_y @ coefficients - along_x * eigenvalues
    return np.linalg.norm(error, axis=0) / np.linalg.norm(along_x, axis=0)
