"""Uncompressed arrays of a local store, written and read through their chunk files directly.

zarr's write path takes every chunk through its event loop, acquiring the GIL many times per
chunk. A training loop bound by kernel launches needs the GIL between launches, and while
zarr writes a 340 MB row beside it, it runs at less than half its speed; written here, a few
system calls per chunk (each releasing the GIL), the slowdown is within the noise
(``benchmarks/bench_writer_contention.py``). This applies to arrays whose chunks are plain
little-endian bytes under a regular grid and ``/`` keys, as the writer creates them: a chunk
is then exactly its values in C order, padded with the fill value past the array's edge.
Each file is written under a temporary name and renamed into place, and a chunk of nothing
but the fill value is removed rather than stored, as zarr does. One difference, never read:
past the end of the array, a rewritten chunk holds the fill value where zarr would keep the
bytes of rows trimmed when a run was resumed.

Reading a band of columns, zarr decodes each chunk whole to keep a slice of it: a reader of
columns narrower than the chunks decodes each chunk many times. ``read`` takes only the bytes
asked for from each chunk file (one ``preadv`` per row of a chunk, straight into the result).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import uuid

import numpy as np

from .nodes import ZARR_JSON, NotCanonical, parse_array

_PARTIAL = re.compile(r"\d+\.[0-9a-f]{32}\.partial")  # a chunk's temporary file
_DIRECT = hasattr(os, "writev") and hasattr(os, "preadv")
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if _DIRECT else 0  # pieces per writev (>= 16)


class ChunkFiles:
    """Appends rows to one local zarr v3 array whose chunks are raw bytes."""

    def __init__(self, directory, chunks, dtype, fill):
        self.directory = os.fspath(directory)
        self.chunks = tuple(chunks)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.fill = np.asarray(fill, dtype=self.dtype)
        self._fill_values = None  # one chunk of the fill value, for padding
        self._folders: set[str] = set()  # chunk folders known to exist
        self._suffix = f"{uuid.uuid4().hex}.partial"

    @classmethod
    def open(cls, directory) -> ChunkFiles | None:
        """For the array stored at ``directory``; None unless its chunks are raw bytes (or
        where the system lacks ``writev`` and ``preadv``, as Windows does)."""
        if not _DIRECT:
            return None
        try:
            with open(os.path.join(directory, ZARR_JSON), "rb") as f:
                document = parse_array(json.loads(f.read()))
        except (OSError, ValueError, NotCanonical):
            return None
        if not document.raw or not document.chunks:
            return None
        fill = document.fill
        return cls(
            directory,
            document.chunks,
            document.meta.dtype,
            float(fill) if isinstance(fill, str) else fill,
        )

    def append(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` as rows ``start, start + 1, ...``, the new end of the array.

        Rows before ``start`` in its chunks are read back and kept; chunk rows past the end
        hold the fill value, as zarr pads an edge chunk. Files are written one after another:
        writing several at once from more threads takes the GIL from the training thread
        more often, and slowed it as much as zarr's own path does.
        """
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        depth = self.chunks[0]
        stop = start + len(rows)
        for first in range(start - start % depth, stop, depth):
            low, high = max(start, first), min(stop, first + depth)
            part = rows[low - start : high - start]
            for index, region in self._regions(part.shape[1:]):
                path = os.path.join(self.directory, "c", str(first // depth), *map(str, index))
                values = part[(slice(None), *region)]
                if low == first and self._rows_are_contiguous(region, part.shape[1:]):
                    chunk, pieces = values, self._pieces(values)  # the rest is fill
                else:
                    chunk = self._merged(path, low - first, values)
                    pieces = [chunk.reshape(-1).view(np.uint8)]
                if self._only_fill(chunk):
                    _remove(path)  # as zarr: a chunk of fill values is not stored
                else:
                    self._write(path, pieces)

    def remove_partial_files(self) -> None:
        """Delete the temporary files of writes a killed process never renamed (its own and
        zarr's: ``<chunk>.<hex>.partial``); only while no other process writes the array."""
        for folder, _, names in os.walk(os.path.join(self.directory, "c")):
            for name in names:
                if _PARTIAL.fullmatch(name):
                    _remove(os.path.join(folder, name))

    def read(self, rows: slice, columns: slice) -> np.ndarray:
        """``array[rows, columns]`` of a 2-D array (slices with step 1, within its shape)."""
        out = np.empty((rows.stop - rows.start, columns.stop - columns.start), dtype=self.dtype)
        depth, width = self.chunks
        itemsize = self.dtype.itemsize
        for first in range(rows.start - rows.start % depth, rows.stop, depth):
            low, high = max(rows.start, first), min(rows.stop, first + depth)
            for index in range(columns.start // width, -(-columns.stop // width)):
                left = max(columns.start, index * width)
                right = min(columns.stop, (index + 1) * width)
                target = out[
                    low - rows.start : high - rows.start,
                    left - columns.start : right - columns.start,
                ]
                path = os.path.join(self.directory, "c", str(first // depth), str(index))
                fd = self._open_chunk(path)
                if fd is None:  # never written: all fill value
                    target[...] = self.fill
                    continue
                try:
                    for row in range(low, high):
                        offset = ((row - first) * width + left - index * width) * itemsize
                        _read_all(fd, target[row - low].view(np.uint8), offset, path)
                finally:
                    os.close(fd)
        return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))

    def _regions(self, row_shape):
        """(chunk index, slices) of every chunk over the row axes."""
        spans = [
            [(i, slice(a, min(a + size, length))) for i, a in enumerate(range(0, length, size))]
            for length, size in zip(row_shape, self.chunks[1:], strict=True)
        ]
        for combination in itertools.product(*spans):
            yield tuple(i for i, _ in combination), tuple(s for _, s in combination)

    def _rows_are_contiguous(self, region, row_shape) -> bool:
        """Whether each row's part of this chunk is one run of memory, needing no padding
        inside: only the first row axis is cut; the chunk holds the others exactly whole."""
        return all(
            s.start == 0 and s.stop == size == length
            for s, size, length in zip(region[1:], self.chunks[2:], row_shape[1:], strict=True)
        )

    def _pieces(self, values: np.ndarray) -> list[np.ndarray]:
        """The chunk as byte pieces written in order: each row's values, then fill padding."""
        depth, width = self.chunks[0], int(np.prod(self.chunks[1:], dtype=np.int64))
        row_size = values[0].size if len(values) else 0
        pieces = []
        for row in values:
            pieces.append(row.reshape(-1))
            if row_size < width:
                pieces.append(self._fill_run(width - row_size))
        if len(values) < depth:
            pieces.append(self._fill_run((depth - len(values)) * width))
        return [piece.view(np.uint8) for piece in pieces]

    def _fill_run(self, count: int) -> np.ndarray:
        if self._fill_values is None:
            self._fill_values = np.full(int(np.prod(self.chunks)), self.fill, dtype=self.dtype)
        return self._fill_values[:count]

    def _merged(self, path: str, low: int, values: np.ndarray) -> np.ndarray:
        """The chunk at ``path`` (or the fill value) with ``values`` put in from row ``low``."""
        chunk = np.full(self.chunks, self.fill, dtype=self.dtype)
        fd = self._open_chunk(path) if low else None  # rows already there are kept
        if fd is not None:  # else never written: all fill value, as zarr reads it
            try:
                _read_all(fd, chunk.reshape(-1).view(np.uint8), 0, path)
            finally:
                os.close(fd)
        high = low + len(values)
        chunk[(slice(low, high), *(slice(0, n) for n in values.shape[1:]))] = values
        chunk[high:] = self.fill
        return chunk

    def _open_chunk(self, path: str) -> int | None:
        """A descriptor of the chunk file, checked to hold one whole chunk; None if absent."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        size = int(np.prod(self.chunks)) * self.dtype.itemsize
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise OSError(f"Chunk file {path!r} does not hold {size} bytes.")
        return fd

    def _only_fill(self, values: np.ndarray) -> bool:
        """Whether every value is the fill value; the first value settles most chunks."""
        first = values[(slice(0, 1),) * values.ndim]
        return bool(self._is_fill(first).all()) and bool(self._is_fill(values).all())

    def _is_fill(self, values: np.ndarray) -> np.ndarray:
        """Equality to the fill value as zarr decides it: NaN equals NaN, zero compares bits."""
        if self.dtype.kind == "f" and np.isnan(self.fill):
            return np.isnan(values)
        if self.dtype.kind == "f" and self.fill == 0:
            void = f"V{self.dtype.itemsize}"
            return values.view(void) == self.fill.view(void)
        return values == self.fill

    def _write(self, path: str, pieces: list[np.ndarray]) -> None:
        """Write under a temporary name, then rename: four system calls, since each one gives
        the GIL back and waits to take it again behind a busy training thread."""
        folder = os.path.dirname(path)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        partial = f"{path}.{self._suffix}"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                _write_all(fd, [piece for piece in pieces if piece.size])
            finally:
                os.close(fd)
            os.replace(partial, path)
        except BaseException:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_all(fd: int, buffer: np.ndarray, offset: int, path: str) -> None:
    """``os.preadv`` until ``buffer`` is full (it may read less than asked)."""
    while buffer.size:
        count = os.preadv(fd, [buffer], offset)
        if not count:
            raise OSError(f"Chunk file {path!r} ended early.")
        buffer, offset = buffer[count:], offset + count


def _write_all(fd: int, pieces: list[np.ndarray]) -> None:
    """``os.writev`` until every byte is written (it may write less than asked)."""
    while pieces:
        written = os.writev(fd, pieces[:_IOV_MAX])
        while pieces and written >= pieces[0].size:
            written -= pieces[0].size
            pieces.pop(0)
        if written:
            pieces[0] = pieces[0][written:]
