"""Reading stores: runs, tags and lazy series, never past a series' committed rows.

Metadata comes through the small ``nodes`` interface, so a summary of a local store can be
read from its JSON documents alone (``summarize``) with the same meaning as through zarr.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ..errors import (
    KoopkitError,
    RunNotFoundError,
    SelectionError,
    StoreError,
    ValidationError,
)
from . import layout
from .location import local_path, open_local_nodes, open_root
from .nodes import ZarrNodes, unreadable_chunk
from .schema import validate_attrs

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "open_store",
    "unreadable_metadata",
    "open_run",
    "summarize",
    "TrajectoryStore",
    "RunInfo",
    "CommittedRows",
    "parse_where",
]

T = TypeVar("T")


class CommittedRows:
    """A stored array seen only up to its committed rows, read lazily by slicing.

    Estimators stream it in column blocks, so nothing is loaded until they ask. ``files``
    (a local, uncompressed 2-D array) reads blocks of rows and columns from the chunk files
    themselves, only the bytes asked for.
    """

    def __init__(self, array, rows: int, where: str = "series", files=None):
        self.array = array
        self.files = files
        self.where = where
        self.shape = (int(rows), *array.shape[1:])
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.chunks = array.chunks

    def __getitem__(self, key):
        import numpy as np

        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, slice):
            first = slice(*first.indices(self.shape[0]))
        elif isinstance(first, int | np.integer):
            if not -self.shape[0] <= first < self.shape[0]:
                raise IndexError(f"row {first} is outside the {self.shape[0]} committed rows")
            first = int(first) % self.shape[0]
        else:
            raise TypeError("rows of a stored series are indexed by an int or a slice")
        try:
            block = self._from_files(first, rest) if self.files is not None else None
        except Exception as exc:  # a chunk file of the wrong size: the message names it
            raise StoreError(f"Cannot read {self.where}: {type(exc).__name__}: {exc}") from exc
        if block is not None:
            return block
        try:
            return self.array[(first, *rest)]
        except Exception as exc:  # a chunk that does not decode is the store's fault
            raise unreadable_chunk(self.array, (first, *rest), self.where, exc) from exc

    def _from_files(self, rows, rest):
        """``[rows, columns]`` read from the chunk files: a non-empty block, steps of 1."""
        if not isinstance(rows, slice) or len(rest) > 1:
            return None
        columns = rest[0] if rest else slice(None)
        if not isinstance(columns, slice):
            return None
        columns = slice(*columns.indices(self.shape[1]))
        if rows.step != 1 or columns.step != 1:
            return None
        if rows.stop <= rows.start or columns.stop <= columns.start:
            return None  # empty: zarr gives it its shape
        return self.files.read(rows, columns)

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data if dtype is None else data.astype(dtype)

    def __len__(self):
        return self.shape[0]


@dataclass(frozen=True, eq=False)
class RunInfo:
    """A run's metadata and the series it holds."""

    run_id: str
    attrs: dict
    series: tuple[str, ...]

    @property
    def tags(self) -> dict:
        tags = self.attrs.get("tags")
        return dict(tags) if isinstance(tags, dict) else {}

    @property
    def status(self) -> str:
        return str(self.attrs.get("status", "unknown"))

    def committed(self, path: str) -> int:
        committed = self.attrs.get("committed_steps")
        rows = committed.get(path, 0) if isinstance(committed, dict) else 0
        return rows if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0 else 0

    @functools.cached_property
    def problems(self) -> list[str]:
        """Why this run's metadata violates the schema (empty when valid)."""
        return validate_attrs("run", self.attrs)

    def check(self) -> RunInfo:
        """This run, or a ValidationError when its metadata cannot be trusted for analysis."""
        if self.problems:
            more = "; run `koopkit validate` for every reason" if len(self.problems) > 1 else ""
            raise ValidationError(
                [f"run {self.run_id!r} has invalid metadata: {self.problems[0]}{more}"]
            )
        return self


def _is_run(attrs: dict) -> bool:
    block = attrs.get(layout.NAMESPACE)
    return isinstance(block, dict) and block.get("node") == "run"


def _series_paths(nodes, run_path: str, committed) -> tuple[str, ...]:
    """The run's series, less those its writer was still creating when it died: the writer
    lists a series in ``committed_steps`` once its arrays are made (``RunWriter.add_series``)."""
    paths = []
    for kind in layout.VECTOR_SERIES:
        if nodes.contains(f"{run_path}/{kind}"):
            paths.append(kind)
    for kind in (layout.SCALARS, layout.PROBES):
        if nodes.contains(f"{run_path}/{kind}"):
            paths.extend(f"{kind}/{name}" for name, _ in nodes.groups(f"{run_path}/{kind}"))
    if isinstance(committed, dict):
        paths = [path for path in paths if path in committed]
    return tuple(paths)


