"""``koopkit validate``: every node's attributes against its schema, plus structural checks.

Schemas say what each node's metadata may hold; the structure says the arrays agree with it:
shapes match, steps increase, committed counts never exceed the rows written, every array
names its dimensions, and the tensors table covers the flattened parameters exactly. In a
local store, the chunk files of the committed rows are there and, stored raw, whole.
"""

from __future__ import annotations

import itertools
import json
import math
import stat
from pathlib import Path

import numpy as np

from ..errors import StoreError
from . import layout
from .location import file_url_path, local_path, open_root
from .nodes import ZARR_JSON, NotCanonical, parse_array
from .schema import validate_attrs

__all__ = ["validate_store"]


def _node(group) -> str | None:
    block = group.attrs.get(layout.NAMESPACE)
    return block.get("node") if isinstance(block, dict) else None


def _dimension_names(array, where, reasons) -> None:
    names = array.metadata.dimension_names
    if names is None or len(names) != array.ndim or any(n is None for n in names):
        reasons.append(f"{where}: array has no dimension_names for each of its {array.ndim} axes")


def _check_chunk_files(directory: Path, rows: int, where: str, reasons, fill_ok) -> None:
    """The chunk files of the first ``rows`` rows of the array at ``directory``: each one
    there, and one whole chunk's bytes where stored raw. A chunk of nothing but the fill
    value is not stored (as zarr does), so a missing one is reported unless ``fill_ok(lo,
    hi, fill)`` says rows ``lo`` to ``hi`` may hold only the fill value ``fill``."""
    try:
        document = parse_array(json.loads((directory / ZARR_JSON).read_bytes()))
    except (OSError, ValueError, NotCanonical):
        return  # not in the form the writer makes: zarr reads it, the checks above judge it
    shape, chunks = document.meta.shape, document.chunks
    size = math.prod(chunks) * np.dtype(document.meta.dtype).itemsize
    grid = [range(math.ceil(rows / chunks[0]))]
    grid += [range(math.ceil(n / c)) for n, c in zip(shape[1:], chunks[1:], strict=True)]
    for index in itertools.product(*grid):
        key = "c/" + "/".join(map(str, index))
        try:
            status = (directory / key).stat()
        except FileNotFoundError:
            lo, hi = index[0] * chunks[0], min(rows, (index[0] + 1) * chunks[0])
            if not fill_ok(lo, hi, document.fill):
                reasons.append(
                    f"{where}: chunk {key} of committed rows {lo}..{hi - 1} is missing "
                    f"(it would read back as the fill value {document.fill})"
                )
            continue
        except OSError as exc:  # not a file where a chunk should be, unreadable, ...
            reasons.append(f"{where}: chunk {key} cannot be read: {exc.strerror or exc}")
            continue
        if not stat.S_ISREG(status.st_mode):
            reasons.append(f"{where}: chunk {key} is not a file")
        elif document.raw and status.st_size != size:
            reasons.append(
                f"{where}: chunk {key} holds {status.st_size} bytes; a whole chunk is {size}"
            )


def _check_series(group, where, committed, reasons, directory=None, nonfinite=None) -> None:
    """``directory``: the series' folder in a local store; ``nonfinite``: the steps of its
    rows holding NaN or Inf as the run lists them, None where the list is incomplete."""
    attrs = group.attrs.asdict()
    reasons.extend(f"{where}: {r}" for r in validate_attrs("series", attrs))
    arrays = dict(group.arrays())
    for name in ("value", "step"):
        if name not in arrays:
            reasons.append(f"{where}: missing array {name!r}")
    if reasons and ("value" not in arrays or "step" not in arrays):
        return
    value, step = arrays["value"], arrays["step"]
    for name, array in arrays.items():
        _dimension_names(array, f"{where}/{name}", reasons)
    if step.ndim != 1 or step.dtype.kind not in "iu":
        reasons.append(
            f"{where}/step: expected a 1-D integer array, got {step.ndim}-D {step.dtype}"
        )
        return
    rows = min(value.shape[0], step.shape[0])
    if committed > rows:
        reasons.append(
            f"{where}: committed_steps is {committed} but only {rows} rows are written "
            f"(value has {value.shape[0]}, step has {step.shape[0]})"
        )
        committed = rows
    steps = np.asarray(step[:committed])
    if steps.size and (np.any(np.diff(steps) <= 0) or steps[0] < 0):
        reasons.append(f"{where}/step: steps must be >= 0 and strictly increasing")
    if directory is not None:

        def step_fill_ok(lo, hi, fill):  # koopkit's fill, -1, is never a step
            return fill != -1 and hi - lo == 1  # steps increase: one row at most is the fill

        def value_fill_ok(lo, hi, fill):  # rows of only NaN are listed as nonfinite
            if fill != "NaN":  # a value like any other: rows of it are not told apart
                return True
            return nonfinite is None or set(steps[lo:hi].tolist()) <= nonfinite

        _check_chunk_files(directory / "step", committed, f"{where}/step", reasons, step_fill_ok)
        _check_chunk_files(directory / "value", committed, f"{where}/value", reasons, value_fill_ok)
    kind = attrs.get("kind")
    if kind in layout.SERIES_KINDS and value.ndim != 2:
        reasons.append(f"{where}/value: a {kind} series is (step, param), got {value.ndim}-D")
        return
    width = value.shape[1] if value.ndim > 1 else None
    if kind in ("full", "subset") and isinstance(attrs.get("tensors"), list):
        _check_tensors(attrs["tensors"], width, where, reasons)
    if kind == "sketch" and isinstance(attrs.get("sketch"), dict):
        if attrs["sketch"].get("dim") != width:
            reasons.append(
                f"{where}: sketch dim {attrs['sketch'].get('dim')} != value width {width}"
            )
    if kind == "probe":
        if value.ndim != 3:
            reasons.append(f"{where}/value: a probe is (step, sample, feature), got {value.ndim}-D")
        for name in ("sample", "label"):
            if name in arrays and value.ndim == 3 and arrays[name].shape != (value.shape[1],):
                reasons.append(
                    f"{where}/{name}: expected {value.shape[1]} entries, got {arrays[name].shape}"
                )
    if kind == "scalar" and value.ndim != 1:
        reasons.append(f"{where}/value: a scalar series is 1-D, got {value.ndim}-D")


