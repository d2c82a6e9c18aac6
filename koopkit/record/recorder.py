"""The training-loop hook: ``with Recorder(...) as rec: ... rec.step(loss=loss)``."""

from __future__ import annotations

import functools
import numbers
import os
import re
import reprlib
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .. import __version__  # noqa: F401  (recorded through the writer)
from ..errors import (
    InvalidRunIdError,
    NonFiniteSnapshotWarning,
    ShapeChangedError,
    WriteFailedError,
)
from ..store import layout
from ..store.writer import RunWriter, SeriesSpec, check_compressor
from .graphed import GraphedFill
from .pages import Pager
from .schedule import make_schedule
from .sketch import METHODS, check_sketch, make_sketch
from .transfer import (
    Flattener,
    ProjectionWorker,
    ScalarLog,
    VectorStream,
    WriterThread,
    a_core_is_free,
    flatten_into,
)

__all__ = ["Recorder", "Probe"]

MAX_CHUNK_STEPS = 64
SCALAR_BATCH = 256
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


@dataclass
class Probe:
    """A fixed probe batch whose per-sample outputs are recorded at every snapshot.

    ``fn(model, inputs)`` returns a ``(samples, features)`` tensor; by default the model's
    output in eval mode without gradients (each submodule's mode is restored afterwards).
    """

    inputs: torch.Tensor
    labels: object = None
    ids: object = None
    fn: object = None


@dataclass
class _ProbePlan:
    """A probe checked before the run is created: its output shape and sample coordinates."""

    path: str
    fn: object
    inputs: torch.Tensor
    samples: int
    features: int
    coords: dict


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_name(name, what: str) -> str:
    """A series name (scalar, probe) as a single path component, refused with a ValueError."""
    try:
        return layout.check_name(name, what)
    except InvalidRunIdError as exc:
        raise ValueError(str(exc)) from None


def _as_probe(name, probe) -> Probe:
    if isinstance(probe, Probe):
        return probe
    if isinstance(probe, tuple):
        return Probe(*probe)
    if isinstance(probe, torch.Tensor):
        return Probe(probe)
    raise ValueError(
        f"Invalid probe {name!r}: got {type(probe).__name__}; expected a Probe(inputs, labels) "
        "or a tensor of inputs."
    )


def _probe_coord(name, values, what: str, samples: int) -> np.ndarray:
    """A probe's sample ids or labels: one number or string per sample, as a 1-D array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] != samples:
        raise ValueError(
            f"Invalid {what} of probe {name!r}: expected {samples} entries, one per sample; "
            f"got shape {array.shape}."
        )
    if array.dtype.kind not in "biufU":
        raise ValueError(
            f"Invalid {what} of probe {name!r}: expected numbers or strings; "
            f"got {array.dtype} values."
        )
    return array


def _scalar_value(name, value):
    """A scalar to log: a one-element real tensor (kept on its device) or a Python float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(
                f"Invalid scalar {name!r}: a {value.dtype} tensor of shape {tuple(value.shape)}; "
                "expected one real number (a 0-d or one-element tensor, e.g. loss.mean())."
            )
        return value
    if (
        isinstance(value, np.ndarray | np.generic)
        and value.size == 1
        and value.dtype.kind in "biuf"
    ):
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(
        f"Invalid scalar {name!r}={_short.repr(value)}; expected a real number or a "
        "one-element tensor."
    )


def _outside_inference_mode(method):
    """Run a Recorder entry point with inference mode off: buffers made while a caller
    evaluates under ``torch.inference_mode()`` would be inference tensors, which no later
    snapshot outside it could write into. Outside inference mode nothing changes (grad mode
    stays the caller's); inside it, ``inference_mode(False)`` also turns grad mode on."""

    @functools.wraps(method)
    def outside(*args, **kwargs):
        if not torch.is_inference_mode_enabled():  # the common case: no context to enter
            return method(*args, **kwargs)
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return outside


def _default_probe_fn(model, inputs):
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(inputs)
    finally:
        model.train(modes[0][1])
        for module, training in modes:  # a frozen BatchNorm kept in eval stays in eval
            module.training = training


def _dense_grad(p):
    """``p.grad`` to record: zeros where there is none, dense where it is sparse
    (``nn.Embedding(sparse=True)``), since rows are flat dense vectors."""
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad if p.grad.layout == torch.strided else p.grad.to_dense()


