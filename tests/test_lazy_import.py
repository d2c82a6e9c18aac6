"""``import koopkit`` is light, and ``koopkit --help`` answers quickly."""

from __future__ import annotations

import json
import time

HEAVY = ("torch", "dask", "zarr", "xarray", "scipy", "matplotlib")

IMPORT_ONLY = f"""
import json, sys
import koopkit
print(json.dumps({{
    "loaded": [m for m in {HEAVY!r} if m in sys.modules],
    "version": koopkit.__version__,
    "names": sorted(koopkit.__all__),
}}))
"""

HELP = f"""
import json, sys
from koopkit.cli import main
sys.argv = ["koopkit", "--help"]
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}),
      file=sys.stderr)
"""


def test_import_koopkit_leaves_heavy_libraries_out(run_python):
    proc = run_python("-c", IMPORT_ONLY)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["loaded"] == []
    assert {"Recorder", "open_store", "open_run", "log_steps"} <= set(out["names"])


def test_probe_is_exported_lazily(run_python):
    code = (
        "import sys, koopkit; print('torch' in sys.modules, 'Probe' in koopkit.__all__); "
        "from koopkit.record.recorder import Probe; print(koopkit.Probe is Probe)"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True"]


def test_public_names_load_on_first_access(run_python):
    code = (
        "import sys, koopkit; f = koopkit.open_store; "
        "print(f.__module__, callable(f), 'torch' in sys.modules)"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["koopkit.store.reader", "True", "False"]  # no torch to read


def test_koopkit_help_runs_quickly(run_python, capsys):
    start = time.perf_counter()
    proc = run_python("-c", HELP)
    wall = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nkoopkit --help: {wall:.2f} s wall (including interpreter start)")
    assert proc.returncode == 0, proc.stderr
    for command in ("info", "validate", "import", "plugins"):
        assert command in proc.stdout
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] == 0
    assert "torch" not in report["loaded"]  # help never needs the recorder
    assert wall < 5.0


INFO = """
import json, sys
from koopkit.cli import main
sys.argv = ["koopkit", "info", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = ("zarr", "numpy", "torch", "dask", "xarray", "fsspec", "scipy", "matplotlib")
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def test_koopkit_info_on_a_local_store_imports_neither_zarr_nor_numpy(run_python, tmp_path):
    """``koopkit info`` reads a local store's JSON documents: no zarr, numpy, torch, dask, xarray."""
    import numpy as np

    from koopkit.store.writer import RunWriter, SeriesSpec

    url = tmp_path / "runs.zarr"
    for run_id in ("mlp/seed0", "mlp/seed1"):
        writer = RunWriter(url, run_id, {"tags": {"seed": run_id[-1]}})
        writer.add_series(SeriesSpec("params", (10,), chunk_steps=4, row_dims=("param",)))
        writer.add_series(SeriesSpec("scalars/loss", (), chunk_steps=4))
        writer.append("params", np.arange(9), np.zeros((9, 10)))
        writer.append("scalars/loss", np.arange(9), np.linspace(1, 0, 9))
        writer.close()
    stdout = {}
    for args in ((), ("--json",)):
        proc = run_python("-c", INFO, str(url), *args)
        report = json.loads(proc.stderr.strip().splitlines()[-1])
        assert report == {"code": 0, "loaded": []}, proc.stderr
        stdout[args] = proc.stdout
    assert "mlp/seed1  [complete]" in stdout[()] and "steps 0..8" in stdout[()]
    assert json.loads(stdout[("--json",)])["runs"][1]["series"]["params"]["last_step"] == 8
