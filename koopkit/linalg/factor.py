"""A stable small factor ``R`` of the snapshots, ``Z^T = Q R``, for when the Gram is not enough.

``G = Z Z^T`` squares the condition number: an error of ``eps ||G||`` in ``G`` moves a DMD
eigenvalue resting on a singular value ``s`` by about ``eps ||G|| / s^2``. Delay-embedded
optimizer iterates reach 1e-8 of the largest, so when a kept singular value is too small for
eigenvalues to 1e-8 (:func:`gram_accuracy_lost`) the estimators switch to ``R``, whose
singular values and exact DMD equal those of ``Z`` to ``eps`` relative to the largest, like a
direct SVD. ``Q`` is never formed, only block by block.
"""

from __future__ import annotations

import numpy as np

from .blocks import DEFAULT_BLOCK_BYTES, Trajectories
from .gram import streamed_gram

__all__ = [
    "GRAM_RELATIVE_ACCURACY",
    "gram_noise",
    "gram_accuracy_lost",
    "cholesky_qr",
    "tsqr",
    "center_factor",
]

EIGENVALUE_ACCURACY = 1e-8
"""How far a DMD eigenvalue from the Gram may be from a direct SVD's."""

GRAM_RELATIVE_ACCURACY = np.finfo(np.float64).eps / EIGENVALUE_ACCURACY
"""Gram eigenvalues below this times the Gram's scale give eigenvalues off by more than
:data:`EIGENVALUE_ACCURACY`: singular values below about 1.5e-4 of the largest."""


def gram_noise(gram_scale: float, steps: int) -> float:
    """The singular value below which a Gram of scale ``gram_scale`` (T x T) holds rounding.

    Forming and factoring ``G`` errs by about ``T eps ||G||`` (with a margin of 10), so its
    singular values below the square root of that are noise. ``gram_scale`` bounds the
    largest eigenvalue of the Gram the values come from (its Frobenius norm, uncentered:
    centering ``P G P`` cancels digits of the uncentered ``G``).
    """
    return float(np.sqrt(10 * steps * np.finfo(np.float64).eps * gram_scale))


def gram_accuracy_lost(singular_values: np.ndarray, gram_scale: float) -> bool:
    """True when the smallest kept singular value gives eigenvalues off by more than
    :data:`EIGENVALUE_ACCURACY` from the Gram (see :data:`GRAM_RELATIVE_ACCURACY`)."""
    return bool(singular_values[-1] ** 2 < GRAM_RELATIVE_ACCURACY * gram_scale)