def _select(model, params):
    """(name, parameter) pairs chosen by True, a regex string, or a list of names.

    A tied parameter (one tensor under several names, as an output layer sharing the
    embedding's weight) is chosen by any of its names and recorded once, under the name
    ``named_parameters()`` gives it.
    """
    named = list(model.named_parameters())
    first = {id(p): n for n, p in named}
    try:
        every_name = model.named_parameters(remove_duplicate=False)
    except TypeError:  # a module whose own named_parameters takes no such argument
        every_name = named
    aliases = {n: first[id(p)] for n, p in every_name}
    if not isinstance(params, bool | str) and isinstance(params, Iterable):
        params = list(params)  # a tuple, dict keys, a generator: names in their order
    if params is True:
        chosen = named
    elif isinstance(params, str):
        pattern = re.compile(params)
        matched = {first_name for n, first_name in aliases.items() if pattern.search(n)}
        chosen = [(n, p) for n, p in named if n in matched]
    elif isinstance(params, list) and all(isinstance(n, str) for n in params):
        missing = [n for n in params if n not in aliases]
        if missing:
            raise ValueError(
                f"Invalid params {missing!r}; the model has: {', '.join(aliases) or 'no parameters'}."
            )
        names = [aliases[n] for n in params]
        repeated = sorted({n for n in params if names.count(aliases[n]) > 1})
        if repeated:
            raise ValueError(
                f"Invalid params: {repeated!r} name one parameter more than once (tied "
                "parameters have several names); name each once."
            )
        known = dict(named)
        chosen = [(n, known[n]) for n in names]
    else:
        raise ValueError(
            f"Invalid params={params!r}; expected True, a regex string, a list of parameter "
            "names, or False for none."
        )
    if not chosen:
        raise ValueError(f"params={params!r} selects no parameter of the model.")
    complex_ = [f"{n!r} ({p.dtype})" for n, p in chosen if p.is_complex()]
    if complex_:  # a real row would keep only their real part
        raise ValueError(
            f"Invalid params: complex parameters {', '.join(complex_)}; koopkit records real "
            "ones. Select the real parameters with params=[...] or a regex."
        )
    meta = [repr(n) for n, p in chosen if p.is_meta]
    if meta:  # nothing to copy: the first snapshot would fail after the run exists
        raise ValueError(
            f"Invalid params: {', '.join(meta[:5])} are on the meta device and hold no values; "
            "materialise the model (model.to_empty(device=...), then load its weights) first."
        )
    return chosen, ("full" if len(chosen) == len(named) else "subset")


def _lists_its_own(module) -> bool:
    """Whether a module overrides how it lists its parameters, on its class or itself."""
    Module = torch.nn.Module
    names = ("named_parameters", "_named_members", "named_modules")
    return any(
        getattr(type(module), name) is not getattr(Module, name) or name in vars(module)
        for name in names
    )


def _walk(model):
    """What ``model.named_parameters()`` reads: the modules it visits (weakly, so a module
    replaced since is neither kept alive nor mistaken for a new one at its address), and
    each one's children and parameters by name and id. The recorder holds the parameters it
    records, so no new parameter can take one of their ids; a change to another parameter
    does not matter.

    False when a module lists its own parameters: then only a full walk tells.
    """
    if _lists_its_own(model):
        return False
    modules = list(model.modules())
    if any(_lists_its_own(m) for m in modules):
        return False
    return [weakref.ref(m) for m in modules], _structure(modules)


def _structure(modules):
    return [
        (name, id(value))
        for m in modules
        for d in (m._modules, m._parameters)
        for name, value in d.items()
    ]


def _tensors_table(chosen):
    table, offset = [], 0
    for name, p in chosen:
        table.append(
            {
                "name": name,
                "offset": offset,
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
            }
        )
        offset += p.numel()
    return table, offset


def _json_safe(value):
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)


def _optimizer_meta(optimizer):
    if optimizer is None:
        return None
    return {
        "class": type(optimizer).__name__,
        "hyperparams": {k: _json_safe(v) for k, v in optimizer.defaults.items()},
    }


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


# Open Recorders share one SIGTERM handler: the first installs it, the last restores the old one.
_SIGTERM_GUARD = threading.Lock()
_sigterm = {"users": 0, "previous": None}


