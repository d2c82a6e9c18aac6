"""What the store writer costs a training thread that needs the GIL all the time.

A training loop bound by kernel launches (a CUDA transformer) spends its time in Python and
torch's dispatcher, holding the GIL; the Recorder's writer thread runs beside it. Here a loop
of tiny in-place torch ops stands in for it, and a writer thread appends one row of
``params`` float32 values every ``period`` seconds through ``RunWriter``, as the Recorder
does every 10 steps of the 85 M-parameter transformer. Two write paths are compared: the
chunk files written directly (the default for a local store) and zarr's own write path; an
idle writer thread, which wakes as often but writes nothing, shows the noise of the measure.
Each repetition times the loop for ``window`` seconds with the writer paused and then
running, alternating which goes first; the slowdown is the median over repetitions of
``paused rate / running rate - 1``. A writer alone (chunk files, no loop beside it) gives
the seconds a row takes on this machine's file system and memory, without contention.
No target: this explains the CUDA recorder's overhead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import common
from common import CaseFailed, Result, median, run_case

NAME = "writer-contention"
SIZES = {
    "tiny": {"params": 100_000, "period": 0.05, "window": 0.2, "pairs": 2},
    "small": {"params": 20_000_000, "period": 0.25, "window": 1.0, "pairs": 8},
    "full": {"params": 85_000_000, "period": 0.25, "window": 1.0, "pairs": 12},
}
# idle: the thread wakes but writes nothing; alone: chunk files with no loop beside them
PATHS = ("chunk files", "zarr", "idle", "alone")


def _spin_rate(seconds: float) -> float:
    """Tiny in-place torch ops per second: a thread that wants the GIL all the time."""
    import torch

    x = torch.zeros(16)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            x.add_(1.0)
        count += 200
    return count / (time.perf_counter() - start)


def case(path: str, params: int, period: float, window: float, pairs: int, workdir) -> dict:
    import numpy as np
    import torch

    from koopkit.store.chunk_files import ChunkFiles
    from koopkit.store.writer import RunWriter, SeriesSpec

    torch.set_num_threads(1)
    opened = ChunkFiles.open
    if path == "zarr":
        ChunkFiles.open = classmethod(lambda cls, directory: None)
    folder = tempfile.mkdtemp(prefix="koopkit-contention-", dir=workdir)
    row = np.random.default_rng(0).standard_normal((1, params), dtype=np.float32)
    writing, stop, row_seconds, errors = threading.Event(), threading.Event(), [], []

    def write_rows():
        try:
            run = RunWriter(os.path.join(folder, "s.zarr"), "r")
            run.add_series(SeriesSpec("params", (params,), chunk_steps=1, row_dims=("param",)))
            step = 0
            while not stop.is_set():
                writing.wait()
                started = time.perf_counter()
                if path != "idle":  # "alone" writes chunk files
                    run.append("params", [step], row)
                row_seconds.append(time.perf_counter() - started)
                step += 1
                time.sleep(max(0.0, period - (time.perf_counter() - started)))
            run.close()
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write_rows, daemon=True)
    writer.start()
    ratios = []
    try:
        for i in range(pairs):
            if path == "alone":
                writing.set()
                time.sleep(2 * window)
                continue
            rates = {}
            for running in (i % 2 == 0, i % 2 == 1):
                (writing.set if running else writing.clear)()
                time.sleep(min(period, 0.2))  # let a row in progress finish, or one start
                rates[running] = _spin_rate(window)
            ratios.append(rates[False] / rates[True])
    finally:
        stop.set()
        writing.set()
        writer.join()
        ChunkFiles.open = opened
        shutil.rmtree(folder, ignore_errors=True)
    if errors:
        raise errors[0]
    return {"ratios": ratios, "row_seconds": row_seconds}


def run(size: str, repeat: int) -> list[Result]:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return [common.skipped(NAME, "all", "torch is not installed")]
    params = SIZES[size]
    megabytes = params["params"] * 4 / 1e6
    results = []
    for path in PATHS:
        beside = "with nothing beside it" if path == "alone" else "beside a GIL-bound loop"
        label = f"{path}: a {megabytes:.3g} MB row every {params['period']} s {beside}"
        try:
            out = run_case(
                "bench_writer_contention", "case", path=path, workdir=common.WORKDIR, **params
            )
        except CaseFailed as exc:
            results.append(Result(NAME, label, note=f"failed: {exc}"))
            continue
        row = Result(
            NAME,
            label,
            median(out["row_seconds"]),
            out["row_seconds"],
            note=f"median_s: writer seconds per row ({len(out['row_seconds'])} rows)",
        )
        if out["ratios"]:
            row.ratio = median([100 * (r - 1) for r in out["ratios"]])
            row.vs = "{ratio:+.1f}% slower loop"
        results.append(row)
    return results
