"""Fresh host buffers are faulted in on a helper thread, values untouched, and freed at close."""

from __future__ import annotations

import gc
import mmap
import platform
import re
import resource
import sys
import threading
import time
import weakref

import pytest
import torch

import koopkit
from koopkit.record import pages
from koopkit.record.transfer import VectorStream

SIZE = 16 * 2**20  # float32 values: 64 MiB, far more pages than any noise in the count


def fresh(count: int) -> torch.Tensor:
    """float32 values in a new anonymous mapping: never touched, whatever the allocator holds
    (``torch.empty`` may hand back memory an earlier test faulted in)."""
    return torch.frombuffer(mmap.mmap(-1, 4 * count), dtype=torch.float32)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_writing(buffer: torch.Tensor) -> int:
    before = minor_faults()
    buffer.fill_(1.0)
    return minor_faults() - before


def kernel_populates() -> bool:
    """Linux 5.14 or later, where MADV_POPULATE_WRITE exists: there populate must work."""
    version = re.match(r"(\d+)\.(\d+)", platform.release())
    return (
        sys.platform.startswith("linux")
        and version is not None
        and (tuple(map(int, version.groups())) >= (5, 14))
    )


needs_populate = pytest.mark.skipif(not kernel_populates(), reason="needs Linux 5.14 or later")


@needs_populate
def test_a_populated_buffer_takes_its_page_faults_before_the_writes():
    untouched, populated = fresh(SIZE), fresh(SIZE)
    assert pages.populate(populated)
    baseline = faults_writing(untouched)
    assert baseline > SIZE * 4 // 4096 // 2  # the premise: writing fresh pages faults
    assert faults_writing(populated) < baseline // 20


@needs_populate
def test_populate_stops_between_slices_and_refuses_what_it_cannot_fault_in():
    stop = threading.Event()
    stop.set()
    buffer = fresh(SIZE)
    assert not pages.populate(buffer, stop)
    assert faults_writing(buffer) > SIZE * 4 // 4096 // 2  # nothing was faulted in
    assert not pages.populate(fresh(SIZE)[::2])  # not contiguous
    assert not pages.populate(torch.empty(0))


@needs_populate
def test_populating_keeps_every_value_even_beside_a_writer():
    values = torch.arange(SIZE, dtype=torch.float32)
    buffer = fresh(SIZE)
    helper = threading.Thread(target=pages.populate, args=(buffer,))
    helper.start()
    buffer.copy_(values)  # the training thread's copy, racing the helper
    helper.join()
    assert pages.populate(buffer) and pages.populate(buffer[7:])  # unaligned start too
    assert torch.equal(buffer, values)


class Writer:
    """Takes every handed-off buffer and gives it straight back."""

    def __init__(self):
        self.handed = []

    def submit(self, stream, steps, buffer, done, flush=False):
        self.handed.append(steps.tolist())
        stream.release(buffer)


class Pager:
    def __init__(self):
        self.given = []

    def populate(self, buffer):
        self.given.append(buffer)


def test_each_buffer_goes_to_the_pager_once_when_it_is_first_used():
    writer, pager = Writer(), Pager()
    stream = VectorStream("params", 5, 2, 3, "cpu", torch.float32, writer, "block", pager=pager)
    assert len(pager.given) == 1 and pager.given[0] is stream.current
    used = []
    for step in range(13):
        if not any(stream.current is b for b in used):
            used.append(stream.current)
        stream.capture(step, lambda row, step=step: row.fill_(step))
    assert len(used) == 3 and len(pager.given) == 3  # 7 buffers filled, 3 distinct
    assert all(a is b for a, b in zip(pager.given, used, strict=True))
    assert writer.handed == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]


def test_without_a_pager_nothing_is_populated():
    stream = VectorStream("params", 5, 2, 2, "cpu", torch.float32, Writer(), "block")
    for step in range(5):
        stream.capture(step, lambda row: row.zero_())
    assert stream.fresh == set()


def test_close_waits_for_the_pager_and_frees_every_buffer(tmp_path, monkeypatch):
    started = threading.Event()

    def slow_populate(buffer, stop):
        started.set()
        time.sleep(0.3)
        return True

    monkeypatch.setattr(pages, "_madvise", object())  # a pager that would submit
    monkeypatch.setattr(pages, "populate", slow_populate)
    model = torch.nn.Linear(64, 64)
    rec = koopkit.Recorder(str(tmp_path / "s.zarr"), "r", model, every=1).open()
    buffers = [weakref.ref(b) for b in rec._vectors["params"].free.queue]
    buffers.append(weakref.ref(rec._vectors["params"].current))
    assert started.wait(5)
    gc.disable()
    try:
        rec.close()
        assert all(b() is None for b in buffers)
    finally:
        gc.enable()
