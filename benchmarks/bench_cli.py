"""9. CLI responsiveness, as whole processes: ``koopkit --help`` and ``koopkit info`` on a small
store, beside the bare interpreter start; ``import koopkit`` must pull in neither torch nor
dask, and ``koopkit info`` on a local store reads JSON documents only (no zarr, no numpy).
Target: each command < 0.5 s.

The console script next to this Python is used when there is one (not a pyenv or conda
shim, which adds its own start-up); otherwise ``python -c "from koopkit.cli import main; main()"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import CaseFailed, Result, median, run_case

NAME = "cli"
HEAVY = ("torch", "dask", "zarr", "xarray", "scipy", "matplotlib")
INFO_HEAVY = ("zarr", "numpy", "torch", "dask", "xarray")


def make_store(path: str) -> dict:
    """Two runs of 1 000 parameters x 20 steps and a loss, written with RunWriter."""
    import numpy as np

    from koopkit.store.writer import RunWriter, SeriesSpec

    for seed in range(2):
        writer = RunWriter(path, f"mlp/seed{seed}", {"tags": {"seed": seed}})
        writer.add_series(SeriesSpec("params", (1000,), chunk_steps=8, row_dims=("param",)))
        writer.add_series(SeriesSpec("scalars/loss", (), chunk_steps=8))
        rows = np.random.default_rng(seed).standard_normal((20, 1000)).cumsum(axis=0)
        writer.append("params", np.arange(20), rows)
        writer.append("scalars/loss", np.arange(20), np.linspace(1, 0, 20))
        writer.close()
    return {}


def koopkit_command() -> list[str]:
    script = Path(sys.executable).parent / "koopkit"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from koopkit.cli import main; main()"]


def time_process(argv: list[str], repeat: int) -> list[float]:
    """Wall seconds of each run of the whole process, start-up to exit."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode:
            raise CaseFailed(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-300:]}")
    return times


def imported_by_koopkit() -> list[str]:
    code = (
        f"import json, sys, koopkit; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def imported_by_info(store: str) -> list[str]:
    code = (
        "import json, sys\n"
        "from koopkit.cli import main\n"
        "sys.argv = ['koopkit', 'info', sys.argv[1]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {INFO_HEAVY!r} if m in sys.modules]), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code, store], capture_output=True, text=True)
    if proc.returncode:
        raise CaseFailed(f"koopkit info exited {proc.returncode}: {proc.stderr[-300:]}")
    return json.loads(proc.stderr.strip().splitlines()[-1])


def run(size: str, repeat: int) -> list[Result]:
    repeat = 2 if size == "tiny" else max(5, 3 * repeat)
    folder = tempfile.mkdtemp(prefix="koopkit-bench-", dir=common.WORKDIR)
    store = os.path.join(folder, "store.zarr")
    cli = koopkit_command()
    cases = {
        "python -c pass (interpreter floor)": ([sys.executable, "-c", "pass"], None),
        "python -c 'import koopkit'": ([sys.executable, "-c", "import koopkit"], None),
        "koopkit --help": ([*cli, "--help"], 0.5),
        "koopkit info STORE (2 runs)": ([*cli, "info", store], 0.5),
        "koopkit info --json STORE (2 runs)": ([*cli, "info", "--json", store], 0.5),
    }
    results = []
    try:
        run_case("bench_cli", "make_store", path=store)
        for name, (argv, limit) in cases.items():
            try:
                times = time_process(argv, repeat)
            except CaseFailed as exc:
                results.append(Result(NAME, name, note=f"failed: {exc}"))
                continue
            row = Result(NAME, name, median(times), times)
            if limit is not None:
                row.target, row.met = f"< {limit} s", row.median_s < limit
            results.append(row)
        heavy = imported_by_info(store)
        results.append(
            Result(
                NAME,
                "modules 'koopkit info STORE' loads",
                note=", ".join(heavy) or "none of " + ", ".join(INFO_HEAVY),
                target="no zarr, no numpy",
                met=not heavy,
            )
        )
    except CaseFailed as exc:
        results.append(Result(NAME, "make store", note=f"failed: {exc}"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    heavy = imported_by_koopkit()
    results.append(
        Result(
            NAME,
            "modules 'import koopkit' loads",
            note=", ".join(heavy) or "none of " + ", ".join(HEAVY),
            target="neither torch nor dask",
            met="torch" not in heavy and "dask" not in heavy,
        )
    )
    return results
