"""Moving snapshots from the device to the store without stalling the training loop.

Each vector series (params, grads, a probe, a sketch) owns a few host chunk buffers of
``chunk_steps`` rows. A snapshot is written into the next row of the current buffer: on CPU
by a plain copy, on CUDA by a device-side flatten followed by an asynchronous copy on a side
stream into pinned memory, with an event recorded. A full buffer goes to the writer thread,
which waits on the event (never the training thread) and writes the whole chunk row.
Unpinned buffers are faulted in by a helper thread the first time each is used
(``pages.Pager``), so the training thread's copies do not take the page faults.
Memory in flight is bounded by the number of buffers; when all are in flight, ``on_full``
decides: "block" waits for the writer (nothing lost), "drop" skips snapshots and counts them.
A buffer whose oldest row has waited ``flush_every_s`` is handed off before it fills, and
committed at once, so a sparse schedule does not keep its rows on the host for hours.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def _host_buffer(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype)
    return buffer.pin_memory() if pin else buffer


@torch.no_grad()
def flatten_into(row: torch.Tensor, tensors) -> None:
    """Copy ``tensors``, flattened and in order, into the flat ``row``.

    One ``torch.cat`` rather than a copy per tensor: a model has hundreds of tensors, and
    each copy is an operator call on the host (and on CUDA a kernel launch). Under
    ``no_grad`` rather than with a ``detach`` per tensor: 0.33 -> 0.23 ms for 200 on a CPU.
    """
    flats = [t.reshape(-1) for t in tensors]
    total = sum(flat.numel() for flat in flats)
    if total != row.numel():  # cat would resize the row rather than fail
        raise ValueError(f"Expected {row.numel()} values to fill a row; got {total}.")
    if flats:
        torch.cat(flats, out=row)


def views_of(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Consecutive views of the 1-d ``flat`` with the given shapes, which must fill it."""
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"Expected {flat.numel()} values to fill a row; got {sum(sizes)}.")
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]


class Flattener:
    """``flatten_into`` for a destination filled again and again (a device staging row, a
    sketch's input): the views of it are made once per destination and layout, so a fill is
    one ``torch._foreach_copy_`` instead of a reshape per tensor and a cat: on the host,
    one call instead of a few hundred for a model's hundreds of tensors.

    ``_foreach_copy_`` copies in one launch on CUDA only sources of one dtype with the
    views' strides; it would copy all of them one launch at a time if any other (a
    channels_last weight, a float32 norm among bfloat16 weights) were among them, so those
    are copied on their own.
    """

    def __init__(self):
        self.out, self.shapes, self.views = None, None, []
        self.together, self.alone = None, []  # indices of the sources; None: all together

    def __call__(self, out: torch.Tensor, tensors) -> None:
        shapes = [t.shape for t in tensors]
        if out is not self.out or shapes != self.shapes:
            self.plan(out, shapes, tensors)
        self.copy(tensors)

    def plan(self, out, shapes, tensors) -> None:
        """Views of ``out`` for ``shapes``, and which sources go together: those of the most
        common dtype with the views' strides (judged here; a later change of dtype or
        strides only costs time)."""
        views = views_of(out, shapes)
        alike = [t.stride() == v.stride() for t, v in zip(tensors, views, strict=True)]
        dtypes = Counter(t.dtype for t, ok in zip(tensors, alike, strict=True) if ok)
        common = dtypes.most_common(1)[0][0] if dtypes else None
        together = [i for i, t in enumerate(tensors) if alike[i] and t.dtype == common]
        self.out, self.shapes, self.views = out, shapes, views
        self.together, self.alone = None, []
        if len(together) < len(tensors):
            self.together = together
            self.alone = sorted(set(range(len(tensors))) - set(together))

    @torch.no_grad()
    def copy(self, tensors) -> None:
        """Fill the planned destination from ``tensors`` of the planned shapes."""
        views, together = self.views, self.together
        if together is None:  # the usual case: every source alike
            if views:
                torch._foreach_copy_(views, tensors)
            return
        if together:
            torch._foreach_copy_([views[i] for i in together], [tensors[i] for i in together])
        for i in self.alone:
            views[i].copy_(tensors[i])