def cholesky_qr(
    trajectories: Trajectories,
    gram: np.ndarray,
    *,
    device=None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> np.ndarray:
    """Upper-triangular ``R`` (T x T) with ``Z^T = Q R`` by CholeskyQR2, or shifted
    CholeskyQR3 where CholeskyQR2 is not enough.

    Every Cholesky step is on a Gram computed at GEMM speed, ``G`` first (already streamed).
    When the snapshots' condition number is below about ``eps^(-1/2)``, as weights under SGD
    mostly are, the Cholesky factor ``R_1`` of ``G`` leaves ``Q_1 = Z^T R_1^{-1}`` nearly
    orthonormal, and one CholeskyQR pass on ``Q_1`` gives ``R`` as accurately as a third
    would [2]_: one pass over the data. Whether that holds is read from the Gram of ``Q_1``
    that pass computes (condition number at most 2); where it does not, or where ``R_1``
    already shows a condition number above :data:`CHOLESKYQR2_CONDITION`, shifted
    CholeskyQR3 follows: a Cholesky step on ``G`` plus a shift ``s = 11 (n T + T (T + 1))
    eps ||Z||_F^2`` that makes it succeed for condition numbers up to ``1/eps``, then two
    passes of CholeskyQR on ``Q_i = Z^T R_i^{-1}`` [1]_. When the snapshots are linearly
    dependent, ``Z^T R^{-1}`` has no orthonormal columns to find; a Cholesky step fails and
    :func:`tsqr` is used instead.

    References
    ----------
    .. [1] T. Fukaya, R. Kannan, Y. Nakatsukasa, Y. Yamamoto, Y. Yanagisawa, "Shifted
       Cholesky QR for computing the QR factorization of ill-conditioned matrices",
       SIAM J. Sci. Comput. 42(1), A477-A503, 2020.
    .. [2] Y. Yamamoto, Y. Nakatsukasa, Y. Yanagisawa, T. Fukaya, "Roundoff error analysis
       of the CholeskyQR2 algorithm", Electron. Trans. Numer. Anal. 44, 306-326, 2015.
    """
    steps, features = gram.shape[0], trajectories.features

    def gram_of_q(factor):  # one pass over the data: the Gram of Z^T factor^{-1}
        return streamed_gram(
            trajectories, triangular=factor, device=device, block_bytes=block_bytes
        )

    try:
        first = _upper_cholesky(gram)
    except np.linalg.LinAlgError:  # not numerically positive definite: shift it, below
        first = None
    if first is not None and _diagonal_condition(first) <= CHOLESKYQR2_CONDITION:
        gram_q = gram_of_q(first)
        if _nearly_orthonormal(gram_q):
            return _upper_cholesky(gram_q) @ first
    shift = 11 * (features * steps + steps * (steps + 1)) * np.finfo(np.float64).eps
    try:  # all-zero data leave no shift: the first step fails too
        factor = _upper_cholesky(gram + shift * np.trace(gram) * np.eye(steps))
        for _ in range(2):
            factor = _upper_cholesky(gram_of_q(factor)) @ factor
    except np.linalg.LinAlgError:
        return tsqr(trajectories, device=device, block_bytes=block_bytes)
    return factor


CHOLESKYQR2_CONDITION = 1e7
"""Above this ratio of the largest to the smallest diagonal entry of ``R_1`` (a lower bound
of its condition number, so of the snapshots'), ``Q_1`` is not expected to be nearly
orthonormal, and :func:`cholesky_qr` goes straight to the shifted CholeskyQR3."""


def _diagonal_condition(factor: np.ndarray) -> float:
    diagonal = np.abs(np.diag(factor))
    return float(diagonal.max() / diagonal.min()) if diagonal.min() > 0 else np.inf


def _nearly_orthonormal(gram_q: np.ndarray) -> bool:
    """Condition number of ``Q`` at most sqrt(2): CholeskyQR on it is then as accurate as on
    an orthonormal one, up to that factor squared in the error bound [2]_."""
    eigenvalues = np.linalg.eigvalsh(gram_q)
    return bool(eigenvalues[-1] <= 2 * eigenvalues[0])


def tsqr(
    trajectories: Trajectories, *, device=None, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> np.ndarray:
    """``R`` of ``Z^T = Q R`` by Householder QR of ``[R; Z_block^T]``, block after block.

    One pass, unconditionally stable and fine with rank deficiency, at LAPACK-QR speed
    rather than GEMM speed. Returns ``min(features, T)`` rows.
    """
    factor = None
    for _, block in trajectories.blocks(block_bytes=block_bytes, device=device, reuse=True):
        stacked = block.T if factor is None else _vstack(factor, block.T)
        factor = _triangular_factor(stacked)
    return factor if device is None else factor.cpu().numpy()


def center_factor(factor: np.ndarray) -> np.ndarray:
    """The factor of the snapshots minus their per-feature mean: ``F P`` for ``Z^T = Q F``.

    ``Z_c^T = Z^T P`` with ``P = I - 1 1^T / T``, so subtracting each row's mean from ``F``
    centers the data exactly, with no pass over it.
    """
    return factor - factor.mean(axis=1, keepdims=True)


def _upper_cholesky(gram: np.ndarray) -> np.ndarray:
    return np.linalg.cholesky(gram).T


def _vstack(top, bottom):
    if isinstance(top, np.ndarray):
        return np.vstack([top, bottom])
    import torch

    return torch.cat([top, bottom])


def _triangular_factor(matrix):
    if isinstance(matrix, np.ndarray):
        return np.linalg.qr(matrix, mode="r")
    import torch

    return torch.linalg.qr(matrix, mode="r")[1]