def _hold_sigterm() -> bool:
    """Count one open Recorder, installing the handler where SIGTERM has its default action.

    False (nothing counted) outside the main thread, where Python cannot set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    with _SIGTERM_GUARD:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            _sigterm["previous"] = signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm["users"] += 1
    return True


def _release_sigterm() -> None:
    """Uncount one Recorder; the last one restores the handler ours replaced."""
    with _SIGTERM_GUARD:
        _sigterm["users"] = max(0, _sigterm["users"] - 1)
        if _sigterm["users"] or _sigterm["previous"] is None:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a later open and close in the main thread restores it
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # unless someone replaced ours
            signal.signal(signal.SIGTERM, _sigterm["previous"])
        _sigterm["previous"] = None


# Recorders open in this process, closed at exit if the script never closed them.
_OPEN: set = set()


def _close_at_exit() -> None:
    """Commit the rows of Recorders left open, marking their runs interrupted.

    Registered with threading's exit hooks, after ``concurrent.futures`` registered its own,
    so it runs first, while the projection threads still take work (``atexit`` runs after).
    A forked child inherits the set but not the Recorders' threads: it leaves them alone.
    """
    for rec in list(_OPEN):
        if rec._pid != os.getpid():
            continue
        warnings.warn(
            f"Recorder of run {rec.run_id!r} was never closed; its rows are committed at exit "
            "and the run marked interrupted. Use it as a context manager, or call close().",
            RuntimeWarning,
            stacklevel=1,
        )
        try:
            rec.close(status="interrupted", raise_errors=False)
        except Exception:  # the store may be gone; exit anyway
            pass


threading._register_atexit(_close_at_exit)


def _chunk_steps(row_bytes: int, max_inflight_bytes: int) -> int:
    """Rows per chunk: as many as fit half the in-flight budget, a power of two up to 64."""
    rows = max(1, (max_inflight_bytes // 2) // max(1, row_bytes))
    return min(MAX_CHUNK_STEPS, 1 << (rows.bit_length() - 1))


class _Attachment:
    """What ``Recorder.attach`` returns: ``remove()`` stops recording that optimizer's steps."""

    def __init__(self, recorder, optimizer):
        self.recorder, self.optimizer = recorder, optimizer

    def remove(self) -> None:
        for attached in list(self.recorder._attached):
            if attached[0] is self.optimizer:
                if attached[1] is not None:
                    attached[1].remove()
                self.recorder._attached.remove(attached)


