"""Delay (Hankel) embeddings without the embedded matrix.

The delay-embedded snapshot ``h_t = [x_t, x_{t+1}, ..., x_{t+D}]`` (oldest first) of each
trajectory has Gram ``<h_t, h_u> = sum_d <x_{t+d}, x_{u+d}>``: a sum of ``D + 1`` shifted
sub-blocks of the base Gram ``G``, so delays cost ``O(D T^2)`` small-matrix work and no pass
over the data. With a factor ``Z^T = Q F`` the embedded matrix is ``diag(Q, ..., Q)`` times the
stack of shifted column blocks of ``F``, which has the same singular values and exact DMD. Delay
windows never cross from one trajectory into the next.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["delay_window_starts", "embedded_lengths", "hankel_gram", "hankel_factor"]


def embedded_lengths(lengths: Sequence[int], delays: int) -> tuple[int, ...]:
    """Delay-embedded snapshots of each trajectory: ``steps - delays``."""
    return tuple(length - delays for length in lengths)


def delay_window_starts(lengths: Sequence[int], delays: int) -> np.ndarray:
    """Stacked row of the oldest snapshot ``x_t`` of every embedded snapshot ``h_t``."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.concatenate(
        [start + np.arange(length - delays) for start, length in zip(starts, lengths, strict=True)]
    ).astype(np.intp)


def hankel_gram(gram: np.ndarray, lengths: Sequence[int], delays: int) -> np.ndarray:
    """Gram of the delay-embedded snapshots from the base Gram ``G`` (T x T).

    Each pair of trajectories is one block, a sum of ``D + 1`` shifted slices of ``G``:
    views, not gathered copies.
    """
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    sizes = list(embedded_lengths(lengths, delays))
    edges = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    out = np.zeros((edges[-1], edges[-1]))
    for i, (row, rows) in enumerate(zip(starts, sizes, strict=True)):
        for j, (col, cols) in enumerate(zip(starts, sizes, strict=True)):
            block = out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            for shift in range(delays + 1):
                block += gram[row + shift : row + shift + rows, col + shift : col + shift + cols]
    return out


def hankel_factor(factor: np.ndarray, lengths: Sequence[int], delays: int) -> np.ndarray:
    """Factor of the delay-embedded snapshots from a factor ``F`` (k x T) of the base ones.

    Returns the ``((D + 1) k, T - n D)`` stack of shifted column blocks, oldest delay on top.
    """
    columns = delay_window_starts(lengths, delays)
    return np.vstack([factor[:, columns + shift] for shift in range(delays + 1)])