def _check_tensors(tensors, width, where, reasons) -> None:
    offset = 0
    for entry in tensors:
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            return  # the schema already reported it
        if entry.get("offset") != offset:
            reasons.append(
                f"{where}: tensor {entry.get('name')!r} starts at {entry.get('offset')}, expected {offset}"
            )
            return
        offset += int(np.prod(entry["shape"], dtype=np.int64))
    if offset != width:
        reasons.append(f"{where}: tensors cover {offset} parameters but value has {width} columns")


def _check_run(group, run_id, reasons, directory=None) -> None:
    where = f"runs/{run_id}"
    attrs = group.attrs.asdict()
    found = validate_attrs("run", attrs)
    reasons.extend(f"{where}: {r}" for r in found)
    if found:
        return
    if attrs["run_id"] != run_id:
        reasons.append(f"{where}: run_id attribute {attrs['run_id']!r} does not match its path")
    committed = attrs["committed_steps"]
    listed, counted = attrs.get("nonfinite"), attrs.get("nonfinite_count") or {}

    def check(series, path):
        nonfinite = None  # unknown: a run written without the list
        if listed is not None:
            nonfinite = set(listed.get(path, ()))
            if counted.get(path, len(nonfinite)) > len(nonfinite):
                nonfinite = None  # the list stops at its first steps
        folder = None if directory is None else directory / path
        _check_series(series, f"{where}/{path}", committed[path], reasons, folder, nonfinite)

    present = set()
    for kind in layout.VECTOR_SERIES:
        if kind in group:
            present.add(kind)
            if kind in committed:  # a series not yet committed is still being created
                check(group[kind], kind)
    for kind in (layout.SCALARS, layout.PROBES):
        if kind in group:
            for name, child in group[kind].groups():
                path = f"{kind}/{name}"
                present.add(path)
                if path in committed:
                    check(child, path)
    for path in sorted(set(committed) - present):
        if committed[path]:
            reasons.append(f"{where}: committed_steps names series {path!r}, which does not exist")
    if layout.STATIC in group:
        for name, array in group[layout.STATIC].arrays():
            reasons.extend(
                f"{where}/static/{name}: {r}"
                for r in validate_attrs("static", array.attrs.asdict())
            )
            _dimension_names(array, f"{where}/static/{name}", reasons)


def _is_run(group) -> bool:
    """A run says so; a group with another koopkit block or holding series is a run whose
    attributes are damaged, and is judged as a run rather than walked into as a group of runs."""
    if layout.NAMESPACE in group.attrs:
        return True
    return any(_node(child) == "series" for _, child in group.groups())


def _walk_runs(group, prefix, reasons, directory=None, depth=0) -> int:
    """Check every run under ``group``; ``directory``: the local folder of ``runs/``."""
    count = 0
    for name, child in sorted(group.groups()):
        run_id = f"{prefix}{name}"
        try:
            layout.check_run_id(run_id)
        except StoreError as exc:
            reasons.append(f"runs/{run_id}: {exc}")
            continue
        if _is_run(child):
            _check_run(child, run_id, reasons, None if directory is None else directory / run_id)
            count += 1
        elif depth < 32:
            count += _walk_runs(child, f"{run_id}/", reasons, directory, depth + 1)
    return count


def _unsafe_zip_members(url) -> list[str]:
    """Members of a zip store whose names could escape a folder if someone extracted them."""
    import os
    import zipfile

    path = file_url_path(os.fspath(url))
    if not path.endswith(".zip"):
        return []
    try:
        names = zipfile.ZipFile(path).namelist()
    except (OSError, zipfile.BadZipFile):
        return []  # opening the store reports it
    return [
        f"zip member {name[:80]!r} has an unsafe name (absolute, '..', backslash or NUL)"
        for name in names
        if name.startswith("/") or "\\" in name or "\0" in name or ".." in name.split("/")
    ]


def validate_store(url) -> tuple[list[str], int]:
    """All reasons the store is invalid (empty when valid) and the number of runs checked."""
    unsafe = _unsafe_zip_members(url)
    if unsafe:
        return unsafe, 0
    try:
        root = open_root(url)
    except StoreError as exc:
        return [str(exc)], 0
    reasons = [f"/: {r}" for r in validate_attrs("store", root.attrs.asdict())]
    runs = 0
    try:
        if layout.RUNS in root:
            folder = local_path(url)
            runs = _walk_runs(root[layout.RUNS], "", reasons, folder and folder / layout.RUNS)
        if layout.ANALYSES in root:
            for name, child in root[layout.ANALYSES].groups():
                reasons.extend(
                    f"analyses/{name}: {r}"
                    for r in validate_attrs("analysis", child.attrs.asdict())
                )
    except Exception as exc:  # unreadable metadata deep in the tree
        reasons.append(f"store could not be read completely: {type(exc).__name__}: {exc}")
    return reasons, runs