def _tag_matches(value, wanted: str) -> bool:
    """Tags compare by their text, so ``width=40`` matches the integer 40 and the string '40'."""
    if isinstance(value, bool):
        return str(value).lower() == wanted.lower()
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    return str(value) == wanted


def parse_where(items) -> dict[str, str]:
    """``["width=40", "seed=2"]`` -> ``{"width": "40", "seed": "2"}``."""
    where = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SelectionError(f"Invalid selection {item!r}; expected TAG=VALUE.")
        if key in where:  # a run has one value per tag: the last would silently win
            raise SelectionError(
                f"Invalid selection: tag {key!r} is given twice ({key}={where[key]}, {item})."
            )
        where[key] = value
    return where


class TrajectoryStore:
    """A koopkit store opened for reading: its runs, their tags, and selection by tag.

    ``nodes`` serves the metadata (``ZarrNodes`` or ``LocalNodes``); ``root`` is the zarr root
    group, for reading data.
    """

    def __init__(self, url, nodes):
        self.url = os.fspath(url)
        self.nodes = nodes
        self._runs = None

    @property
    def root(self):
        return self.nodes.root

    def _zarr_node(self, path: str):
        """The zarr node at ``path``; an unreadable ``zarr.json`` is a StoreError naming it."""
        nodes = self.nodes if isinstance(self.nodes, ZarrNodes) else ZarrNodes(self.root, self.url)
        return nodes.node(path)

    @property
    def attrs(self) -> dict:
        return self.nodes.attrs("")

    def _walk(self, path, prefix):
        for name, attrs in self.nodes.groups(path):
            run_id = f"{prefix}{name}"
            if _is_run(attrs):
                yield run_id, f"{path}/{name}", attrs
            else:
                yield from self._walk(f"{path}/{name}", f"{run_id}/")

    @property
    def runs(self) -> dict[str, RunInfo]:
        """Every run, by id, in sorted order."""
        if self._runs is None:
            runs = {}
            if self.nodes.contains(layout.RUNS):
                for run_id, path, attrs in self._walk(layout.RUNS, ""):
                    runs[run_id] = RunInfo(
                        run_id, attrs, _series_paths(self.nodes, path, attrs.get("committed_steps"))
                    )
            self._runs = runs
        return self._runs

    @property
    def analyses(self) -> list[str]:
        """The ids of the analyses written back into the store, sorted."""
        if not self.nodes.contains(layout.ANALYSES):
            return []
        return [name for name, _ in self.nodes.groups(layout.ANALYSES)]

    def run(self, run_id: str) -> RunInfo:
        """A run whose metadata is valid, for analysis."""
        return self._info(run_id).check()

    def _info(self, run_id: str) -> RunInfo:
        layout.check_run_id(run_id)
        if run_id not in self.runs:
            known = ", ".join(list(self.runs)[:10]) or "none"
            raise RunNotFoundError(f"No run {run_id!r} in store {self.url!r}; runs: {known}.")
        return self.runs[run_id]

    def select(self, where: Mapping[str, str] | None = None) -> list[RunInfo]:
        """Runs whose tags match every ``tag=value`` of ``where`` (all runs when empty)."""
        where = dict(where or {})
        return [
            info.check()
            for info in self.runs.values()
            if all(key in info.tags and _tag_matches(info.tags[key], v) for key, v in where.items())
        ]

    def array(self, run_id: str, path: str = layout.PARAMS):
        """The committed rows of a series as a lazy dask array (steps, ...), one block a chunk.

        Blocks are read through ``trajectory``: a chunk that does not decode is a StoreError
        naming it, and uncompressed columns come straight from the chunk files.
        """
        import dask.array as da
        import numpy as np
        from dask.base import tokenize

        view = self.trajectory(run_id, path)
        return da.from_array(
            view,
            chunks=view.chunks,
            name=f"koopkit-{tokenize(self.url, run_id, path, view.shape, str(view.dtype))}",
            fancy=False,
            meta=np.empty((0,) * view.ndim, dtype=view.dtype),
        )

    def trajectory(self, run_id: str, path: str = layout.PARAMS) -> CommittedRows:
        """The committed rows of a series as a lazily sliced array, for streaming estimators."""
        info = self._info(run_id)
        if path not in info.series:
            raise RunNotFoundError(
                f"Run {run_id!r} has no series {path!r}; it has: {', '.join(info.series) or 'none'}."
            )
        where = f"{layout.run_path(run_id)}/{path}/value"
        value = self._zarr_node(where)
        directory = local_path(self.url)
        files = None
        if directory is not None and value.ndim == 2:
            from .chunk_files import ChunkFiles

            files = ChunkFiles.open(directory.joinpath(*where.split("/")))
        rows = min(info.committed(path), value.shape[0])
        return CommittedRows(value, rows, f"{where} in {self.url!r}", files)

    def _committed_steps(self, run_id: str, path: str):
        info = self._info(run_id)
        return self.nodes.rows(f"{layout.run_path(run_id)}/{path}/step", info.committed(path))

    def steps(self, run_id: str, path: str = layout.PARAMS) -> np.ndarray:
        """The optimizer step of each committed row of a series."""
        import numpy as np

        return np.asarray(self._committed_steps(run_id, path))

    def step_span(self, run_id: str, path: str = layout.PARAMS) -> tuple[int, int] | None:
        """The first and last committed step of a series; None when it has no committed row."""
        steps = self._committed_steps(run_id, path)
        return (int(steps[0]), int(steps[-1])) if len(steps) else None

    def dataset(self, run_id: str, path: str = layout.PARAMS):
        """One series as a lazy ``xarray.Dataset`` with ``value`` indexed by ``step``."""
        import numpy as np
        import xarray as xr

        group = self._zarr_node(f"{layout.run_path(run_id)}/{path}")
        value = self.array(run_id, path)
        dims = tuple(group["value"].metadata.dimension_names)
        coords = {"step": ("step", self.steps(run_id, path)[: value.shape[0]])}
        for name, array in group.arrays():
            if name not in ("value", "step"):
                coords[name] = (tuple(array.metadata.dimension_names), np.asarray(array[...]))
        attrs = {k: v for k, v in group.attrs.asdict().items() if k != layout.NAMESPACE}
        return xr.Dataset({"value": (dims, value)}, coords=coords, attrs=attrs)

    def datatree(self, run_id: str):
        """The whole run as a lazy ``xarray.DataTree``: one node per series, run attrs on top."""
        import numpy as np
        import xarray as xr

        info = self.run(run_id)
        nodes = {"/": xr.Dataset(attrs={k: v for k, v in info.attrs.items() if k != "writer"})}
        for path in info.series:
            nodes[f"/{path}"] = self.dataset(run_id, path)
        group = self._zarr_node(layout.run_path(run_id))
        if layout.STATIC in group:
            static = {
                name: (tuple(a.metadata.dimension_names), np.asarray(a[...]))
                for name, a in group[layout.STATIC].arrays()
            }
            nodes["/static"] = xr.Dataset(static)
        return xr.DataTree.from_dict(nodes)


