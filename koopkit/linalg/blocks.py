"""Stream the stacked snapshots of several trajectories in blocks of feature columns.

A weight trajectory is tall and skinny in the wrong direction for memory: few snapshots, very
many features. Every estimate reduces it to snapshot-by-snapshot (T x T) objects, and those are
sums over feature columns. So the data is read once per pass, one block of columns of all
trajectories at a time, and only that block is ever upcast to float64.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import EstimationError, InsufficientDataError, NonFiniteDataError

__all__ = ["DEFAULT_BLOCK_BYTES", "Trajectories"]

DEFAULT_BLOCK_BYTES = 64 * 2**20
"""About this many bytes of float64 per block of all trajectories."""

_FLOAT64_EPS = float(np.finfo(np.float64).eps)


def _is_torch_tensor(obj) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor implies torch is already imported
    return torch is not None and isinstance(obj, torch.Tensor)


def _is_real_dtype(dtype) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return not dtype.is_complex and dtype != torch.bool
    try:
        return dtype is not None and np.dtype(dtype).kind in "fiu"
    except TypeError:
        return False


def _rounding_unit(dtype) -> float:
    """Machine epsilon of a float dtype; integers are exact, so float64's."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else _FLOAT64_EPS
    dtype = np.dtype(dtype)
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else _FLOAT64_EPS


def _column_chunk(array) -> int | None:
    """Width of the array's storage chunks along features (zarr, dask, h5py), if chunked."""
    chunks = getattr(array, "chunks", None)
    if not chunks or len(chunks) != 2 or chunks[1] is None:
        return None
    width = chunks[1]
    return int(width[0] if isinstance(width, tuple) else width)


@dataclass(frozen=True)
class Trajectories:
    """Validated trajectories of one condition, stacked along snapshots but never copied.

    Parameters
    ----------
    arrays : tuple of (steps, features) array-likes
        numpy arrays or memmaps, zarr arrays, dask arrays, torch tensors (CPU or CUDA), or any
        object with ``shape``, ``dtype`` and ``[:, start:stop]`` slicing.
    lengths : tuple of int
        Steps of each trajectory.
    features : int
        Features of every trajectory.
    """

    arrays: tuple[Any, ...]
    lengths: tuple[int, ...]
    features: int

    @classmethod
    def from_input(cls, trajectories) -> Trajectories:
        """Check shapes and dtypes (without reading data); a single 2-D array is one trajectory."""
        if hasattr(trajectories, "shape"):
            trajectories = [trajectories]
        arrays = tuple(trajectories)
        if not arrays:
            raise InsufficientDataError("Expected at least 1 trajectory. Got 0 instead.")
        for i, array in enumerate(arrays):
            shape = tuple(getattr(array, "shape", ()))
            if len(shape) != 2:
                raise EstimationError(
                    f"Expected trajectory {i} to be 2-D (steps, features). "
                    f"Got shape {shape} instead."
                )
            dtype = getattr(array, "dtype", None)
            if not _is_real_dtype(dtype):
                raise EstimationError(
                    f"Expected real numbers in trajectory {i}. Got dtype {dtype} instead."
                )
        features = int(arrays[0].shape[1])
        for i, array in enumerate(arrays):
            if int(array.shape[1]) != features:
                raise EstimationError(
                    f"Expected {features} features in trajectory {i}, as in trajectory 0. "
                    f"Got {int(array.shape[1])} instead."
                )
        if features == 0:
            raise InsufficientDataError("Expected at least 1 feature. Got 0 instead.")
        return cls(arrays, tuple(int(a.shape[0]) for a in arrays), features)

    @property
    def steps(self) -> int:
        """Snapshots of all trajectories together."""
        return sum(self.lengths)

    @property
    def rounding_unit(self) -> float:
        """Relative precision of the stored data: float32 values carry only ~1.2e-7.

        Computing in float64 does not make float32 data more precise, so noise-level rules
        (``rank=None``) must use this, not float64's epsilon.
        """
        return max(_rounding_unit(array.dtype) for array in self.arrays)

    def block_width(self, block_bytes: int) -> int:
        """Feature columns per block: about ``block_bytes`` of float64, aligned to storage chunks.

        A chunk is decoded whole on every read, so a block wider than a chunk covers whole
        chunks; a narrower one (a small budget, huge chunks) re-reads its chunk.
        """
        width = max(1, block_bytes // (8 * max(1, self.steps)))
        chunk = _column_chunk(self.arrays[0])
        if chunk is not None and width >= chunk:
            width -= width % chunk
        return min(width, self.features)

    def blocks(
        self, *, block_bytes: int = DEFAULT_BLOCK_BYTES, device=None
    ) -> Iterator[tuple[slice, Any]]:
        """Yield ``(columns, block)``: the float64 ``(steps, width)`` stack of those columns.

        The block is a numpy array, or a torch tensor on ``device`` when one is given. Each
        block is checked for NaN and Inf as it is read, which costs no extra pass.
        """
        width = self.block_width(block_bytes)
        for start in range(0, self.features, width):
            columns = slice(start, min(start + width, self.features))
            block = self._read(columns, device)
            if not _all_finite(block):
                self._raise_non_finite(block, columns)
            yield columns, block

    def stacked(self, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
        """All snapshots as one float64 ``(steps, features)`` array; for few features only."""
        out = np.empty((self.steps, self.features))
        for columns, block in self.blocks(block_bytes=block_bytes):
            out[:, columns] = block
        return out

    def _read(self, columns: slice, device):
        shape = (self.steps, columns.stop - columns.start)
        if device is None:
            out = np.empty(shape)
        else:
            import torch

            out = torch.empty(shape, dtype=torch.float64, device=device)
        row = 0
        for array, length in zip(self.arrays, self.lengths, strict=True):
            _copy_into(out[row : row + length], _read_columns(array, columns))
            row += length
        return out

    def _raise_non_finite(self, block, columns: slice):
        row = 0
        for i, length in enumerate(self.lengths):
            if not _all_finite(block[row : row + length]):
                raise NonFiniteDataError(
                    f"Expected finite values in trajectory {i}. Got NaN or Inf in features "
                    f"{columns.start}..{columns.stop - 1} instead."
                )
            row += length


def _read_columns(array, columns: slice):
    piece = array[:, columns]
    if hasattr(piece, "compute"):  # dask reads only the chunks of these columns
        piece = piece.compute()
    return piece.detach() if _is_torch_tensor(piece) else np.asarray(piece)


def _copy_into(target, piece) -> None:
    """Copy ``piece`` into the float64 ``target``, converting dtype and device on the way."""
    if isinstance(target, np.ndarray) and isinstance(piece, np.ndarray):
        np.copyto(target, piece)
        return
    torch = sys.modules["torch"]  # one side is a tensor
    if isinstance(target, np.ndarray):
        target = torch.from_numpy(target)
    if isinstance(piece, np.ndarray):
        piece = torch.tensor(piece)  # a copy: zarr and memmap pieces may be read-only
    target.copy_(piece)


def _all_finite(block) -> bool:
    if isinstance(block, np.ndarray):
        return bool(np.isfinite(block).all())
    return bool(block.isfinite().all())
