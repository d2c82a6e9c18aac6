"""Writing runs: buffered whole-chunk-row appends, committed only once the data is written.

Crash safety comes from ordering. Rows are written (zarr writes each chunk object
atomically) and only then is the run's ``committed_steps`` advanced, in one metadata write
that covers every series of the run. A reader never shows rows past that count, and a
writer that resumes a run first trims anything beyond it.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import threading
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from ..errors import (
    InvalidRunIdError,
    KoopkitError,
    RunExistsError,
    ShapeChangedError,
    WriteFailedError,
)
from . import layout
from .chunk_files import ChunkFiles
from .location import local_path, open_root
from .lock import RunLock

CHUNK_BYTES = 16 * 2**20  # target uncompressed chunk size
NONFINITE_LIMIT = 100  # steps listed per series in the run's "nonfinite"; the rest are counted
ZERO_STEPS_KEPT = 5  # steps of all-zero rows each series writer keeps, for the Recorder's checks


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class SeriesSpec:
    """What a series holds: its path in the run, the shape of one row, and its attributes.

    ``coords`` are extra 1-D arrays stored beside ``value`` (probe sample ids and labels),
    each given as ``name -> (dimension, array)``.
    """

    path: str
    row_shape: tuple[int, ...]
    dtype: str = "float32"
    attrs: dict = field(default_factory=dict)
    chunk_steps: int = 32
    row_dims: tuple[str, ...] = ()
    coords: dict = field(default_factory=dict)
    compressor: str | None = None


def check_compressor(name) -> None:
    if name not in (None, "zstd", "blosc"):
        raise ValueError(f"Invalid compressor {name!r}; expected None, 'zstd' or 'blosc'.")


def _compressors(name):
    check_compressor(name)
    if name is None:
        return None
    import zarr.codecs

    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def _create_coord(group, name, dim, values) -> None:
    """A 1-D coordinate array (probe sample ids, labels); text is stored as UTF-8 strings."""
    values = np.asarray(values)
    if values.dtype.kind in "US":
        array = group.create_array(
            name,
            shape=values.shape,
            dtype=str,
            chunks=values.shape or (1,),
            dimension_names=(dim,),
            compressors=None,
        )
        array[...] = values.astype(str)
        return
    group.create_array(
        name, data=values, chunks=values.shape, dimension_names=(dim,), compressors=None
    )


def _column_chunks(row_shape, chunk_steps, itemsize):
    """Chunk the first row axis so one chunk is about CHUNK_BYTES; keep other axes whole."""
    if not row_shape:
        return ()
    rest = int(np.prod(row_shape[1:], dtype=np.int64)) if len(row_shape) > 1 else 1
    cols = max(1, CHUNK_BYTES // max(1, chunk_steps * itemsize * rest))
    return (min(int(row_shape[0]), cols) or 1, *row_shape[1:])


class SeriesWriter:
    """Appends rows to one series and writes them in whole chunk rows.

    ``directory`` is where the series lives when the store is a local directory: its
    uncompressed arrays are then written chunk file by chunk file (see ``chunk_files``).
    """

    def __init__(self, run_group, spec: SeriesSpec, committed_rows: int, directory=None):
        self.spec = spec
        self.chunk_steps = spec.chunk_steps
        dtype = np.dtype(spec.dtype)
        if spec.path in run_group:
            group = run_group[spec.path]
            conflict = self._conflict(group, spec)
            if conflict is not None:
                raise ShapeChangedError(conflict)
            self.value, self.step = group["value"], group["step"]
            self.written = min(committed_rows, self.value.shape[0], self.step.shape[0])
            self.value.resize((self.written, *spec.row_shape))  # drop uncommitted rows
            self.step.resize((self.written,))
            self.last_step = int(self.step[self.written - 1]) if self.written else None
            self.chunk_steps = self.value.chunks[0]
        else:
            group = run_group.create_group(
                spec.path, attributes={layout.NAMESPACE: layout.node_block("series"), **spec.attrs}
            )
            chunks = (
                self.chunk_steps,
                *_column_chunks(spec.row_shape, self.chunk_steps, dtype.itemsize),
            )
            self.value = group.create_array(
                "value",
                shape=(0, *spec.row_shape),
                chunks=chunks,
                dtype=dtype,
                fill_value=np.nan if dtype.kind == "f" else 0,
                compressors=_compressors(spec.compressor),
                dimension_names=("step", *spec.row_dims),
            )
            self.step = group.create_array(
                "step",
                shape=(0,),
                chunks=(max(self.chunk_steps, 1024),),
                dtype="int64",
                fill_value=-1,
                compressors=None,
                dimension_names=("step",),
            )
            for name, (dim, values) in spec.coords.items():
                _create_coord(group, name, dim, values)
            self.written = 0
            self.last_step = None
        self.group = group
        self.value_files = self.step_files = None
        if directory is not None:
            self.value_files = ChunkFiles.open(os.path.join(directory, "value"))
            self.step_files = ChunkFiles.open(os.path.join(directory, "step"))
            for files in (self.value_files, self.step_files):
                if files is not None:  # what a killed writer left, if this series is resumed
                    files.remove_partial_files()
        self.buffer = np.empty((self.chunk_steps, *spec.row_shape), dtype=dtype)
        self.buffer_steps = np.empty(self.chunk_steps, dtype=np.int64)
        self.pending = 0
        self.nonfinite_steps: list[int] = []  # not yet committed, at most NONFINITE_LIMIT
        self.nonfinite_count = 0  # not yet committed, all of them
        self.zero_steps: list[int] = []  # the first steps whose rows are all zeros

    @staticmethod
    def _conflict(group, spec) -> str | None:
        """Why the stored series cannot take rows of ``spec``, or None when it can."""
        arrays = dict(group.arrays())
        if "value" not in arrays or "step" not in arrays:
            return f"Series {spec.path!r} is incomplete (no value or step array)."
        shape = tuple(arrays["value"].shape[1:])
        if shape != tuple(spec.row_shape):
            return (
                f"Series {spec.path!r} holds rows of shape {shape}; "
                f"got rows of shape {tuple(spec.row_shape)}. Record into a new run."
            )
        old_tensors = group.attrs.get("tensors")
        new_tensors = spec.attrs.get("tensors")
        if old_tensors is not None and new_tensors is not None and old_tensors != new_tensors:
            return (
                f"Series {spec.path!r} was recorded with other tensors; "
                "the model's parameters changed. Record into a new run."
            )
        stored, wanted = arrays["value"].dtype, np.dtype(spec.dtype)
        if stored != wanted:
            return (
                f"Series {spec.path!r} holds {stored} rows; got {wanted} rows. Record with "
                f"dtype={str(stored)!r}, or into a new run."
            )
        old_sketch, new_sketch = group.attrs.get("sketch"), spec.attrs.get("sketch")
        if old_sketch != new_sketch:
            return (
                f"Series {spec.path!r} was recorded with sketch {old_sketch}; got "
                f"{new_sketch}: its columns would mean something else. Record into a new run."
            )
        return None

    def _check_steps(self, steps):
        if steps.size == 0:
            return
        previous = self.last_step
        if (previous is not None and steps[0] <= previous) or np.any(np.diff(steps) <= 0):
            raise ValueError(
                f"Steps of series {self.spec.path!r} must increase; got {steps.tolist()} "
                f"after step {previous}."
            )
        self.last_step = int(steps[-1])

    def _inspect(self, steps, rows):
        """Flag rows holding NaN or Inf, and note rows of zeros: a row's sum is finite only if
        every entry is (unless it overflows), and zero if they all are, so one pass without a
        temporary array clears almost every row."""
        if rows.dtype.kind != "f":
            return
        rows = rows.reshape(len(rows), -1)
        with np.errstate(over="ignore", invalid="ignore"):
            sums = rows.sum(axis=1)
        suspect = ~np.isfinite(sums)
        if len(self.zero_steps) < ZERO_STEPS_KEPT and not sums.all():
            zero = steps[sums == 0][~rows[sums == 0].any(axis=1)]
            self.zero_steps.extend(int(s) for s in zero[: ZERO_STEPS_KEPT - len(self.zero_steps)])
        if suspect.any():
            finite = np.isfinite(rows[suspect]).all(axis=1)
            flagged = steps[suspect][~finite]
            room = NONFINITE_LIMIT - len(self.nonfinite_steps)
            self.nonfinite_steps.extend(int(s) for s in flagged[: max(0, room)])
            self.nonfinite_count += len(flagged)

    def _write(self, steps, rows):
        """Write rows past the end. Chunk files are written before the arrays grow, so a plain
        zarr reader never sees the new rows as fill values; zarr itself writes only within
        an array's shape."""
        start, stop = self.written, self.written + len(steps)
        pairs = ((self.value, self.value_files, rows), (self.step, self.step_files, steps))
        for _, files, values in pairs:
            if files is not None:
                files.append(start, values)
        self.value.resize((stop, *self.spec.row_shape))
        self.step.resize((stop,))
        for array, files, values in pairs:
            if files is None:
                array[start:stop] = values
        self.written = stop

    def append(self, steps, rows) -> bool:
        """Buffer rows; write every chunk row that fills. True when anything was written."""
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        if steps.size == 0:
            return False
        rows = np.asarray(rows).reshape(len(steps), *self.spec.row_shape)
        self._check_steps(steps)
        self._inspect(steps, rows)
        wrote, i = False, 0
        while i < len(steps):
            room = self.chunk_steps - (self.written + self.pending) % self.chunk_steps
            take = min(room, len(steps) - i)
            if self.pending == 0 and take == self.chunk_steps:
                self._write(steps[i : i + take], rows[i : i + take])  # aligned: no copy
                wrote = True
            else:
                self.buffer[self.pending : self.pending + take] = rows[i : i + take]
                self.buffer_steps[self.pending : self.pending + take] = steps[i : i + take]
                self.pending += take
                if take == room:
                    wrote = self.write_pending() or wrote
            i += take
        return wrote

    def write_pending(self) -> bool:
        if not self.pending:
            return False
        self._write(self.buffer_steps[: self.pending], self.buffer[: self.pending])
        self.pending = 0
        return True


