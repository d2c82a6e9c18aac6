"""Reading stores: runs, tags and lazy series, never past a series' committed rows."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import RunNotFoundError, SelectionError, StoreError, ValidationError
from . import layout
from .location import open_root
from .schema import validate_attrs

__all__ = ["open_store", "open_run", "TrajectoryStore", "RunInfo", "CommittedRows", "parse_where"]


class CommittedRows:
    """A stored array seen only up to its committed rows, read lazily by slicing.

    Estimators stream it in column blocks, so nothing is loaded until they ask.
    """

    def __init__(self, array, rows: int, where: str = "series"):
        self.array = array
        self.where = where
        self.shape = (int(rows), *array.shape[1:])
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.chunks = array.chunks

    def __getitem__(self, key):
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
            return self.array[(first, *rest)]
        except Exception as exc:  # a chunk that does not decode is the store's fault
            raise StoreError(f"Cannot read {self.where}: {type(exc).__name__}: {exc}") from exc

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


def _is_run(group) -> bool:
    block = group.attrs.get(layout.NAMESPACE)
    return isinstance(block, dict) and block.get("node") == "run"


def _series_paths(run_group) -> tuple[str, ...]:
    paths = []
    for kind in layout.VECTOR_SERIES:
        if kind in run_group:
            paths.append(kind)
    for kind in (layout.SCALARS, layout.PROBES):
        if kind in run_group:
            paths.extend(f"{kind}/{name}" for name in sorted(run_group[kind].group_keys()))
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
        where[key] = value
    return where


class TrajectoryStore:
    """A koopkit store opened for reading: its runs, their tags, and selection by tag."""

    def __init__(self, url, root):
        self.url = os.fspath(url)
        self.root = root
        self._runs = None

    @property
    def attrs(self) -> dict:
        return self.root.attrs.asdict()

    def _walk(self, group, prefix):
        for name, child in sorted(group.groups()):
            run_id = f"{prefix}{name}"
            if _is_run(child):
                yield run_id, child
            else:
                yield from self._walk(child, f"{run_id}/")

    @property
    def runs(self) -> dict[str, RunInfo]:
        """Every run, by id, in sorted order."""
        if self._runs is None:
            runs = {}
            if layout.RUNS in self.root:
                for run_id, group in self._walk(self.root[layout.RUNS], ""):
                    runs[run_id] = RunInfo(run_id, group.attrs.asdict(), _series_paths(group))
            self._runs = runs
        return self._runs

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
        """The committed rows of a series as a lazy dask array (steps, ...)."""
        import dask.array as da

        view = self.trajectory(run_id, path)
        return da.from_zarr(view.array)[: view.shape[0]]

    def trajectory(self, run_id: str, path: str = layout.PARAMS) -> CommittedRows:
        """The committed rows of a series as a lazily sliced array, for streaming estimators."""
        info = self._info(run_id)
        if path not in info.series:
            raise RunNotFoundError(
                f"Run {run_id!r} has no series {path!r}; it has: {', '.join(info.series) or 'none'}."
            )
        where = f"{layout.run_path(run_id)}/{path}/value"
        value = self.root[where]
        return CommittedRows(
            value, min(info.committed(path), value.shape[0]), f"{where} in {self.url!r}"
        )

    def steps(self, run_id: str, path: str = layout.PARAMS) -> np.ndarray:
        """The optimizer step of each committed row of a series."""
        info = self._info(run_id)
        step = self.root[f"{layout.run_path(run_id)}/{path}/step"]
        return np.asarray(step[: min(info.committed(path), step.shape[0])])

    def dataset(self, run_id: str, path: str = layout.PARAMS):
        """One series as a lazy ``xarray.Dataset`` with ``value`` indexed by ``step``."""
        import xarray as xr

        group = self.root[f"{layout.run_path(run_id)}/{path}"]
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
        import xarray as xr

        info = self.run(run_id)
        nodes = {"/": xr.Dataset(attrs={k: v for k, v in info.attrs.items() if k != "writer"})}
        for path in info.series:
            nodes[f"/{path}"] = self.dataset(run_id, path)
        group = self.root[layout.run_path(run_id)]
        if layout.STATIC in group:
            static = {
                name: (tuple(a.metadata.dimension_names), np.asarray(a[...]))
                for name, a in group[layout.STATIC].arrays()
            }
            nodes["/static"] = xr.Dataset(static)
        return xr.DataTree.from_dict(nodes)


def open_store(url) -> TrajectoryStore:
    """Open a koopkit store (directory, ``.zip`` or fsspec URL) for reading."""
    return TrajectoryStore(url, open_root(url))


def open_run(url, run_id: str):
    """One run as a lazy (dask-backed) ``xarray.DataTree``; ``run.koopkit.tensor(name)`` views a tensor."""
    from . import accessor  # noqa: F401  (registers the .koopkit accessor)

    return open_store(url).datatree(run_id)
