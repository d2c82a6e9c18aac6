"""The Gram matrix of the stacked snapshots, accumulated in one streamed pass.

With snapshots as the rows of ``Z`` (T x n, n features), ``G = Z Z^T`` is T x T however many
features there are, and every exact-DMD quantity (``X^T X``, ``X^T Y``, ``Y^T Y``, delay
embeddings, centering) is a sub-block or a small transformation of it. Each block of feature
columns adds one float64 GEMM, on numpy or on a torch device.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.blas

from .blocks import DEFAULT_BLOCK_BYTES, Trajectories

__all__ = ["streamed_gram", "streamed_product", "gram_factor", "center_gram"]


def streamed_gram(
    trajectories: Trajectories,
    *,
    triangular: np.ndarray | None = None,
    device=None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    prefetch: bool | None = None,
) -> np.ndarray:
    """``G = Z Z^T`` (float64, T x T), summed over blocks of feature columns.

    Parameters
    ----------
    trajectories : Trajectories
        The snapshots; ``Z`` stacks their rows.
    triangular : (T, T) upper-triangular array, optional
        When given, accumulate the Gram of ``R^{-T} Z`` instead, i.e. ``Q^T Q`` for
        ``Q = Z^T R^{-1}``: one pass of a CholeskyQR iteration. ``Q`` exists only block by block.
    device : str or torch.device, optional
        Run the GEMMs with torch on this device (``"cuda"``); numpy when None.
    block_bytes : int
        Size of one float64 block of all trajectories.
    prefetch : bool, optional
        Read the next columns while this block's product runs (see ``Trajectories.blocks``);
        the result is the same either way.

    Notes
    -----
    One float64 block is alive at a time (plus, from storage, the band read ahead): a
    reused buffer, or the data itself when they are float64 in memory. The product is
    BLAS's SYRK on the block as laid out. NaN and Inf are caught from the diagonal of each
    block's product (a sum of squares, non-finite exactly when a value is non-finite or it
    overflows) rather than by a scan of the block; on a torch device, from the diagonal of
    the sum, with a second pass to name the trajectory only when it is not finite.
    """
    steps = trajectories.steps
    blocks = trajectories.blocks(
        block_bytes=block_bytes,
        device=device,
        reuse=True,
        prefetch=prefetch,
        check_finite=False,  # from the diagonal of the product instead
    )
    if device is None:
        gram = np.zeros((steps, steps))
        product = np.empty((steps, steps))
        upper = None if triangular is None else np.asfortranarray(triangular)
        for columns, block in blocks:
            if upper is None:
                with np.errstate(all="ignore"):  # NaN, Inf, overflow: checked below, as BLAS is
                    np.matmul(block, block.T, out=product)  # SYRK: numpy sees the shared operand
            else:
                product = _solved_gram(upper, block)
            if not np.isfinite(product.diagonal()).all():
                trajectories.check_block(block, columns)
            gram += product
        return np.triu(gram) + np.triu(gram, 1).T

    import torch

    gram = torch.zeros((steps, steps), dtype=torch.float64, device=device)
    lower = None if triangular is None else torch.as_tensor(triangular.T, device=device)
    for _, block in blocks:
        if lower is not None:
            block = torch.linalg.solve_triangular(lower, block, upper=False)
        gram.addmm_(block, block.T)
    if not bool(gram.diagonal().isfinite().all()):  # one synchronisation, not one per block
        for _ in trajectories.blocks(block_bytes=block_bytes, device=device, reuse=True):
            pass  # raises, naming the trajectory, unless the data are finite and it overflowed
    return gram.cpu().numpy()


def _solved_gram(upper: np.ndarray, block: np.ndarray) -> np.ndarray:
    """The upper triangle of ``Q^T Q`` for the block ``Q = block^T R^{-1}`` (TRSM, then SYRK).

    Both calls go to scipy's BLAS: numpy has its own OpenBLAS, and alternating the two
    leaves one library's threads spinning while the other's run, which made a pass nearly
    three times as slow on two cores.
    """
    solved = scipy.linalg.blas.dtrsm(1.0, upper, block.T, side=1)
    return scipy.linalg.blas.dsyrk(1.0, solved, trans=1)


def streamed_product(
    trajectories: Trajectories,
    right: np.ndarray,
    *,
    device=None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    prefetch: bool | None = None,
) -> np.ndarray:
    """``Z^T M`` (features x p) for a small real ``M`` (T x p), one block of features at a time.

    This is how state-space quantities such as DMD modes leave the T x T world: one more pass.
    """
    out = np.empty((trajectories.features, right.shape[1]))
    blocks = trajectories.blocks(
        block_bytes=block_bytes, device=device, reuse=True, prefetch=prefetch
    )
    if device is None:
        right_t = np.ascontiguousarray(right.T)
        for columns, block in blocks:
            out[columns] = (right_t @ block).T  # faster than block.T @ right for a wide block
        return out

    import torch

    right_on_device = torch.as_tensor(right, device=device)
    for columns, block in blocks:
        out[columns] = (block.T @ right_on_device).cpu().numpy()
    return out


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """A square ``F`` with ``F^T F = G``, from the eigendecomposition ``G = E diag(w) E^T``.

    ``F = diag(sqrt(w)) E^T`` has rows in descending order of ``w`` (negative rounding
    noise clipped to zero), so the first row's squared norm is the largest eigenvalue. Any
    such ``F`` stands in for the data: ``Z^T = Q F`` with ``Q = Z^T E diag(w)^{-1/2}``
    orthonormal, so the singular values and the exact DMD of ``F`` equal those of ``Z``, to
    the accuracy of ``G``, about ``sqrt(eps)`` relative in singular values.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = slice(None, None, -1)
    return np.sqrt(np.clip(eigenvalues[order], 0.0, None))[:, None] * eigenvectors[:, order].T


def center_gram(gram: np.ndarray) -> np.ndarray:
    """The Gram of the snapshots minus their per-feature mean, from ``G`` alone.

    With ``P = I - 1 1^T / T``, ``Z_c = P Z`` and ``G_c = P G P``
    ``= G - 1 s^T / T - s 1^T / T + (1^T s) 1 1^T / T^2`` with ``s = G 1`` the row sums:
    no second pass over the data, no mean vector of length ``features``.
    """
    steps = gram.shape[0]
    row_sums = gram.sum(axis=1)
    total = row_sums.sum()
    return gram - (row_sums[:, None] + row_sums[None, :]) / steps + total / steps**2
