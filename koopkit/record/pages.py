"""Faulting in fresh host buffers on a helper thread, not the training thread.

A host chunk buffer is allocated untouched, so the first copy into each of its rows takes a
page fault per 4 KiB, on the training thread: for the MLP of ``benchmarks/profile_recorder.py``
recorded every 10 steps, that was most of the host time ``rec.step`` took (README). Linux
5.14 and later fault a range in for writing without writing to it (``MADV_POPULATE_WRITE``),
so a helper thread can do it while the training thread copies into the same buffer: no value
is touched. Elsewhere (another system, an older kernel) this does nothing, and the faults
stay where they were. Pinned buffers (CUDA) are resident already and never come here.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_MADV_POPULATE_WRITE = 23  # <linux/mman.h>


def _find_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _find_madvise()


_SLICE = 8 * 2**20  # bytes per call: each holds the process's memory-map lock while it runs


def populate(buffer: torch.Tensor, stop=None) -> bool:
    """Fault in the pages of the contiguous host ``buffer`` for writing, leaving its values
    as they are, a slice at a time until ``stop`` (an Event) is set. False where the system
    cannot (then nothing happened) or when stopped."""
    if _madvise is None or buffer.device.type != "cpu" or not buffer.is_contiguous():
        return False
    start = buffer.data_ptr()
    first = start - start % mmap.PAGESIZE  # madvise takes whole pages from an aligned start
    end = start + buffer.nbytes
    for low in range(first, end, _SLICE):
        if stop is not None and stop.is_set():
            return False
        if _madvise(low, min(_SLICE, end - low), _MADV_POPULATE_WRITE) != 0:
            return False
    return end > start


class Pager:
    """One helper thread that populates buffers in the order given, best effort; ``close``
    stops the one it is on (within a slice) and drops the rest, so closing a recorder frees
    them."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="koopkit-pages")
        self.stop = threading.Event()

    def populate(self, buffer: torch.Tensor) -> None:
        if _madvise is not None:
            try:
                self.pool.submit(populate, buffer, self.stop)
            except RuntimeError:  # shut down (the interpreter exiting): faults stay in place
                pass

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(cancel_futures=True)
