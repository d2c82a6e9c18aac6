"""Stream the stacked snapshots of several trajectories in blocks of feature columns.

A weight trajectory is tall and skinny in the wrong direction for memory: few snapshots, very
many features. Every estimate reduces it to snapshot-by-snapshot (T x T) objects, and those are
sums over feature columns. So the data is read once per pass, one block of columns of all
trajectories at a time, and only that block is ever upcast to float64.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from ..errors import EstimationError, InsufficientDataError, NonFiniteDataError

__all__ = ["BAND_BLOCKS", "DEFAULT_BLOCK_BYTES", "Trajectories"]

DEFAULT_BLOCK_BYTES = 16 * 2**20
"""About this many bytes of float64 per block of all trajectories.

Wide enough for GEMM speed (a few thousand columns at T = 1000), small beside the data: with
a reused buffer it is the only per-block memory when the data are in memory.
"""

BAND_BLOCKS = 32
"""A band of whole storage chunks is read at once while it takes at most this many blocks'
bytes in the data's own dtype (512 MiB at the default block size); read-ahead keeps two."""

_FLOAT64_EPS = float(np.finfo(np.float64).eps)


def _is_torch_tensor(obj) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor implies torch is already imported
    return torch is not None and isinstance(obj, torch.Tensor)


def _not_dense(array) -> str | None:
    """What a sparse or data-less array is (slicing it gives no dense values), else None."""
    if _is_torch_tensor(array):
        if array.layout != sys.modules["torch"].strided:
            return f"a {array.layout} tensor"
        return "a tensor on the meta device" if array.is_meta else None
    sparse = sys.modules.get("scipy.sparse")  # a scipy sparse array implies it is imported
    return f"a sparse {type(array).__name__}" if sparse and sparse.issparse(array) else None


