"""Bringing existing trajectories into a store: ``.npy`` arrays and folders of state dicts.

An import either completes or leaves nothing behind: on any failure the new run is removed.
Checkpoints are loaded with ``torch.load(weights_only=True)``, which refuses any pickle that
would need to run code.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import ImportFailedError, RunExistsError, ShapeChangedError
from . import layout
from .location import open_root
from .writer import CHUNK_BYTES, RunWriter, SeriesSpec

__all__ = ["import_npy", "import_torch", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
ROWS_PER_WRITE = 64


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


def _write_all(store, run_id, metadata, spec, rows_iter) -> int:
    """Write (steps, rows) blocks as the run's params; remove the run if anything fails."""
    writer, made = _new_run(store, run_id, metadata)
    count = 0
    try:
        writer.add_series(spec)
        for steps, rows in rows_iter:
            writer.append(layout.PARAMS, steps, rows)
            count += len(steps)
        writer.close("complete")
    except BaseException:
        writer.abandon()
        _remove_run(store, made)
        raise
    return count


NPY_MAGIC = b"\x93NUMPY"


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
    dtype = "float64" if array.dtype.kind == "f" and array.dtype.itemsize >= 8 else "float32"
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


def _step_of(path: Path) -> int | None:
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else None


def _load_state_dict(path: Path):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about legacy pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" in str(exc):  # legacy (non-zip) checkpoints cannot be memory-mapped
            return _load_state_dict_unmapped(path)
        raise _refusal(path, exc) from exc
    except Exception as exc:
        raise _refusal(path, exc) from exc
    return _unwrap(path, obj)


def _load_state_dict_unmapped(path: Path):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _refusal(path, exc) from exc
    return _unwrap(path, obj)


def _refusal(path: Path, exc) -> ImportFailedError:
    """One line naming the file and, where torch says it, the global the pickle wanted."""
    lines = str(exc).splitlines()
    detail = next((line.strip() for line in lines if "Unsupported global" in line), None)
    detail = detail or f"{type(exc).__name__}: {(lines or [''])[0][:120]}"
    return ImportFailedError(
        f"Refused checkpoint {path.name!r}: it is not a plain tensor state dict that loads with "
        f"weights_only=True (loading it could run code). {detail}"
    )


def _unwrap(path: Path, obj):
    """The tensors of a state dict (possibly nested under 'state_dict'/'model') and its step."""
    import torch

    step = None
    if isinstance(obj, dict):
        for key in ("step", "global_step"):
            if isinstance(obj.get(key), int):
                step = obj[key]
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = (
        {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, dict)
        else {}
    )
    if not tensors:
        raise ImportFailedError(
            f"Checkpoint {path.name!r} holds no tensors (expected a state dict)."
        )
    return tensors, step


def import_torch(
    source, store, run_id: str, tags: dict | None = None, params: str | None = None
) -> int:
    """Import a folder of ``torch.save`` state dicts, ordered by step, as one run.

    The step of each file is its ``step``/``global_step`` entry if it has one, else the last
    number in its file name. ``params`` is a regex selecting tensors by name.
    """
    tags = _check_run(run_id, tags)
    folder = Path(source)
    if not folder.is_dir():
        raise ImportFailedError(f"Expected a folder of checkpoints at {str(folder)!r}.")
    files = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
    if not files:
        raise ImportFailedError(
            f"No checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) in {str(folder)!r}."
        )
    try:
        pattern = re.compile(params) if params else None
    except re.error as exc:
        raise ImportFailedError(f"Invalid params regex {params!r}: {exc}.") from exc
    loaded = []
    for path in files:
        tensors, step = _load_state_dict(path)
        step = _step_of(path) if step is None else step
        if step is None:
            raise ImportFailedError(
                f"Cannot tell the step of {path.name!r}: no step entry and no number in its name."
            )
        if not 0 <= step < 2**63:  # the store's steps are int64 and never negative
            raise ImportFailedError(
                f"Invalid step {step} of {path.name!r}; expected 0 <= step < 2**63."
            )
        loaded.append((step, path, tensors))
    loaded.sort(key=lambda item: item[0])
    steps = [s for s, _, _ in loaded]
    if len(set(steps)) != len(steps):
        raise ImportFailedError(f"Two checkpoints in {str(folder)!r} share a step: {steps}.")
    first = loaded[0][2]
    names = [
        n for n in first if (pattern is None or pattern.search(n)) and first[n].is_floating_point()
    ]
    if not names:
        raise ImportFailedError(f"No floating-point tensor matches params={params!r}.")
    table, offset = [], 0
    for n in names:
        table.append(
            {
                "name": n,
                "offset": offset,
                "shape": list(first[n].shape),
                "dtype": str(first[n].dtype).removeprefix("torch."),
            }
        )
        offset += first[n].numel()

    def rows():
        import torch

        for step, path, tensors in loaded:
            for n, entry in zip(names, table, strict=True):
                if n not in tensors or list(tensors[n].shape) != entry["shape"]:
                    raise ShapeChangedError(
                        f"Checkpoint {path.name!r} has tensor {n!r} with another shape or none; "
                        "all checkpoints of a run must share one layout."
                    )
            flat = torch.cat([tensors[n].detach().reshape(-1).to(torch.float32) for n in names])
            yield np.array([step]), flat.numpy()[None, :]

    spec = SeriesSpec(
        layout.PARAMS,
        (offset,),
        attrs={"kind": "full" if len(names) == len(first) else "subset", "tensors": table},
        chunk_steps=_rows_per_chunk(offset * 4),
        row_dims=("param",),
    )
    metadata = {"tags": dict(tags or {}), "source": {"kind": "torch", "path": str(folder)}}
    return _write_all(store, run_id, metadata, spec, rows())