class VectorStream:
    """Snapshots of one flat vector per step, handed to the writer in whole chunk rows."""

    def __init__(
        self,
        path,
        size,
        chunk_steps,
        n_buffers,
        device,
        dtype,
        writer,
        on_full,
        worker=None,
        written=0,
        pager=None,
    ):
        self.path = path
        self.size = int(size)
        self.chunk_steps = int(chunk_steps)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dtype = dtype
        self.writer = writer
        self.on_full = on_full
        self.worker = worker  # a ProjectionWorker that finishes rows after ``fill`` returns
        self.free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            self.free.put(_host_buffer((self.chunk_steps, self.size), dtype, pin=self.cuda))
        # a Pager faults in each unpinned buffer the first time it becomes the current one
        self.pager = None if self.cuda else pager
        self.fresh = set() if self.pager is None else {id(b) for b in self.free.queue}
        self.current = self._take(self.free.get())
        self.steps: list[int] = []
        self.since = 0.0  # when the first row of the current buffer was captured
        self.position = int(written)  # rows of the series handed off (or stored) before
        self.dropped = 0
        self.waited = 0.0  # seconds the training thread waited for a free buffer
        if self.cuda:
            self.side = torch.cuda.Stream(device=self.device)
            self.staging = torch.empty(self.size, dtype=dtype, device=self.device)
            self.staging_free = torch.cuda.Event()
            self.staging_free.record(self.side)
            # recorded again at each snapshot: a wait already queued keeps the record it saw
            self.filled = torch.cuda.Event()
        elif self.device.type != "cpu":
            self.staging = torch.empty(self.size, dtype=dtype, device=self.device)

    def capture(self, step: int, fill) -> None:
        """Record one snapshot; ``fill(row)`` writes the flat vector into a device row."""
        if self.current is None:
            self.current = self._take(self._acquire())
            if self.current is None:
                self.dropped += 1
                return
        row = self.current[len(self.steps)]
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(self.staging_free)  # the previous copy out of staging is done
            fill(self.staging)
            self.filled.record(main)
            self.side.wait_event(self.filled)
            self._copy_on_side(row, main)
        elif self.device.type == "cpu":
            if fill(row) is False:  # a sketch's projection still busy, and on_full="drop"
                self.dropped += 1
                return
        else:  # MPS and other devices: a synchronous copy, correct if not overlapped
            fill(self.staging)
            row.copy_(self.staging)
        self.steps.append(step)
        if len(self.steps) == 1:
            self.since = time.monotonic()
        # hand off where a chunk row of the store ends, even after a partial hand-off
        if len(self.steps) == self.chunk_steps - self.position % self.chunk_steps:
            self.hand_off()

    def _copy_on_side(self, row, main) -> None:
        """Copy the staging row into the host ``row`` on the side stream.

        ``set_stream`` there and back rather than ``torch.cuda.stream``, which queries the
        current streams again: on an H100 machine's host, 1.5 us against 10 us. Only where
        the recorder's device is the current one, as ``set_stream`` also selects the
        stream's device.
        """
        if torch.cuda.current_device() != self.device.index:
            with torch.cuda.stream(self.side):
                row.copy_(self.staging, non_blocking=True)
        else:
            torch.cuda.set_stream(self.side)
            try:
                row.copy_(self.staging, non_blocking=True)
            finally:
                torch.cuda.set_stream(main)
        self.staging_free.record(self.side)

    def flush_if_older(self, cutoff: float) -> None:
        """Hand off a partial buffer whose first row was captured before ``cutoff``."""
        if self.steps and self.since <= cutoff:
            self.hand_off(flush=True)

    def hand_off(self, flush: bool = False) -> None:
        """Send the current (possibly partial) buffer to the writer and take a free one.

        The buffer is detached before it is submitted: an interrupt (Ctrl-C, SIGTERM) that
        lands anywhere in here can lose it, but never submit it twice.
        """
        if self.current is None or not self.steps:
            return
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self.side)
        elif self.worker is not None:
            done = self.worker.barrier()
        buffer, steps = self.current, np.array(self.steps, dtype=np.int64)
        self.current, self.steps = None, []
        self.position += len(steps)
        self.writer.submit(self, steps, buffer, done, flush=flush)
        self.current = self._take(self._acquire())

    def _take(self, buffer):
        """``buffer`` as the current one; the first time, the pager faults it in."""
        if buffer is not None and id(buffer) in self.fresh:
            self.fresh.discard(id(buffer))
            self.pager.populate(buffer)
        return buffer

    def _acquire(self):
        """A free buffer: wait for one (on_full="block", the wait counted), or None when all
        are in flight."""
        try:
            return self.free.get_nowait()
        except queue.Empty:
            if self.on_full != "block":
                return None
        start = time.monotonic()
        buffer = self.free.get()
        self.waited += time.monotonic() - start
        return buffer

    def release(self, buffer) -> None:
        self.free.put(buffer)


