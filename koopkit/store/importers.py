"""Bringing existing trajectories into a store: ``.npy`` arrays and folders of state dicts.

An import either completes or leaves nothing behind: everything the input can be checked for
(shapes, dtypes, steps, the layout of every checkpoint) is checked before the store is touched,
and a failure while writing removes the new run, and the store too if this import created it.
Checkpoints are loaded with ``torch.load(weights_only=True)``, which refuses any pickle that
would need to run code.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..errors import ImportFailedError, RunExistsError, ShapeChangedError
from . import layout
from .location import local_path, open_root
from .writer import CHUNK_BYTES, RunWriter, SeriesSpec

__all__ = ["import_npy", "import_torch", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
ROWS_PER_WRITE = 64
EXACT_IN_FLOAT64 = 2**53  # every integer of at most this magnitude is a float64


def _rows_per_chunk(row_bytes: int) -> int:
    """Rows per chunk and per write: about CHUNK_BYTES, so memory stays bounded however wide."""
    return max(1, min(ROWS_PER_WRITE, CHUNK_BYTES // max(1, row_bytes)))


def _check_run(run_id, tags) -> dict:
    """The run id and tags, refused before any data is read or the store is created."""
    layout.check_run_id(run_id)
    return layout.check_tags(tags)


def _new_run(store, run_id, metadata) -> tuple[RunWriter, list[str]]:
    """A writer on a new run, and the groups made for it (deepest first) to remove on failure."""
    root = open_root(store, writable=True)
    path = layout.run_path(run_id)
    if path in root and (root[path].attrs.get(layout.NAMESPACE) or {}).get("node") == "run":
        status = root[path].attrs.get("status")
        unfinished = (  # a killed import or recording leaves its run behind, id and all
            f" (status {status!r}: it did not finish; remove {path} to reuse the id)"
            if status in ("recording", "interrupted")
            else ""
        )
        raise RunExistsError(
            f"Run {run_id!r} already exists in {str(store)!r}{unfinished}; choose another run id."
        )
    parts = path.split("/")
    made = [p for p in ("/".join(parts[:d]) for d in range(len(parts), 1, -1)) if p not in root]
    return RunWriter(store, run_id, metadata, resume=False), made


def _remove_run(store, made) -> None:
    """Remove the run, and each group of runs made for it that nothing else has moved into."""
    try:
        root = open_root(store, writable=True)
        for path in made:
            if path != made[0] and any(True for _ in root[path].members()):
                return
            del root[path]
    except Exception:
        pass  # best effort: the store may be what failed


def _missing_directories(store) -> list[Path]:
    """A local store's directory and those of its parents that do not exist yet, deepest first."""
    directory = local_path(store)
    directory = None if directory is None else directory.resolve()  # "new/../s.zarr" is s.zarr
    missing = []
    while directory is not None and not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove_new_store(missing) -> None:
    """Remove a store this import created, unless something besides its empty skeleton is there
    (another writer may have moved in)."""
    if not missing:
        return
    root, runs = missing[0], missing[0] / layout.RUNS
    try:
        if {p.name for p in root.iterdir()} - {"zarr.json", layout.RUNS}:
            return
        if runs.is_dir() and {p.name for p in runs.iterdir()} - {"zarr.json"}:
            return
        shutil.rmtree(root)
        for directory in missing[1:]:
            directory.rmdir()
    except OSError:
        pass  # best effort, like the run's removal


def _write_all(store, run_id, metadata, spec, rows_iter) -> int:
    """Write (steps, rows) blocks as the run's params; on failure remove what this import made."""
    missing = _missing_directories(store)
    writer = None
    count = 0
    try:
        writer, made = _new_run(store, run_id, metadata)
        writer.add_series(spec)
        for steps, rows in rows_iter:
            writer.append(layout.PARAMS, steps, rows)
            count += len(steps)
        writer.close("complete")
    except BaseException:
        if writer is not None:
            writer.abandon()
            _remove_run(store, made)
        _remove_new_store(missing)
        raise
    return count


