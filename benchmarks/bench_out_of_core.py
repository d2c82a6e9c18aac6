"""3. Out-of-core DMD: a store of ``features x steps`` float32 recorded by ``koopkit.Recorder``,
estimated by ``dmd`` (rank 20) straight from the store, against reading the store once.

The store is written first (its time is reported too), then read once (``numpy.sum`` over
every chunk in the stored dtype, one column band of whole chunks at a time) and estimated,
each in a fresh process. Both run on a warm page cache. Targets (full size, 5 000 000 x 1 000 = 20 GB):
peak RSS < 2 GB, wall time <= 2x the read. The full size is skipped when the disk lacks room.

Two diagnostic rows: the estimate with float64 blocks as wide as a band of chunks, and the
float64 Gram product alone (one block's SYRK, scaled to all features; no I/O), the floor of a
pass: with ``--threads 1`` it alone can exceed twice the read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import common
from common import CaseFailed, Result, measure, median, run_case, skipped

NAME = "out-of-core"
SIZES = {"tiny": (20_000, 50), "small": (500_000, 1000), "full": (5_000_000, 1000)}
RUN = "walk"
RANK = 20
BUDGET = 300  # seconds of timed calls after which a case stops repeating


def write_store(path: str, features: int, steps: int) -> dict:
    """Record a random walk of ``steps`` snapshots (initial one included) with the Recorder."""
    import torch

    import koopkit

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.randn(features))
    drift = 0.001 * torch.randn(features)
    start = time.perf_counter()
    with torch.no_grad(), koopkit.Recorder(path, RUN, model, every=1) as rec:
        for _ in range(steps - 1):
            model.weight.add_(drift).add_(torch.randn(features), alpha=0.01)
            rec.step()
    return {"seconds": time.perf_counter() - start, "bytes": _disk_bytes(path)}


def read_once(path: str, repeat: int) -> dict:
    """The issue's measure of reading the store once: ``numpy.sum`` over every chunk, one band
    of whole chunks at a time, summed in the stored dtype (a float64 sum would add a cast of
    every value to the read, and make the estimate look closer to it)."""
    import numpy as np

    from koopkit.store.reader import open_store

    view = open_store(path).trajectory(RUN, "params")
    width = view.chunks[1]

    def read():
        return sum(
            float(np.sum(view[:, start : start + width]))
            for start in range(0, view.shape[1], width)
        )

    read, peaks = _with_peak_rss(read)
    times, peak, _ = measure(read, repeat, budget=BUDGET)
    return {"times": times, "peak_mib": peak, "peak_rss_mib": _largest(peaks)}


def _with_peak_rss(fn):
    """``fn`` noting the RSS high-water mark after each call, and the list of those marks.

    ``measure`` resets the mark before every repetition, so the mark read after it is only
    the last repetition's; the process's peak is the largest of these.
    """
    peaks = []

    def call():
        value = fn()
        peaks.append(common.hwm_mib())
        return value

    return call, peaks


def _largest(values):
    return max((v for v in values if v is not None), default=None)


def estimate(path: str, repeat: int, block_bytes: int | None = None) -> dict:
    import koopkit
    from koopkit.store.reader import open_store

    view = open_store(path).trajectory(RUN, "params")
    params = {"rank": RANK} if block_bytes is None else {"rank": RANK, "block_bytes": block_bytes}
    koopkit.estimate(view[:, :1000], "dmd", rank=5)  # warm-up: plugin and library imports
    fit, peaks = _with_peak_rss(lambda: koopkit.estimate(view, "dmd", **params))
    times, peak, spectrum = measure(fit, repeat, budget=BUDGET)
    return {
        "times": times,
        "peak_mib": peak,
        "peak_rss_mib": _largest(peaks),  # absolute: imports and data held before count
        "method": spectrum.meta["method"],
        "chunks": list(view.chunks),
    }


def gram_floor(features: int, steps: int, width: int = 8192) -> dict:
    """The float64 Gram product alone, no I/O: SYRK of one ``steps x width`` block, scaled.

    What a pass costs at the machine's DGEMM speed; the read and the float32 upcast come on
    top of it, or beside it in the read-ahead thread.
    """
    import numpy as np

    block = np.random.default_rng(0).standard_normal((steps, min(width, features)))
    product = np.empty((steps, steps))
    times, _, _ = measure(lambda: np.matmul(block, block.T, out=product), 3, warmup=1)
    return {"seconds": median(times) * features / block.shape[1]}


def _in_ram(path: str) -> bool:
    """Whether ``path`` is on a tmpfs or ramfs mount (Linux)."""
    path, mount, kind = os.path.realpath(path), "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, where, fstype = line.split()[:3]
                inside = os.path.commonpath([path, where]) == where
                if inside and len(where) > len(mount):
                    mount, kind = where, fstype
    except (OSError, ValueError):
        return False
    return kind in ("tmpfs", "ramfs")


def _disk_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def run(size: str, repeat: int) -> list[Result]:
    features, steps = SIZES[size]
    label = f"{features} x {steps} float32"
    workdir = common.WORKDIR or tempfile.gettempdir()
    need = features * steps * 4 + 2**30
    free = shutil.disk_usage(workdir).free
    if _in_ram(workdir):  # tmpfs: the store would take the memory the estimate is measured in
        free = min(free, (common.available_ram_bytes() or 0) // 2)
    if free < need:
        why = f"needs {need / 2**30:.1f} GiB free in {workdir}, has {free / 2**30:.1f} GiB"
        return [skipped(NAME, f"dmd from store, {label}", why)]
    folder = tempfile.mkdtemp(prefix="koopkit-bench-", dir=workdir)
    path = os.path.join(folder, "store.zarr")
    try:
        return _run(path, features, steps, label, repeat)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(path, features, steps, label, repeat) -> list[Result]:
    try:
        written = run_case(
            "bench_out_of_core", "write_store", path=path, features=features, steps=steps
        )
        read = run_case("bench_out_of_core", "read_once", path=path, repeat=repeat)
        dmd = run_case("bench_out_of_core", "estimate", path=path, repeat=repeat)
        band = dmd["chunks"][1] * steps * 8  # one full-height band of whole chunks, as float64
        banded = run_case(
            "bench_out_of_core", "estimate", path=path, repeat=repeat, block_bytes=band
        )
        floor = run_case("bench_out_of_core", "gram_floor", features=features, steps=steps)
    except CaseFailed as exc:
        return [Result(NAME, f"dmd from store, {label}", note=f"failed: {exc}")]
    gib = written["bytes"] / 2**30
    rows = [
        Result(
            NAME,
            f"write store (Recorder, every step), {label}",
            written["seconds"],
            [written["seconds"]],
            note=f"{gib:.2f} GiB on disk, {gib / written['seconds']:.2f} GiB/s",
        ),
        Result(
            NAME,
            f"read once (numpy sum over chunks), {label}",
            median(read["times"]),
            read["times"],
            read["peak_mib"],
            note=f"peak RSS {read['peak_rss_mib']:.0f} MiB",
        ),
    ]
    row = Result(
        NAME, f"dmd from store, {label}", median(dmd["times"]), dmd["times"], dmd["peak_mib"]
    )
    row.ratio = row.median_s / rows[1].median_s
    row.vs = "{ratio:.2f}x the read"
    row.note = (
        f"peak RSS {dmd['peak_rss_mib']:.0f} MiB; method {dmd['method']}; chunks {dmd['chunks']}"
    )
    row.target = "peak RSS < 2 GB, <= 2x the read"
    row.met = dmd["peak_rss_mib"] < 2000 * 1e6 / 2**20 and row.ratio <= 2
    rows.append(row)
    row = Result(
        NAME,
        f"dmd, block_bytes = one band of chunks ({band / 2**20:.0f} MiB; diagnostic), {label}",
        median(banded["times"]),
        banded["times"],
        banded["peak_mib"],
        ratio=median(banded["times"]) / rows[1].median_s,
        vs="{ratio:.2f}x the read",
        note=f"peak RSS {banded['peak_rss_mib']:.0f} MiB",
    )
    rows.append(row)
    rows.append(
        Result(
            NAME,
            f"float64 Gram product alone (SYRK of one block, scaled; diagnostic), {label}",
            floor["seconds"],
            ratio=floor["seconds"] / rows[1].median_s,
            vs="{ratio:.2f}x the read",
            note="no I/O: the floor of a pass at this machine's DGEMM speed and thread count",
        )
    )
    return rows