class Recorder:
    """Record a model's trajectory into a koopkit store from inside any training loop.

    Parameters
    ----------
    store : str or path
        Store directory or fsspec URL; created when absent.
    run : str
        Run id, e.g. ``"fcn/h40/seed2"``; ``/`` nests groups.
    model : torch.nn.Module, optional
        The model whose parameters (and gradients, probe outputs) are recorded.
    every : int, list of int, or Schedule
        Snapshot steps: every N optimizer steps, explicit steps, or ``log_spaced(...)``.
    tags : dict
        Free key -> value labels the CLI selects and groups by (width, seed, optimizer...).
        A resumed run keeps its tags and takes these too; a tag given again takes its new
        value.
    params : True, str or list of str
        All parameters, those whose name matches a regex, or the named ones; False for none.
    grads : bool
        Also record gradients (call ``rec.step`` before ``zero_grad``, or use ``attach``);
        a parameter without a gradient is recorded as zeros, and a snapshot after the first
        step where no parameter has one warns once.
    probes : dict of name -> Probe
        Per-sample outputs on fixed probe batches, stored as (step, sample, feature). Needs
        ``model``; ``ids`` and ``labels`` give one number or string per sample.
    sketch : int, optional
        Record a seeded random projection of width ``sketch`` (an int >= 1) instead of the
        raw parameters; None records them as they are. On CPU the projection runs on a
        helper thread when torch's threads leave a core free (``torch.set_num_threads``
        below the cores this process may use, checked at ``open``), else inside ``step``.
    sketch_method : {"countsketch", "gaussian"}
    seed : int
        Seed of the sketch (an int >= 0).
    dtype : {"float32", "float16", "float64"}
        Storage dtype of vector series (a resumed run's must match); values beyond
        float16's range (65504) are stored as Inf. Scalars are stored as float32.
    initial : bool
        Record the initial parameters as step 0.
    on_full : {"block", "drop"}
        When every buffer is in flight: wait for the writer (``waited_s`` adds up the wait),
        or drop snapshots (counted).
    on_error : {"raise", "warn"}
        A failed write raises at the next ``step`` (default), or warns once and stops recording.
    flush_every_s : float or None
        Seconds after which captured rows are written and committed even if their chunk row
        is not full, checked at each ``rec.step``; a sparse schedule would otherwise keep its
        last snapshots in memory until enough arrive. None waits for full chunk rows.
    max_inflight_bytes : int
        Host memory for snapshots not yet written, shared by all vector series (params,
        grads, probes) in proportion to their row size; it sets the chunk depth and buffer
        count. Each series keeps at least two buffers of one row, and the writer's chunk
        buffer and the CPU sketch inputs come on top.
    resume : bool
        Continue a run that already holds committed steps; snapshots at steps already
        committed are skipped, series by series, so a deterministic replay continues without
        gaps or duplicates.
    start_step : int
        The optimizer step the loop starts from (after restoring a checkpoint), an int >= 0.
    optimizer : torch.optim.Optimizer, optional
        Recorded in the run metadata; ``attach`` sets it too.
    compressor : {None, "zstd", "blosc"}
        Compression of vector series; None keeps up with training best.
    """

    def __init__(
        self,
        store,
        run: str,
        model: torch.nn.Module | None = None,
        *,
        every=1,
        tags: dict | None = None,
        params=True,
        grads: bool = False,
        probes: dict | None = None,
        sketch: int | None = None,
        sketch_method: str = "countsketch",
        seed: int = 0,
        dtype: str = "float32",
        initial: bool = True,
        on_full: str = "block",
        on_error: str = "raise",
        max_inflight_bytes: int = 512 * 2**20,
        flush_every_s: float | None = 60.0,
        resume: bool = True,
        start_step: int = 0,
        optimizer=None,
        compressor: str | None = None,
    ):
        if on_full not in ("block", "drop"):
            raise ValueError(f"Invalid on_full={on_full!r}; expected 'block' or 'drop'.")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"Invalid on_error={on_error!r}; expected 'raise' or 'warn'.")
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(
                f"Invalid dtype={dtype!r}; expected one of {', '.join(_STORAGE_DTYPES)}."
            )
        if flush_every_s is not None and not (
            isinstance(flush_every_s, numbers.Real)
            and not isinstance(flush_every_s, bool)
            and flush_every_s > 0
        ):
            raise ValueError(
                f"Invalid flush_every_s={flush_every_s!r}; expected a number of seconds > 0 or None."
            )
        if not _is_int(start_step) or start_step < 0:
            raise ValueError(f"Invalid start_step={start_step!r}; expected an int >= 0.")
        if not _is_int(max_inflight_bytes) or max_inflight_bytes < 1:
            raise ValueError(
                f"Invalid max_inflight_bytes={max_inflight_bytes!r}; expected an int >= 1."
            )
        check_compressor(compressor)
        if sketch is not None:
            sketch_method, sketch, seed = check_sketch(sketch_method, sketch, seed)
        elif sketch_method not in METHODS:
            raise ValueError(
                f"Invalid sketch_method={sketch_method!r}; expected one of {', '.join(METHODS)}."
            )
        self.store, self.run_id = store, layout.check_run_id(run)
        self.model = model
        self.schedule = make_schedule(every)
        self.tags = dict(tags or {})
        self.params, self.grads = params, grads
        self.probes = {
            _check_name(name, "probe name"): _as_probe(name, probe)
            for name, probe in dict(probes or {}).items()
        }
        if self.probes and model is None:
            raise ValueError(
                f"Probes {', '.join(map(repr, self.probes))} need a model; pass model=... "
                "to the Recorder."
            )
        self.sketch, self.sketch_method, self.seed = sketch, sketch_method, seed
        self.dtype = _STORAGE_DTYPES[dtype]
        self.initial, self.on_full, self.on_error = initial, on_full, on_error
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.flush_every_s = None if flush_every_s is None else float(flush_every_s)
        self._flush_due = 0.0
        self.resume, self.step_count = resume, int(start_step)
        self._start_step = self.step_count
        self.optimizer, self.compressor = optimizer, compressor
        self._writer = None
        self._vectors: dict[str, VectorStream] = {}  # made by open()
        self._workers: dict[str, ProjectionWorker] = {}  # CPU sketches, one per series
        self._pager: Pager | None = None  # faults in fresh host buffers (made by open())
        self._attached = []  # [optimizer, its step hook while open] per attach()
        self._disabled = False
        self._holds_sigterm = False
        self._waited = 0.0  # by streams already closed

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        if self._writer is None:  # ``with rec`` on a Recorder already opened keeps it open
            self.open()
        return self

    def __exit__(self, kind, exc, tb):
        interrupted = kind is not None
        self.close(
            status="interrupted" if interrupted else "complete", raise_errors=not interrupted
        )
        return False

    @_outside_inference_mode
    def open(self) -> Recorder:
        """Open the run (resuming it if it exists) and record the initial snapshot.

        Everything that can be checked without the store (the parameters selected, the
        probes' outputs, ids and labels) is checked first, so a refused call creates nothing.
        """
        self._layout()
        metadata = {
            "tags": self.tags,
            "model": None
            if self.model is None
            else {"class": type(self.model).__name__, "parameter_count": self._model_size},
            "optimizer": _optimizer_meta(self.optimizer),
            "torch_version": torch.__version__.split("+")[0],
            "device": str(self.device),
            "every": self.schedule.to_json(),
            "initial": bool(self.initial),
        }
        self._writer = RunWriter(self.store, self.run_id, metadata, resume=self.resume)
        self._dropped_before = self._writer.dropped
        self._thread = WriterThread(self._writer)
        self._pager = Pager()
        try:
            self._open_series()
        except BaseException:
            self._thread.stop()
            self._close_workers()
            self._writer.discard()  # a run created here and never committed to is removed
            self._writer = None
            raise
        self._holds_sigterm = _hold_sigterm()
        self._pid = os.getpid()
        _OPEN.add(self)
        if self.initial:
            try:
                self.snapshot()
            except BaseException:  # __exit__ will not run: release the run here
                self.close(status="interrupted", raise_errors=False)
                raise
        for attached in self._attached:  # hooked while open, again after a reopen
            attached[1] = self._hook(attached[0])
        return self

    @_outside_inference_mode
    def close(self, status: str = "complete", raise_errors: bool = True) -> None:
        """Flush everything, write the final status and release the run."""
        if self._writer is None:
            return
        self._count_dropped()
        writer = self._detach()
        error = self._thread.error
        if error is None:
            try:
                writer.close(status)
            except Exception as exc:
                error = exc
        if error is not None:
            writer.abandon()
            if raise_errors:
                self._report(error)
            return
        self._check_zero_grads(writer)
        flagged = writer.attrs.get("nonfinite")
        if flagged:
            counts = writer.attrs.get("nonfinite_count") or {}
            summary = ", ".join(
                f"{path} at steps {steps[:5]} ({counts.get(path, len(steps))} rows)"
                for path, steps in flagged.items()
            )
            vectors = any(not path.startswith(layout.SCALARS) for path in flagged)
            overflow = (
                " (or values beyond float16's range, 65504, which it stores as Inf)"
                if self.dtype == torch.float16 and vectors
                else ""
            )
            warnings.warn(
                f"Run {self.run_id!r} recorded NaN/Inf values{overflow} ({summary}); they are "
                "stored as recorded and flagged in the run's 'nonfinite' metadata.",
                NonFiniteSnapshotWarning,
                stacklevel=3,
            )

    def _detach(self):
        """Stop recording: remove hooks, restore SIGTERM, drain the writer thread."""
        _OPEN.discard(self)
        for attached in self._attached:
            if attached[1] is not None:
                attached[1].remove()
                attached[1] = None
        if self._holds_sigterm:
            self._holds_sigterm = False
            _release_sigterm()
        writer, self._writer = self._writer, None
        if self._thread.error is None:
            for stream in self._streams():
                stream.hand_off()
        self._thread.stop()
        self._waited = self.waited_s
        self._close_workers()
        # drop the host buffers now, not when the garbage collector breaks the cycles
        self._vectors, self._fillers, self._scalars = {}, {}, {}
        return writer

    def _close_workers(self):
        """Stop the helper threads (sketch projections, page faulting); they hold buffers."""
        for worker in self._workers.values():
            worker.close()
        self._workers = {}
        if self._pager is not None:
            self._pager.close()
            self._pager = None

    def _report(self, error) -> None:
        """A failed write: raise it (on_error="raise") or warn once (on_error="warn")."""
        if self.on_error == "raise":
            raise self._as_write_error(error)
        if not self._disabled:
            self._disabled = True
            warnings.warn(
                f"Recording of run {self.run_id!r} stopped: {error}", RuntimeWarning, stacklevel=3
            )

    # -- the training-loop calls -------------------------------------------------------------

    @_outside_inference_mode
    def step(self, loss=None, **scalars) -> None:
        """Count one optimizer step; log scalars; snapshot if the schedule says so.

        Scalars describe the iteration that just ended, so they are stored at the step the
        parameters had when they were computed (the count before this call). Never blocks
        on the device: no ``.item()``, no host synchronisation.
        """
        if loss is not None:
            scalars["loss"] = loss
        self.log(**scalars)
        self.step_count += 1
        if self.step_count in self.schedule:
            self.snapshot()
        if self.flush_every_s is not None:
            self._flush_stale()

    @_outside_inference_mode
    def log(self, **scalars) -> None:
        """Log scalars at the current step without counting a step.

        For ``attach`` users: the step counts when ``optimizer.step()`` runs, so log what
        describes the current parameters (the loss) before ``optimizer.step()``. Every
        scalar is checked (a name without ``/``, one real number) before any is logged.
        """
        if not self._live():
            return
        checked = {}
        for name, value in scalars.items():
            log = self._scalars.get(name)
            if log is None:
                _check_name(name, "scalar name")
            checked[name] = _scalar_value(name, value)
            if log is not None and log.last_step is not None and log.last_step >= self.step_count:
                raise ValueError(
                    f"Scalar {name!r} was already logged at step {self.step_count}; "
                    "log each scalar once per step."
                )
        for name, value in checked.items():
            log = self._scalars.get(name)
            if log is None:
                log = self._scalars[name] = self._new_scalar(name)
            last = self._resume_after[log.path]
            if last is None or self.step_count > last:
                log.log(self.step_count, value)

    @_outside_inference_mode
    def snapshot(self) -> None:
        """Record the selected vectors now, at the current step.

        A second snapshot at the step already captured does nothing; one at an earlier step
        raises ``ValueError``. Series that committed this step before a resume skip it.
        """
        if not self._live():
            return
        step = self.step_count
        last = self._last_snapshot
        if last is not None and step <= last:
            if step == last:
                return
            raise ValueError(
                f"Snapshot at step {step} after one at step {last}; snapshot steps must increase."
            )
        if self._chosen:
            self._check_layout(step)
        self._last_snapshot = step
        if self.sketch is not None and self.device.type == "cuda" and self.grads:
            self._follow_stream()
        for path, stream in self._vectors.items():
            committed = self._resume_after[path]
            if committed is not None and step <= committed:
                continue  # this series committed the step before a resume
            if path == layout.GRADS:
                self._check_grads(step)
            stream.capture(step, self._fillers[path])
        self._count_dropped()

    def _count_dropped(self) -> None:
        """Keep the run's ``dropped`` current, so each commit writes it (a reader sees the
        gaps of a run still recording, or of one that died). A plain attribute, not
        ``set``: a snapshot dropped because the writer is busy must not wait for it."""
        writer = self._writer
        if writer is not None:
            writer.dropped = self._dropped_before + sum(s.dropped for s in self._vectors.values())

    def _follow_stream(self) -> None:
        """Where the loop's current stream changed since the last snapshot, make it wait
        for every series' last fill: the params and grads sketches share the sketch's group
        buffer, and each fill waits only for its own series' last one."""
        stream = torch.cuda.current_stream(self.device)
        if stream.cuda_stream != self._fill_stream:
            for series in self._vectors.values():
                stream.wait_event(series.filled)
            self._fill_stream = stream.cuda_stream

    @property
    def waited_s(self) -> float:
        """Seconds the training thread has waited for the writer to free a snapshot buffer,
        or for the projection thread of a CPU sketch to free its input.

        Each wait is step time lost to recording; if they add up, raise
        ``max_inflight_bytes``, record less often, or write to a faster disk.
        """
        streams, workers = self._vectors.values(), self._workers.values()
        return self._waited + sum(s.waited for s in streams) + sum(w.waited for w in workers)

    def attach(self, optimizer) -> _Attachment:
        """Record after every ``optimizer.step()`` without touching the loop, while the
        Recorder is open, also after it is closed and opened again; attaching the same
        optimizer again changes nothing. ``remove()`` on what it returns detaches it."""
        self.optimizer = optimizer
        if self._writer is not None:
            self._writer.set(optimizer=_optimizer_meta(optimizer))
        if all(attached[0] is not optimizer for attached in self._attached):
            hook = None if self._writer is None else self._hook(optimizer)
            self._attached.append([optimizer, hook])
        return _Attachment(self, optimizer)

    def _hook(self, optimizer):
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    # -- internals ---------------------------------------------------------------------------

    def _live(self) -> bool:
        if self._writer is None:
            raise RuntimeError("The Recorder is not open; use it as a context manager.")
        error = self._thread.error
        if error is not None and not self._disabled:
            if self.on_error == "raise":
                self._detach().abandon()
            self._report(error)
        return not self._disabled

    def _as_write_error(self, error):
        if isinstance(error, WriteFailedError):
            return error
        return WriteFailedError(
            f"Recording run {self.run_id!r} failed: {type(error).__name__}: {error}"
        )

    def _layout(self):
        """Decide what is recorded and where it lives; evaluate each probe once.

        Runs before the run is created, so anything refused here leaves the store untouched.
        """
        self._chosen, kind = [], None
        if self.model is not None and self.params is not False:
            self._chosen, kind = _select(self.model, self.params)
        self._kind = "sketch" if self.sketch is not None else kind
        self._table, self._size = _tensors_table(self._chosen)
        self._shapes = [tuple(p.shape) for _, p in self._chosen]
        self._walked = None  # what the last full layout check saw; None: walk, False: always
        self._model_size = (
            sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0
        )
        tensors = [p for _, p in self._chosen] or (
            list(self.model.parameters()) if self.model else []
        )
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self._probe_plans = [self._plan_probe(name, probe) for name, probe in self.probes.items()]
        # the in-flight budget is shared by the vector series in proportion to their rows
        width = self.sketch if self.sketch is not None else self._size
        rows = [width] * ((1 + bool(self.grads)) if self._chosen else 0)
        rows += [plan.samples * plan.features for plan in self._probe_plans]
        self._budget_rows = max(1, sum(rows))

    def _plan_probe(self, name, probe) -> _ProbePlan:
        fn = probe.fn or _default_probe_fn
        try:
            example = fn(self.model, probe.inputs)
        except Exception as exc:  # inputs the model does not take, most often
            raise ValueError(
                f"Invalid probe {name!r}: evaluating it raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(example, torch.Tensor) or example.dim() == 0:
            got = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example)
            raise ValueError(
                f"Invalid probe {name!r}: its output is {got}; expected a (samples, features) "
                "or (samples,) tensor."
            )
        if example.is_complex():  # a real row would keep only the real part
            raise ValueError(
                f"Invalid probe {name!r}: its output is {example.dtype}; expected real values "
                "(torch.view_as_real(output) keeps a complex one)."
            )
        samples = int(example.shape[0])
        features = int(example[0].numel()) if samples else 0
        if samples == 0 or features == 0:
            raise ValueError(
                f"Invalid probe {name!r}: its output of shape {tuple(example.shape)} is empty."
            )
        ids = np.arange(samples) if probe.ids is None else probe.ids
        coords = {"sample": ("sample", _probe_coord(name, ids, "ids", samples))}
        if np.unique(coords["sample"][1]).size != samples:  # ids select samples: one each
            raise ValueError(f"Invalid ids of probe {name!r}: expected distinct ids per sample.")
        if probe.labels is not None:
            coords["label"] = ("sample", _probe_coord(name, probe.labels, "labels", samples))
        path = layout.series_path(layout.PROBES, name)
        return _ProbePlan(path, fn, probe.inputs, samples, features, coords)

    def _open_series(self):
        self._vectors, self._fillers, self._scalars, self._resume_after = {}, {}, {}, {}
        self._workers = {}
        self._last_snapshot = None
        self._fill_stream = None  # the CUDA stream of the last snapshot's fills
        self._warned_grads = False
        if self._chosen:
            width = self.sketch or self._size
            attrs = {"kind": self._kind, "tensors": self._table}
            if self.sketch is not None:
                self._sketcher = make_sketch(
                    self.sketch_method, self.sketch, self._size, self.seed, self.device
                )
                attrs["sketch"] = {
                    "method": self.sketch_method,
                    "dim": int(self.sketch),
                    "seed": int(self.seed),
                    "hash": self._sketcher.hash,
                }
                attrs["source_size"] = int(self._size)
            vectors = {layout.PARAMS: self._params, layout.GRADS: self._grads}
            beside = a_core_is_free()
            for path in [layout.PARAMS, layout.GRADS] if self.grads else [layout.PARAMS]:
                worker = None
                if self.sketch is not None and self.device.type == "cpu":  # one input each
                    worker = self._workers[path] = ProjectionWorker(
                        self._size,
                        torch.promote_types(self.dtype, torch.float32),  # round after projecting
                        self._sketcher.project,
                        beside=beside,
                        drop=self.on_full == "drop",
                    )
                # a CPU row is a new row of a host buffer each time; elsewhere, one staging row
                flatten = flatten_into if self.device.type == "cpu" else Flattener()
                project = None
                if self.sketch is not None:
                    project = self._sketcher.project
                    if self.device.type == "cuda" and self._sketcher.graphable(self.dtype):
                        # one graph per series' tensors
                        project = GraphedFill(project, self._sketcher.capturable)
                fill = functools.partial(
                    self._fill,
                    tensors=vectors[path],
                    worker=worker,
                    flatten=flatten,
                    project=project,
                )
                self._add_vector(path, (width,), ("param",), attrs, fill, worker=worker)
        for plan in self._probe_plans:
            self._add_probe(plan)

    def _add_vector(self, path, row_shape, row_dims, attrs, fill, coords=None, worker=None):
        size = int(torch.Size(row_shape).numel())
        row_bytes = size * self.dtype.itemsize
        budget = self.max_inflight_bytes * size // self._budget_rows  # this series' share
        chunk_steps = _chunk_steps(row_bytes, budget)
        n_buffers = max(2, min(8, budget // max(1, chunk_steps * row_bytes)))
        spec = SeriesSpec(
            path,
            tuple(row_shape),
            dtype=str(self.dtype).removeprefix("torch."),
            attrs={**attrs, "chunk_steps": chunk_steps},
            chunk_steps=chunk_steps,
            row_dims=row_dims,
            coords=coords or {},
            compressor=self.compressor,
        )
        series = self._writer.add_series(spec)
        self._resume_after[path] = series.last_step
        stream = VectorStream(
            path,
            size,
            series.chunk_steps,
            n_buffers,
            self.device,
            self.dtype,
            self._thread,
            self.on_full,
            worker=worker,
            written=series.written,
            pager=self._pager,
        )
        self._vectors[path], self._fillers[path] = stream, fill

    def _add_probe(self, plan: _ProbePlan):
        fn, inputs, samples, features = plan.fn, plan.inputs, plan.samples, plan.features

        def fill(row):
            output = fn(self.model, inputs).detach()
            row.view(samples, features).copy_(output.reshape(samples, features))

        self._add_vector(
            plan.path,
            (samples, features),
            ("sample", "feature"),
            {"kind": "probe"},
            fill,
            plan.coords,
        )

    def _new_scalar(self, name):
        path = layout.series_path(layout.SCALARS, name)
        spec = SeriesSpec(path, (), dtype="float32", attrs={"kind": "scalar"}, chunk_steps=1024)
        self._resume_after[path] = self._writer.add_series(spec).last_step
        return ScalarLog(path, SCALAR_BATCH, self.device, self._thread)

    def _streams(self):
        return [*self._vectors.values(), *self._scalars.values()]

    def _check_layout(self, step):
        """Follow replaced parameter objects; refuse a change of shape or of the set of names.

        Walking ``named_parameters`` costs over a microsecond a module at every snapshot, so
        it runs only when a module's children or parameters changed (by name or identity)
        since the last walk, or a recorded parameter's shape did. Comparing those is the
        same answer at half the cost.
        """
        walked = self._walked
        if walked:
            modules = [ref() for ref in walked[0]]
            if (
                None not in modules
                and _structure(modules) == walked[1]
                and [p.shape for _, p in self._chosen] == self._shapes
            ):
                return
            self._walked = None  # walk again at the next snapshot if this one raises
        current = dict(self.model.named_parameters())
        chosen = []
        for (name, _), shape in zip(self._chosen, self._shapes, strict=True):
            now = current.get(name)
            if now is None or tuple(now.shape) != shape:
                got = "removed" if now is None else f"shape {tuple(now.shape)}"
                raise ShapeChangedError(
                    f"Parameter {name!r} changed from shape {shape} to {got} at step {step}; "
                    "a run records one parameter layout. Start a new run."
                )
            chosen.append((name, now))
        if self.params is True and len(current) > len(chosen):
            recorded = {name for name, _ in chosen}
            added = [name for name in current if name not in recorded]
            raise ShapeChangedError(
                f"Parameters {', '.join(map(repr, added))} were added at step {step}; a run "
                "records one parameter layout. Start a new run, or name the parameters to "
                "record with params=[...]."
            )
        self._chosen = chosen
        if walked is not False:
            self._walked = _walk(self.model)

    def _params(self):
        return [p for _, p in self._chosen]

    def _grads(self):
        return [_dense_grad(p) for _, p in self._chosen]

    def _flush_stale(self):
        """Hand off the buffers whose oldest row waited ``flush_every_s``; checked when the
        first of them is due, so a step costs one clock read."""
        now = time.monotonic()
        if now < self._flush_due or self._writer is None or self._disabled:
            return
        due = now + self.flush_every_s  # a row captured from now on is due later than this
        for stream in self._streams():
            stream.flush_if_older(now - self.flush_every_s)
            if stream.steps:
                due = min(due, stream.since + self.flush_every_s)
        self._flush_due = due

    def _check_grads(self, step):
        """Warn once when no selected parameter has a gradient at a snapshot after the start:
        the loop cleared them before ``rec.step`` and every recorded gradient is zero."""
        if self._warned_grads or step <= self._start_step:
            return
        if all(p.grad is None for _, p in self._chosen):
            self._warned_grads = True
            warnings.warn(
                f"Run {self.run_id!r}: no recorded parameter has a gradient at step {step}, so "
                "grads stores zeros. Call rec.step before optimizer.zero_grad(), or use "
                "rec.attach(optimizer).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _check_zero_grads(self, writer):
        """Warn when gradients recorded after the start are all zeros: the loop zeroed them
        in place (``zero_grad(set_to_none=False)``) before ``rec.step``."""
        grads = writer.series.get(layout.GRADS)
        zero = [s for s in grads.zero_steps if s > self._start_step] if grads else []
        if zero and not self._warned_grads:
            warnings.warn(
                f"Run {self.run_id!r}: the gradients recorded at steps {zero} are all zeros. "
                "Call rec.step before optimizer.zero_grad(), or use rec.attach(optimizer).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _fill(self, row, tensors, worker, flatten, project):
        """Write the snapshot into ``row``; False where a CPU sketch's worker dropped it."""
        if worker is not None:
            return worker.submit(tensors(), row)
        if project is not None:
            project(tensors(), row)
        else:
            flatten(row, tensors())