NPY_MAGIC = b"\x93NUMPY"


def _npy_dtype(array, path: Path) -> str:
    """The stored dtype, which holds every value exactly: float64 for float64 and for integers
    wider than 16 bits (float32 rounds them above 2**24); int64 beyond 2**53 is refused."""
    if array.dtype.kind == "f":
        return "float64" if array.dtype.itemsize >= 8 else "float32"
    if array.dtype.itemsize <= 2:
        return "float32"
    if array.dtype.itemsize == 8 and max(-int(array.min()), int(array.max())) > EXACT_IN_FLOAT64:
        raise ImportFailedError(
            f"Invalid .npy file {str(path)!r}: its {array.dtype} values exceed 2**53 in magnitude, "
            "which float64 cannot hold exactly; rescale or convert them first."
        )
    return "float64"


def import_npy(source, store, run_id: str, tags: dict | None = None, name: str = "x") -> int:
    """Import a ``(steps, features)`` array from a ``.npy`` file as one run; returns the rows."""
    tags = _check_run(run_id, tags)
    path = Path(source)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise ImportFailedError(f"Cannot read {str(path)!r}: {exc.strerror or exc}.") from exc
    if magic != NPY_MAGIC:  # np.load would try it as a pickle and say so
        raise ImportFailedError(
            f"Invalid .npy file {str(path)!r}: it does not start with the .npy magic "
            "bytes; expected an array saved with numpy.save."
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        if "pickled" in str(exc) or "Python objects" in str(exc):
            raise ImportFailedError(
                f"Invalid .npy file {str(path)!r}: it holds Python objects, which are stored "
                "as pickles and never loaded; expected a numeric (steps, features) array."
            ) from exc
        raise ImportFailedError(f"Cannot read {str(path)!r} as a .npy array: {exc}") from exc
    if array.ndim != 2 or array.dtype.kind not in "fiu" or 0 in array.shape:
        raise ImportFailedError(
            f"Expected a non-empty 2-D numeric array (steps, features) in {str(path)!r}. "
            f"Got shape {array.shape} of dtype {array.dtype} instead."
        )
    dtype = _npy_dtype(array, path)
    rows = _rows_per_chunk(array.shape[1] * np.dtype(dtype).itemsize)
    spec = SeriesSpec(
        layout.PARAMS,
        (array.shape[1],),
        dtype=dtype,
        attrs={
            "kind": "full",
            "tensors": [
                {"name": name, "offset": 0, "shape": [array.shape[1]], "dtype": array.dtype.name}
            ],
        },
        chunk_steps=rows,
        row_dims=("param",),
    )
    metadata = {"tags": dict(tags or {}), "source": {"kind": "npy", "path": str(path)}}
    blocks = (
        (
            np.arange(i, min(i + rows, len(array))),
            np.asarray(array[i : i + rows], dtype=dtype),
        )
        for i in range(0, len(array), rows)
    )
    return _write_all(store, run_id, metadata, spec, blocks)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_MAGIC = b"\x80"  # the PROTO opcode that starts a legacy torch.save pickle
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")  # where trainers nest it
STEP_KEYS = ("step", "global_step")


def _checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint files of a folder, by suffix in any case; directories are not files."""
    if not folder.is_dir():
        raise ImportFailedError(f"Expected a folder of checkpoints at {str(folder)!r}.")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()
    )
    if not files:
        raise ImportFailedError(
            f"No checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) in {str(folder)!r}."
        )
    return files


def _params_pattern(params):
    try:
        return re.compile(params) if params else None
    except re.error as exc:
        raise ImportFailedError(f"Invalid params regex {params!r}: {exc}.") from exc


def _load(path: Path):
    """What ``torch.save`` wrote to ``path``: memory-mapped from a zip, unpickled with
    ``weights_only=True`` from a legacy pickle; anything else is not a checkpoint."""
    import torch

    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as exc:
        raise ImportFailedError(f"Cannot read {path.name!r}: {exc.strerror or exc}.") from exc
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise _unreadable(path, "it does not start as torch.save's zip archive or pickle does")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about legacy pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head == ZIP_MAGIC)
    except Exception as exc:
        # weights_only refuses what a pickle asks for with an UnpicklingError (named, not
        # imported: this module never imports pickle); else a truncated zip, an empty pickle
        if type(exc).__name__ == "UnpicklingError":
            raise _refusal(path, exc) from exc
        raise _unreadable(path, _first_line(exc)) from exc


def _unreadable(path: Path, why: str) -> ImportFailedError:
    return ImportFailedError(f"Cannot read {path.name!r} as a torch checkpoint: {why}.")


def _first_line(exc) -> str:
    """The exception's type and the first sentence of its message, for a one-line error."""
    line = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _refusal(path: Path, exc) -> ImportFailedError:
    """One line naming the file and, where torch says it, what the pickle wanted."""
    lines = [line.strip() for line in str(exc).splitlines()]
    wanted = next((line for line in lines if "unsupported" in line.lower()), None)
    return ImportFailedError(
        f"Refused checkpoint {path.name!r}: it is not a plain tensor state dict that loads with "
        "weights_only=True (loading it could run code). "
        + (wanted.split(". ")[0][:160] if wanted else _first_line(exc))
    )


def _state_dict(path: Path, obj) -> dict:
    """The tensors of a checkpoint: of the first state dict nested under a usual key that holds
    any (a 'model' entry may be a name or a config), else of the checkpoint itself."""
    import torch

    candidates = [obj.get(key) for key in STATE_DICT_KEYS] + [obj] if isinstance(obj, dict) else []
    for candidate in candidates:
        if isinstance(candidate, dict):
            tensors = {k: v for k, v in candidate.items() if isinstance(v, torch.Tensor)}
            if tensors:
                break
    else:
        raise ImportFailedError(
            f"Checkpoint {path.name!r} holds no tensors (expected a state dict)."
        )
    keys = [k for k in tensors if not isinstance(k, str)]
    if keys:
        raise ImportFailedError(
            f"Checkpoint {path.name!r} has a tensor under the key {keys[0]!r}; expected a state "
            "dict whose keys are tensor names (strings)."
        )
    return tensors


def _step_entry(path: Path, obj: dict, key: str) -> int | None:
    """The integer under ``key``: an int, a numpy integer or a 0-d integer tensor; None when
    absent or a tensor with dimensions (a parameter named like a step)."""
    import torch

    value = obj.get(key)
    if value is None or (isinstance(value, torch.Tensor) and value.ndim):
        return None
    if isinstance(value, (torch.Tensor, np.generic)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImportFailedError(
            f"Invalid {key!r} entry of {path.name!r}: a {type(value).__name__}, not an integer step."
        )
    return value


def _step(path: Path, obj) -> int:
    """The step of a checkpoint: its ``step``/``global_step`` entry, else the last number in its
    file name."""
    entries = (
        {key: _step_entry(path, obj, key) for key in STEP_KEYS} if isinstance(obj, dict) else {}
    )
    found = {key: value for key, value in entries.items() if value is not None}
    if len(set(found.values())) > 1:
        raise ImportFailedError(
            f"Checkpoint {path.name!r} has step {found['step']} and global_step "
            f"{found['global_step']}; expected one step."
        )
    numbers = re.findall(r"\d+", path.stem)
    if not found and not numbers:
        raise ImportFailedError(
            f"Cannot tell the step of {path.name!r}: no step entry and no number in its name."
        )
    step = next(iter(found.values())) if found else int(numbers[-1])
    if not 0 <= step < 2**63:  # the store's steps are int64 and never negative
        raise ImportFailedError(
            f"Invalid step {step} of {path.name!r}; expected 0 <= step < 2**63."
        )
    return step


def _dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _select(path: Path, tensors: dict, pattern, params) -> tuple[list[str], str]:
    """The names of the tensors to import, and the series kind: 'full' when they are all the
    floating-point and complex ones (integer buffers such as num_batches_tracked are never
    parameters), as a Recorder's 'full' is all of a model's parameters."""
    matched = [n for n in tensors if pattern is None or pattern.search(n)]
    complex_ = [f"{n!r} ({_dtype_name(tensors[n])})" for n in matched if tensors[n].is_complex()]
    if complex_:  # a real row would keep only their real part
        raise ImportFailedError(
            f"Checkpoint {path.name!r} has complex tensors {', '.join(complex_[:5])}; koopkit "
            "stores real ones. Select the real tensors with params."
        )
    names = [n for n in matched if tensors[n].is_floating_point()]
    if not names:
        raise ImportFailedError(f"No floating-point tensor matches params={params!r}.")
    inexact = [n for n, t in tensors.items() if t.is_floating_point() or t.is_complex()]
    return names, "full" if len(names) == len(inexact) else "subset"


def _check_layout(loaded, names) -> None:
    """Every checkpoint holds each imported tensor with the first one's shape and dtype."""
    _, first_path, first = loaded[0]
    for _, path, tensors in loaded[1:]:
        for n in names:
            if n not in tensors or tensors[n].shape != first[n].shape:
                raise ShapeChangedError(
                    f"Checkpoint {path.name!r} has tensor {n!r} with another shape or none; "
                    "all checkpoints of a run must share one layout."
                )
            if tensors[n].dtype != first[n].dtype:
                raise ImportFailedError(
                    f"Checkpoint {path.name!r} has tensor {n!r} as {_dtype_name(tensors[n])}, "
                    f"{first_path.name!r} as {_dtype_name(first[n])}; all checkpoints of a run "
                    "must share one dtype per tensor."
                )


def import_torch(
    source, store, run_id: str, tags: dict | None = None, params: str | None = None
) -> int:
    """Import a folder of ``torch.save`` state dicts, ordered by step, as one run.

    The step of each file is its ``step``/``global_step`` entry if it has one, else the last
    number in its file name. ``params`` is a regex selecting tensors by name. Values are stored
    as float32 (exact for float16 and bfloat16), or float64 when any imported tensor is float64.
    """
    import torch

    tags = _check_run(run_id, tags)
    folder = Path(source)
    files = _checkpoint_files(folder)
    pattern = _params_pattern(params)
    loaded = []
    for path in files:
        obj = _load(path)
        loaded.append((_step(path, obj), path, _state_dict(path, obj)))
    loaded.sort(key=lambda item: item[0])
    steps = [s for s, _, _ in loaded]
    if len(set(steps)) != len(steps):
        raise ImportFailedError(f"Two checkpoints in {str(folder)!r} share a step: {steps}.")
    first_path, first = loaded[0][1:]
    names, kind = _select(first_path, first, pattern, params)
    _check_layout(loaded, names)
    dtype = "float64" if any(first[n].dtype == torch.float64 for n in names) else "float32"
    table, offset = [], 0
    for n in names:
        table.append(
            {
                "name": n,
                "offset": offset,
                "shape": list(first[n].shape),
                "dtype": _dtype_name(first[n]),
            }
        )
        offset += first[n].numel()

    def rows():
        for step, _, tensors in loaded:
            flat = torch.cat(
                [tensors[n].detach().reshape(-1).to(getattr(torch, dtype)) for n in names]
            )
            yield np.array([step]), flat.numpy()[None, :]

    spec = SeriesSpec(
        layout.PARAMS,
        (offset,),
        dtype=dtype,
        attrs={"kind": kind, "tensors": table},
        chunk_steps=_rows_per_chunk(offset * np.dtype(dtype).itemsize),
        row_dims=("param",),
    )
    metadata = {"tags": dict(tags or {}), "source": {"kind": "torch", "path": str(folder)}}
    return _write_all(store, run_id, metadata, spec, rows())
