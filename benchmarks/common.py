"""Shared benchmark helpers: machine description, timing, peak memory, results, child processes.

Each case runs in a fresh Python process (``run_case``) so that cases do not pollute each
other's memory: inside it, ``measure`` resets the kernel's RSS high-water mark before every
repetition (``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS`` at the start, which counts
BLAS, torch and zarr allocations that tracemalloc misses.

Run as a script, this module is the child: ``python common.py MODULE FUNCTION JSON_KWARGS``
imports a benchmark module from this folder, calls the function and prints its JSON result.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SIZES = ("tiny", "small", "full")
REPEATS = {"tiny": 1, "small": 3, "full": 5}
_MARK = "@@koopkit-bench-result "


@dataclass
class Result:
    """One row of the table.

    ``ratio`` is a number whose meaning ``vs`` states: a speed-up over a peer ("12.3x
    faster than PyDMD"), an overhead over a baseline ("+4.1% over bare"), an error.
    ``met`` is None when the row has no target (peers, references) or was skipped.
    """

    benchmark: str
    case: str
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    ratio: float | None = None
    vs: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def skipped(benchmark: str, case: str, why: str, target: str = "") -> Result:
    return Result(benchmark, case, target=target, note=f"skipped: {why}")


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# -- memory ----------------------------------------------------------------------------------


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """Resident set size now, MiB (Linux; None elsewhere)."""
    return _status_mib("VmRSS")


def hwm_mib() -> float | None:
    """Resident set size high-water mark since start or the last ``reset_hwm``, MiB."""
    return _status_mib("VmHWM")


def reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.extra_mib``: RSS high-water mark minus start."""

    def __enter__(self):
        gc.collect()
        self.reset = reset_hwm()
        self.start = rss_mib()
        return self

    def __exit__(self, *exc):
        hwm = hwm_mib()
        self.peak_mib = hwm
        ok = self.reset and hwm is not None and self.start is not None
        self.extra_mib = max(0.0, hwm - self.start) if ok else None
        return False


def measure(fn, repeat: int, warmup: int = 0, budget: float | None = None):
    """Call ``fn()`` ``warmup + repeat`` times; return (times, largest peak extra MiB, last value).

    With a ``budget`` (seconds), stop repeating once the timed calls have taken that long:
    a peer that takes minutes per call is timed fewer times.
    """
    for _ in range(warmup):
        fn()
    times, peaks, value = [], [], None
    for _ in range(repeat):
        if budget is not None and sum(times) > budget:
            break
        value = None
        with PeakMemory() as peak:
            start = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - start)
        peaks.append(peak.extra_mib)
    peaks = [p for p in peaks if p is not None]
    return times, (max(peaks) if peaks else None), value


# -- child processes -------------------------------------------------------------------------


class CaseFailed(RuntimeError):
    pass


INLINE = False
WORKDIR = None  # where the out-of-core store is written (run_all --workdir)
"""Run cases in this process (``run_all --size tiny``): no isolation, but no import per case."""


def run_case(module: str, function: str, timeout: float = 3600, **kwargs) -> dict:
    """Run ``module.function(**kwargs)`` in a fresh Python process; return its JSON result."""
    if INLINE:
        try:
            return json.loads(
                json.dumps(getattr(importlib.import_module(module), function)(**kwargs))
            )
        except Exception as exc:
            raise CaseFailed(f"{module}.{function}: {type(exc).__name__}: {exc}") from exc
    command = [sys.executable, str(Path(__file__).resolve()), module, function, json.dumps(kwargs)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    raise CaseFailed(f"{module}.{function} exited {proc.returncode}: " + " | ".join(tail))


def complex_to_json(values) -> list[list[float]]:
    return [[float(v.real), float(v.imag)] for v in values]


def complex_from_json(pairs):
    import numpy as np

    return np.array([complex(re, im) for re, im in pairs])


def max_eig_error(a, b) -> float:
    """Largest distance between two eigenvalue sets, matched one to one (Hungarian)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    a, b = np.asarray(a), np.asarray(b)
    if a.size != b.size:
        return float("inf")
    cost = np.abs(a[:, None] - b[None, :])
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


def random_walk(steps: int, features: int, dtype="float64", seed: int = 0, move: float = 0.01):
    """(steps, features): each feature starts at N(0,1), drifts by ``move / 10`` N(0,1) and
    moves by ``move`` N(0,1) a step.

    With the default ``move``, the data of koopman_anchors.md section 4. Generated step by
    step so that the only large allocation is the result.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((steps, features), dtype=dtype)
    row = rng.standard_normal(features)
    drift = move / 10 * rng.standard_normal(features)
    for t in range(steps):
        out[t] = row
        row += drift + move * rng.standard_normal(features)
    return out


@cache
def cuda_available() -> bool:
    """Whether torch sees a CUDA device, asked in a child so this process stays torch-free."""
    if importlib.util.find_spec("torch") is None:
        return False
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        return False
    code = "import torch; print(torch.cuda.is_available())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() == "True"


# -- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


def _gpu() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    proc = subprocess.run(query, capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU, cores, RAM, GPU, load, library versions and the date: the context of every number."""
    packages = ["koopkit", "numpy", "scipy", "torch", "zarr", "dask", "pydmd", "deeptime"]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": _ram_gib(),
        "gpu": _gpu(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {name: _version(name) for name in packages},
    }


def available_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- output ----------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def describe(machine: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    load = machine["load_average"]
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
        f"GPU: {machine['gpu'] or 'none'}; Python {machine['python']}; {versions}; "
        f"threads {machine.get('threads') or 'default'}; "
        f"load average {load[0]:.2f} at start; {machine['date']}"
        if load
        else f"Machine: {machine}"
    )


def markdown_table(results: list[Result]) -> str:
    head = "| benchmark | case | median s | peak extra MiB | vs peer | target | met? |"
    lines = [head, "|---|---|---:|---:|---|---|---|"]
    for r in results:
        vs = r.vs.format(ratio=r.ratio) if r.ratio is not None else r.vs
        if r.note:
            vs = f"{vs}; {r.note}" if vs else r.note
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        cells = [r.benchmark, r.case, _fmt(r.median_s), _fmt(r.peak_mib), vs, r.target, met]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def to_json(results: list[Result], machine: dict, argv: list[str]) -> dict:
    return {"machine": machine, "command": argv, "results": [asdict(r) for r in results]}


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH_DIR))
    _module, _function, _kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    _result = getattr(importlib.import_module(_module), _function)(**_kwargs)
    print(_MARK + json.dumps(_result), flush=True)