def _steps_first(array):
    """An xarray DataArray with a ``step`` dimension, transposed by name to (step, ...): a
    ``(param, step)`` view would otherwise be read as steps by position."""
    dims = getattr(array, "dims", None)
    if isinstance(dims, tuple) and "step" in dims and dims[0] != "step":
        return array.transpose("step", ...)
    return array


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
        arrays = tuple(_steps_first(array) for array in trajectories)
        if not arrays:
            raise InsufficientDataError("Expected at least 1 trajectory. Got 0 instead.")
        for i, array in enumerate(arrays):
            if not hasattr(array, "shape") or not hasattr(array, "dtype"):
                raise EstimationError(
                    f"Expected trajectory {i} to be an array (steps, features): numpy, torch, "
                    f"dask, zarr or xarray. Got {type(array).__name__} instead."
                )
            shape = tuple(array.shape)
            if len(shape) != 2:
                raise EstimationError(
                    f"Expected trajectory {i} to be 2-D (steps, features). "
                    f"Got shape {shape} instead."
                )
            if not all(isinstance(size, Integral) for size in shape):  # dask: (nan, n)
                raise EstimationError(
                    f"Expected trajectory {i} to have a known shape. Got shape {shape} "
                    "instead; call compute_chunk_sizes() on a dask array."
                )
            if not _is_real_dtype(array.dtype):
                raise EstimationError(
                    f"Expected real numbers in trajectory {i}. Got dtype {array.dtype} instead."
                )
            sparse = _not_dense(array)
            if sparse:
                raise EstimationError(
                    f"Expected trajectory {i} to be a dense array. Got {sparse} instead."
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
        chunks; a narrower one (a small budget, wide chunks) is cut from a band of whole chunks
        read at once (see :meth:`bands`), or re-reads its chunk when that band is too large.
        """
        width = max(1, block_bytes // (8 * max(1, self.steps)))
        chunk = _column_chunk(self.arrays[0])
        if chunk is not None and width >= chunk:
            width -= width % chunk
        return min(width, self.features)

    def bands(self, block_bytes: int = DEFAULT_BLOCK_BYTES) -> list[tuple[slice, list[slice]]]:
        """The column bands read at once, each with the blocks it is cut into.

        A band is one block; or, when blocks are narrower than the storage chunks, one column
        of whole chunks, cut into blocks of near-equal width, so that each chunk is decoded
        once rather than once per block. The latter only while such a band, in the data's own
        dtype, takes at most ``BAND_BLOCKS`` blocks' bytes; a wider chunk is read in blocks of
        up to that many bytes of float64 (an equal share of the chunk each), so it is decoded
        a few times rather than once per default-sized block.
        """
        width = self.block_width(block_bytes)
        band, hold = width, True
        chunk = _column_chunk(self.arrays[0])
        if chunk is not None and width < chunk:
            row_bytes = sum(
                length * _itemsize(array.dtype)
                for array, length in zip(self.arrays, self.lengths, strict=True)
            )
            band = chunk
            if chunk * row_bytes > BAND_BLOCKS * block_bytes:
                # too wide to hold: each block, a share of one chunk, is read on its own
                hold = False
                widest = max(width, BAND_BLOCKS * block_bytes // (8 * max(1, self.steps)))
                width = -(-chunk // -(-chunk // widest))
        plan = []
        for start in range(0, self.features, band):
            stop = min(start + band, self.features)
            count = -(-(stop - start) // width)
            edges = [start + (stop - start) * i // count for i in range(count + 1)]
            cuts = [slice(a, b) for a, b in itertools.pairwise(edges)]
            plan.extend([(slice(start, stop), cuts)] if hold else [(c, [c]) for c in cuts])
        return plan

    def blocks(
        self,
        *,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        device=None,
        reuse: bool = False,
        prefetch: bool | None = None,
        check_finite: bool = True,
    ) -> Iterator[tuple[slice, Any]]:
        """Yield ``(columns, block)``: the float64 ``(steps, width)`` stack of those columns.

        Parameters
        ----------
        block_bytes : int
            About this many bytes of float64 per block.
        device : str or torch.device, optional
            Blocks are torch tensors on this device; numpy arrays when None.
        reuse : bool
            True: a block is valid only until the next one is asked for, and must not be
            written to. It is one buffer, overwritten block after block, or, for a single
            float64 trajectory in memory, a view of the data itself; so at most one block of
            memory is used. False: every block is a new array.
        prefetch : bool, optional
            Read the next band of columns (:meth:`bands`) in a background thread while the
            caller works on this one: zarr, dask, numpy and BLAS release the GIL. By default,
            for data not already in memory (zarr, dask, h5py, a store) when this process may
            use more than one CPU. An exception raised while reading is raised here, in the
            caller. The blocks are the same either way.
        check_finite : bool
            Check each block for NaN and Inf as it is read, which costs no extra pass over the
            data. A caller that turns this off checks some other way (see ``streamed_gram``).
        """
        plan = self.bands(block_bytes)
        if prefetch is None:
            prefetch = len(plan) > 1 and _cpus() > 1 and not all(map(_in_memory, self.arrays))
        band_columns = [band for band, _ in plan]
        bands = _read_ahead(self._read_band, band_columns) if prefetch else None
        widest = max(c.stop - c.start for _, cuts in plan for c in cuts)
        buffer = None
        try:
            for band, block_columns in plan:
                pieces = next(bands) if prefetch else self._read_band(band)
                for columns in block_columns:
                    local = slice(columns.start - band.start, columns.stop - band.start)
                    shape = (self.steps, local.stop - local.start)
                    block = self._view(pieces, local) if reuse and device is None else None
                    if block is None:
                        if not reuse:
                            block = _shaped(_empty(shape[0] * shape[1], device), shape)
                        else:
                            if buffer is None:
                                buffer = _empty(self.steps * widest, device)
                            block = _shaped(buffer, shape)
                        self._stack(pieces, local, block)
                    if check_finite and not _all_finite(block):
                        self.check_block(block, columns)
                    yield columns, block
                    del block
                del pieces  # before the next band is read: at most two bands alive
        finally:
            if bands is not None:
                bands.close()

    def stacked(self, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
        """All snapshots as one float64 ``(steps, features)`` array; for few features only."""
        out = np.empty((self.steps, self.features))
        for columns, block in self.blocks(block_bytes=block_bytes, reuse=True):
            out[:, columns] = block
        return out

    def _read_band(self, columns: slice) -> list:
        """Each trajectory's ``columns``, as stored: views of data in memory, else new arrays."""
        return [_read_columns(array, columns) for array in self.arrays]

    def _view(self, pieces: list, columns: slice):
        """The block as a view of one float64 trajectory in memory that BLAS reads as is."""
        if len(pieces) != 1 or not _in_memory(self.arrays[0]):
            return None
        piece = pieces[0]
        if _is_torch_tensor(piece):
            if piece.device.type != "cpu" or piece.dtype != sys.modules["torch"].float64:
                return None  # nor would .numpy() take bfloat16
            piece = piece.numpy()  # shares the tensor's memory
        if not isinstance(piece, np.ndarray) or piece.dtype != np.float64:
            return None
        view = piece[:, columns]
        return view if _blas_ready(view) else None

    def _stack(self, pieces: list, columns: slice, out) -> None:
        """Copy each trajectory's ``columns`` into its rows of the float64 ``out``."""
        row = 0
        for piece, length in zip(pieces, self.lengths, strict=True):
            _copy_into(out[row : row + length], piece[:, columns])
            row += length

    def check_block(self, block, columns: slice) -> None:
        """Raise ``NonFiniteDataError`` naming the first trajectory with NaN or Inf in ``block``."""
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


def _in_memory(array) -> bool:
    """Numpy arrays (memmaps too) and torch tensors: slicing them reads nothing."""
    return isinstance(array, np.ndarray) or _is_torch_tensor(array)


def _cpus() -> int:
    """CPUs this process may run on: reading ahead on a single one only adds switching."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # a torch dtype
        return int(getattr(dtype, "itemsize", 8))


def _blas_ready(view: np.ndarray) -> bool:
    """Whether BLAS reads this 2-D float64 array in place (unit stride along one axis)."""
    if not view.flags.aligned or view.size == 0:
        return False
    rows, cols = view.strides
    return (cols == 8 and rows % 8 == 0 and rows >= 8 * view.shape[1]) or (
        rows == 8 and cols % 8 == 0 and cols >= 8 * view.shape[0]
    )


def _empty(size: int, device):
    """A flat float64 buffer, numpy or on a torch device."""
    if device is None:
        return np.empty(size)
    import torch

    return torch.empty(size, dtype=torch.float64, device=device)


def _shaped(flat, shape: tuple[int, int]):
    """The first ``rows x cols`` entries of a flat buffer, as a C-contiguous matrix."""
    return flat[: shape[0] * shape[1]].reshape(shape)


def _read_ahead(read, items: list) -> Iterator:
    """Yield ``read(item)`` for each item, reading the next one in a background thread meanwhile.

    At most two results are alive: the one the caller works on and the next. An exception in
    ``read`` is raised by the ``next()`` that would have returned its result; closing the
    generator cancels or waits for the read in flight, so no thread outlives it.
    """
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="koopkit-read-ahead")
    future = None
    try:
        for i in range(len(items)):
            result = None  # drop the previous result before the next read starts
            result = (future or executor.submit(read, items[i])).result()
            future = executor.submit(read, items[i + 1]) if i + 1 < len(items) else None
            yield result
    finally:
        if future is not None:
            future.cancel()
        executor.shutdown(wait=True)


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