class RunWriter:
    """Owns one run while it is recorded: its lock, its series and its commit point.

    Parameters
    ----------
    url : str or path
        The store (a directory or an fsspec URL); created when absent.
    run_id : str
        Relative run id; ``/`` nests groups.
    metadata : dict
        Run attributes (tags, model, optimizer, device, every...), merged into the run's attrs.
    resume : bool
        Continue a run that already has committed rows (default); False refuses such a run.
    """

    def __init__(self, url, run_id: str, metadata: dict | None = None, *, resume: bool = True):
        try:
            self._open(url, run_id, metadata, resume)
        except OSError as exc:  # the store refused a write while the run was being made
            if isinstance(exc, KoopkitError):
                raise
            raise WriteFailedError(
                f"Opening run {run_id!r} in {os.fspath(url)!r} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _open(self, url, run_id, metadata, resume):
        self.run_id = layout.check_run_id(run_id)
        metadata = dict(metadata or {})
        metadata["tags"] = layout.check_tags(metadata.get("tags"))
        self.url = os.fspath(url)
        root = open_root(url, writable=True)
        path = layout.run_path(run_id)
        directory = local_path(url)
        self.directory = None if directory is None else directory / path
        self._root, self._path = root, path
        self._refuse_nesting(root)  # before the lock, which creates the run's directory
        made = self._missing_directories()
        self.lock = RunLock(
            self.url,
            run_id,
            directory=self.directory,
            describe_holder=lambda: self._holder(root, path),
        )
        try:
            self._open_run(root, path, metadata, resume)
        except BaseException:
            self.lock.release()
            _remove_empty(made)
            raise
        self.series: dict[str, SeriesWriter] = {}
        self.dropped = int(self.attrs.get("dropped", 0))  # snapshots skipped; set by the Recorder
        self.closed = False
        self._committed = False  # whether this writer committed any row
        self._mutex = threading.RLock()  # the training thread adds series while the writer appends

    @staticmethod
    def _holder(root, path) -> str:
        try:
            writer = root[path].attrs.get("writer") or {}
        except Exception:
            return ""
        if not writer:
            return ""
        return f"process {writer.get('pid')} on {writer.get('host')} since {writer.get('since')}"

    def _missing_directories(self) -> list:
        """The run's directory and those of its parents that do not exist yet, deepest first."""
        missing, directory = [], self.directory
        while directory is not None and not directory.exists():
            missing.append(directory)
            directory = directory.parent
        return missing

    def _open_run(self, root, path, metadata, resume):
        writer = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        self._refuse_nesting(root)  # again under the lock: a parent run may have appeared
        self._original_attrs = None
        self._new_groups = []  # groups this writer created, deepest first (see ``discard``)
        if path in root and not _left_undescribed(root[path]):
            self.group = root[path]
            self.attrs = self.group.attrs.asdict()
            if (self.attrs.get(layout.NAMESPACE) or {}).get("node") != "run":
                raise InvalidRunIdError(
                    f"Run id {self.run_id!r} names a group of runs, not a run; choose another id."
                )
            self._original_attrs = dict(self.attrs)
            committed = self.attrs.get("committed_steps", {})
            if any(committed.values()) and not resume:
                raise RunExistsError(
                    f"Run {self.run_id!r} already holds {max(committed.values())} committed steps; "
                    "pass resume=True to continue it, or choose another run id."
                )
            self.attrs.update({"status": "recording", "writer": writer})
            if metadata.get("tags"):  # added to the run's tags, not replacing them
                self.attrs["tags"] = {**self.attrs.get("tags", {}), **metadata["tags"]}
            if metadata.get("optimizer"):
                self.attrs["optimizer"] = metadata["optimizer"]
        else:
            parts = path.split("/")
            self._new_groups = [
                "/".join(parts[:depth])
                for depth in range(len(parts), 1, -1)  # below runs/, deepest first
                if depth == len(parts) or "/".join(parts[:depth]) not in root
            ]
            self.attrs = {
                layout.NAMESPACE: layout.node_block("run"),
                "run_id": self.run_id,
                "tags": {},
                "created": now(),
                "koopkit_version": __version__,
                "status": "recording",
                "committed_steps": {},
                "dropped": 0,
                "nonfinite": {},
                **metadata,
                "writer": writer,
            }
            if path not in root:  # described as made: a writer killed here leaves a run
                self.group = root.create_group(path, attributes=copy.deepcopy(self.attrs))
                return
            self.group = root[path]  # made, never described (see ``_left_undescribed``)
        self._save_attrs()

    def _refuse_nesting(self, root):
        """A run may not live inside another run: readers would never see it."""
        parts = self.run_id.split("/")
        for depth in range(1, len(parts)):
            ancestor = layout.run_path("/".join(parts[:depth]))
            if ancestor in root:
                block = root[ancestor].attrs.get(layout.NAMESPACE) or {}
                if block.get("node") == "run":
                    raise InvalidRunIdError(
                        f"Run id {self.run_id!r} would nest inside run {'/'.join(parts[:depth])!r}; "
                        "choose another id."
                    )

    def _save_attrs(self):
        self.group.attrs.put(self.attrs)  # one metadata write, replacing the whole mapping

    def add_series(self, spec: SeriesSpec) -> SeriesWriter:
        """Create the series, or reopen it (trimmed to its committed rows) when resuming.

        A new series is listed in ``committed_steps`` once it is whole, and readers show only
        listed series: one a killed writer left half made stays hidden.
        """
        with self._guard():
            committed = self.attrs["committed_steps"]
            directory = None if self.directory is None else self.directory / spec.path
            if not committed.get(spec.path) and spec.path in self.group:
                # nothing of it committed (half made by a killed writer, or left by an open
                # that failed): made again, unlisted while it is remade
                if committed.pop(spec.path, None) is not None:
                    self._save_attrs()
                del self.group[spec.path]
            series = SeriesWriter(self.group, spec, committed.get(spec.path, 0), directory)
            self.series[spec.path] = series
            if spec.path not in committed:
                committed[spec.path] = series.written
                self._save_attrs()
        return series

    def append(self, path: str, steps, rows) -> None:
        """Append rows to a series; commit when a chunk row was written."""
        with self._guard():
            if self.series[path].append(steps, rows):
                self._commit()

    def flush(self) -> None:
        """Write every buffered row and commit."""
        with self._guard():
            self._commit()

    def _commit(self):
        self._committed = True
        self.attrs["dropped"] = self.dropped
        for path, series in self.series.items():
            series.write_pending()
            self.attrs["committed_steps"][path] = series.written
            if series.nonfinite_count:
                self._flag_nonfinite(path, series.nonfinite_steps, series.nonfinite_count)
                series.nonfinite_steps, series.nonfinite_count = [], 0
        self._save_attrs()

    def _flag_nonfinite(self, path, steps, count):
        """List the first NONFINITE_LIMIT flagged steps of a series and count all of them, so
        a run that diverged does not rewrite an ever longer list at every commit."""
        flagged = self.attrs.setdefault("nonfinite", {}).setdefault(path, [])
        counts = self.attrs.setdefault("nonfinite_count", {})
        counts[path] = int(counts.get(path, len(flagged))) + int(count)  # older runs: no count
        flagged.extend(steps[: max(0, NONFINITE_LIMIT - len(flagged))])

    def set(self, **attrs) -> None:
        """Update run attributes (written at the next commit)."""
        with self._mutex:
            self.attrs.update(attrs)
            self.dropped = int(self.attrs.get("dropped", 0))  # what the next commit writes

    def write_static(self, name: str, array, dims, description: str | None = None) -> None:
        """Store an array that is not a time series under ``static/<name>``."""
        array = np.asarray(array)
        attrs = {layout.NAMESPACE: layout.node_block("static")}
        if description:
            attrs["description"] = description
        with self._guard():
            self.group.create_array(
                f"{layout.STATIC}/{layout.check_name(name, 'static name')}",
                data=array,
                dimension_names=tuple(dims),
                attributes=attrs,
                overwrite=True,
            )

    def close(self, status: str = "complete") -> None:
        """Flush, set the final status and release the lock; safe to call twice.

        If the final flush fails, the run is marked interrupted (where the store still
        accepts that) and the error propagates.
        """
        if self.closed:
            return
        try:
            self.attrs["status"] = status
            self.attrs.pop("writer", None)
            self.flush()
        except BaseException:
            self.abandon()
            raise
        self.closed = True
        self.lock.release()

    def abandon(self) -> None:
        """Release the lock after a write failure, marking the run interrupted if we still can."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self._committed and self._original_attrs is not None:
                # nothing new was written: leave the run as it was, listing the series as
                # they are now (one with no rows may have been remade or removed)
                self.attrs = {
                    **self._original_attrs,
                    "committed_steps": self.attrs["committed_steps"],
                }
            else:
                self.attrs["status"] = "interrupted"
                self.attrs.pop("writer", None)
            self._save_attrs()
        except Exception:
            pass  # the store refuses writes; committed rows stay as they are
        finally:
            self.lock.release()

    def discard(self) -> None:
        """Release the run after its opening failed, leaving the store as it was.

        A run this writer created and never committed to is removed, with the groups of runs
        created for it, so the run id stays usable; any other run is left as ``abandon`` leaves
        it.
        """
        if self.closed or self._original_attrs is not None or self._committed:
            self.abandon()
            return
        self.closed = True
        try:
            for group in self._new_groups:
                if group == self._path or not any(True for _ in self._root[group].members()):
                    del self._root[group]
        except Exception:  # the store refuses: fall back to marking the run interrupted
            self.closed = False
            self.abandon()
        finally:
            self.lock.release()

    def _guard(self):
        return _WriteGuard(self.url, self.run_id, self._mutex)


def _left_undescribed(group) -> bool:
    """An empty group without attributes where a run should be: left by a writer killed
    between making a run's group and describing it, which used to be two writes."""
    return not group.attrs.asdict() and not any(True for _ in group.members())


def _remove_empty(directories) -> None:
    """Remove the directories a refused writer created, deepest first, while they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


class _WriteGuard:
    """Turns the store's I/O failures into one WriteFailedError naming the run."""

    def __init__(self, url, run_id, mutex):
        self.url, self.run_id, self.mutex = url, run_id, mutex

    def __enter__(self):
        self.mutex.acquire()
        return self

    def __exit__(self, kind, exc, tb):
        self.mutex.release()
        if exc is None or isinstance(exc, (ShapeChangedError, ValueError)):
            return False
        if isinstance(exc, OSError | PermissionError | RuntimeError):
            raise WriteFailedError(
                f"Writing run {self.run_id!r} to {self.url!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return False