def a_core_is_free() -> bool:
    """Whether torch's intra-op threads leave this process a core to project sketches on.

    A step whose parallel regions use every core waits, region after region, for the core a
    thread beside it takes: there, projecting inside the step costs less than beside it.
    torch's default is one thread per physical core, so the second hardware thread of each
    core (SMT) counts as free; CPU quotas (cgroups) are not seen.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


class ProjectionWorker:
    """Computes a series' CPU sketches from one flat input, beside the step or inside it.

    ``submit`` copies the tensors into the input, one copy rather than an operator call per
    tensor in the projection. With ``beside`` (when ``a_core_is_free()``), a helper thread
    then projects into the row, so the training thread only copies, as a CountSketch costs
    a few times a plain copy: ``submit`` waits while the previous projection still reads
    the input, and the writer waits on ``barrier()`` before writing a buffer. Each series
    has its own worker (params and grads: two inputs the size of the parameters), so one
    copy never waits for another series' projection. Without ``beside``, ``submit``
    projects at once; a failure is reported the same way, through the barrier. With
    ``drop``, ``submit`` returns False rather than wait for the previous projection.
    """

    def __init__(
        self, size: int, dtype: torch.dtype, project, beside: bool = True, drop: bool = False
    ):
        self.input = torch.empty(size, dtype=dtype)
        self.flatten = Flattener()
        self.project = project
        self.drop = drop
        self.input_free = threading.Semaphore(1)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="koopkit-sketch") if beside else None
        self.error: BaseException | None = None
        self.waited = 0.0  # seconds the training thread waited for the previous projection

    def submit(self, tensors, row) -> bool:
        """Project ``tensors`` into ``row`` (or queue it); False: dropped, nothing queued."""
        if self.pool is None:
            try:
                self.flatten(self.input, tensors)
                self.project([self.input], row)
            except Exception as exc:  # reported by the barrier, as from the helper thread
                self.error = exc
            return True
        if not self.input_free.acquire(blocking=False):
            if self.drop:
                return False
            start = time.monotonic()
            self.input_free.acquire()
            self.waited += time.monotonic() - start
        try:
            self.flatten(self.input, tensors)
            self.pool.submit(self._project, row)
        except BaseException:  # nothing queued: the input is free again
            self.input_free.release()
            raise
        return True

    def _project(self, row) -> None:
        try:
            self.project([self.input], row)
        except BaseException as exc:  # reported by the barrier the writer waits on
            self.error = exc
        finally:
            self.input_free.release()

    def barrier(self):
        """Something the writer thread can ``synchronize()`` on: every queued row is done,
        and a failed projection raises."""
        return _Done(self, None if self.pool is None else self.pool.submit(lambda: None))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _Done:
    def __init__(self, worker, future):
        self.worker, self.future = worker, future

    def synchronize(self) -> None:
        if self.future is not None:
            self.future.result()
        if self.worker.error is not None:
            raise self.worker.error


class ScalarLog:
    """Scalars (loss, lr, ...) kept on the device and copied to the host in batches."""

    def __init__(self, path, batch, device, writer):
        self.path, self.batch, self.writer = path, int(batch), writer
        self.device = torch.device(device)
        self._new_batch()
        self.steps: list[int] = []
        self.since = 0.0
        self.last_step = None

    def _new_batch(self):
        self.values = torch.empty(self.batch, dtype=torch.float32, device=self.device)
        self.slots = self.values.unbind()  # views made once per batch, not once per step

    def log(self, step: int, value) -> None:
        slot = self.slots[len(self.steps)]
        if isinstance(value, torch.Tensor):
            value = value.detach()
            slot.copy_(value if value.dim() == 0 else value.reshape(()), non_blocking=True)
        else:
            slot.fill_(float(value))
        self.steps.append(step)
        self.last_step = step
        if len(self.steps) == 1:
            self.since = time.monotonic()
        if len(self.steps) == self.batch:
            self.hand_off()

    def flush_if_older(self, cutoff: float) -> None:
        """Hand off a partial batch whose first value was logged before ``cutoff``."""
        if self.steps and self.since <= cutoff:
            self.hand_off(flush=True)

    def hand_off(self, flush: bool = False) -> None:
        """Copy the batch to the host and submit it; detached first, so never submitted twice."""
        if not self.steps:
            return
        values, steps = self.values, np.array(self.steps, dtype=np.int64)
        self._new_batch()
        self.steps = []
        host = values[: len(steps)].to("cpu", non_blocking=self.device.type == "cuda")
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))  # where the copy runs
        self.writer.submit(self, steps, host, done, flush=flush)

    def release(self, buffer) -> None:
        pass


class WriterThread:
    """The one thread that waits on copies and writes rows into the store.

    A failure is kept and reported to the training thread at its next call; buffers are
    still released so a blocked producer never deadlocks.
    """

    def __init__(self, run_writer):
        self.run_writer = run_writer
        self.items: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="koopkit-writer", daemon=True)
        self.thread.start()

    def submit(self, stream, steps, buffer, done, flush: bool = False) -> None:
        """Queue rows for writing; ``flush`` commits them (and every buffered row) at once."""
        self.items.put((stream, steps, buffer, done, flush))

    def _loop(self):
        while True:
            item = self.items.get()
            if item is None:
                return
            stream, steps, buffer, done, flush = item
            try:
                if self.error is None:
                    if done is not None:
                        done.synchronize()
                    rows = buffer[: len(steps)].numpy()
                    self.run_writer.append(stream.path, steps, rows)
                    if flush:
                        self.run_writer.flush()
            except BaseException as exc:  # reported to the training thread
                self.error = exc
            finally:
                stream.release(buffer)

    def stop(self) -> None:
        self.items.put(None)
        self.thread.join()