def open_store(url) -> TrajectoryStore:
    """Open a koopkit store (directory, ``.zip`` or fsspec URL) for reading."""
    return TrajectoryStore(url, ZarrNodes(open_root(url), url))


def summarize(url, describe: Callable[[TrajectoryStore], T]) -> T:
    """``describe(open_store(url))``, reading a local directory's metadata without zarr.

    A local directory is read from its ``zarr.json`` documents with plain ``json`` (fast: no
    zarr or numpy import); a zip, a URL, or any document that reader does not vouch for is
    read through zarr. Errors and results are the same either way.
    """
    try:
        nodes = open_local_nodes(url)  # None for a zip or a URL
        if nodes is not None:
            return describe(TrajectoryStore(url, nodes))
    except KoopkitError:
        raise  # raised by the code both readers share, so zarr would say the same
    except Exception:  # NotCanonical, or any surprise: zarr's answer is the reference
        pass
    return describe(open_store(url))


def unreadable_metadata(url) -> list[str]:
    """Why some node's ``zarr.json`` in the store cannot be read (empty when all can).

    Walks every group, reading each child's document as zarr does; the first unreadable one
    is named. A store that does not open at all gives an empty list: opening it says why.
    """
    try:
        nodes = ZarrNodes(open_root(url), url)
    except StoreError:
        return []
    pending = [""]
    try:
        while pending:
            path = pending.pop()
            for name, _ in nodes.groups(path):
                pending.append(f"{path}/{name}" if path else name)
    except StoreError as exc:
        return [str(exc)]
    return []


def open_run(url, run_id: str):
    """One run as a lazy (dask-backed) ``xarray.DataTree``; ``run.koopkit.tensor(name)`` views a tensor."""
    from . import accessor  # noqa: F401  (registers the .koopkit accessor)

    return open_store(url).datatree(run_id)
