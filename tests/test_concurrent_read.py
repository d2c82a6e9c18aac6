"""Readers while a writer appends: every read sees a consistent prefix, never a torn row.

A writer process appends one row at a time to a run with a shallow chunk depth (a commit every
few rows) until told to stop. Each row is a known function of its step, so a reader can check
every row it sees bit for bit. Meanwhile the test reads the store over and over in-process
(``open_store``, ``trajectory``, ``steps``, ``open_run``) and runs ``koopkit info --json`` and
``koopkit spectrum --no-save --json`` in subprocesses. Every read must show exactly the
committed rows, each equal to its reference, with steps 0, EVERY, 2 EVERY, ... and committed
never past the rows the arrays hold.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import koopkit
from koopkit.store.validate import validate_store

RUN = "live/run"
WIDTH, CHUNK, EVERY = 16, 3, 2
ANGLES = (0.3, 1.1)  # the data is two rotations: DMD eigenvalues exp(+-i angle EVERY)
MAX_ROWS = 20_000  # a safety stop; the test stops the writer long before
LAUNCHER = "import sys; from koopkit.cli import main; sys.argv[0] = 'koopkit'; main()"


def reference_row(step, width):
    """The row recorded at ``step``: two rotations lifted into ``width`` columns, as float32.

    Elementwise numpy only (no BLAS), so the writer process and the test compute the same bits.
    """
    latent = [np.cos(0.3 * step), np.sin(0.3 * step), np.cos(1.1 * step), np.sin(1.1 * step)]
    columns = np.arange(1, width + 1, dtype=np.float64)
    row = np.zeros(width)
    for m, value in enumerate(latent):
        row = row + np.cos(0.37 * (m + 1) * columns + m) * value
    return row.astype(np.float32)


WRITER = (
    "import os, sys, time\n"
    "import numpy as np\n"
    "from koopkit.store.writer import RunWriter, SeriesSpec\n\n"
    + inspect.getsource(reference_row)
    + """
url, run, stop = sys.argv[1], sys.argv[2], sys.argv[3]
width, chunk, every, max_rows = map(int, sys.argv[4:8])
pause = float(sys.argv[8])
writer = RunWriter(url, run, {"tags": {"width": width}}, resume=False)
table = [{"name": "w", "offset": 0, "shape": [width], "dtype": "float32"}]
writer.add_series(
    SeriesSpec("params", (width,), attrs={"kind": "full", "tensors": table},
               chunk_steps=chunk, row_dims=("param",))
)
print("ready", flush=True)
rows = 0
while rows < max_rows and not os.path.exists(stop):
    step = rows * every
    writer.append("params", [step], reference_row(step, width)[None])
    rows += 1
    time.sleep(pause)
writer.close()
print("done", rows, flush=True)
"""
)


@pytest.fixture(scope="module")
def reference():
    return np.stack([reference_row(k * EVERY, WIDTH) for k in range(MAX_ROWS)])


def check_prefix(url, reference, through_xarray=False) -> int:
    """One read of the live store: a consistent committed prefix. Returns the committed count."""
    store = koopkit.open_store(url)
    info = store.run(RUN)
    committed = info.committed("params")
    view = store.trajectory(RUN, "params")
    assert committed <= view.array.shape[0], "committed rows past the rows written"
    data = view[:]
    steps = store.steps(RUN)
    assert data.shape == (committed, WIDTH)
    assert steps.tolist() == list(range(0, committed * EVERY, EVERY))
    assert not np.isnan(data).any(), "a row holds the fill value: torn"
    np.testing.assert_array_equal(data.view(np.uint32), reference[:committed].view(np.uint32))
    if through_xarray:
        tree = koopkit.open_run(url, RUN)
        values = tree["params"]["value"].values
        np.testing.assert_array_equal(values, reference[: len(values)])
        assert tree["params"]["step"].values.tolist() == list(range(0, len(values) * EVERY, EVERY))
    return committed


def koopkit_cli(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOOPKIT_")}
    return subprocess.run(
        [sys.executable, "-P", "-c", LAUNCHER, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def check_info(url, reference):
    """``koopkit info --json`` mid-write: the committed count, shape and steps agree."""
    proc = koopkit_cli("info", url, "--json")
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(proc.stdout)["runs"]
    series = run["series"]["params"]
    committed = series["committed"]
    assert run["run_id"] == RUN and run["committed_steps"] == {"params": committed}
    assert series["shape"] == [committed, WIDTH] and series["dtype"] == "float32"
    assert committed > 0
    assert (series["first_step"], series["last_step"]) == (0, (committed - 1) * EVERY)
    return committed


def check_spectrum(url, reference):
    """``koopkit spectrum --no-save --json`` mid-write: the spectrum of a consistent prefix."""
    proc = koopkit_cli("spectrum", url, "--no-save", "--json", "--rank", "4")
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["spectra"]
    assert result["runs"] == [RUN] and result["rank"] == 4
    found = np.sort_complex(np.array([complex(re, im) for re, im in result["eigenvalues"]]))
    angles = np.array(ANGLES) * EVERY
    expected = np.sort_complex(np.exp(1j * np.concatenate([angles, -angles])))
    # float32 rows: the eigenvalues of any consistent prefix agree to ~1e-5; a torn row would not
    np.testing.assert_allclose(found, expected, atol=1e-3)
    return len(result["eigenvalues"])


def test_readers_see_a_consistent_prefix_while_a_writer_appends(tmp_path, reference):
    url = tmp_path / "live.zarr"
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-c",
            WRITER,
            *map(str, (url, RUN, stop, WIDTH, CHUNK, EVERY, MAX_ROWS, 0.005)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        deadline = time.monotonic() + 120
        while check_prefix(url, reference) < 10 * CHUNK:  # enough rows for a rank-4 spectrum
            assert time.monotonic() < deadline and writer.poll() is None, "the writer stalled"
            time.sleep(0.05)

        # the CLI, in other processes, while this one keeps reading
        counts = []
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            before = check_prefix(url, reference)
            cli = [pool.submit(check_info, url, reference) for _ in range(3)]
            cli += [pool.submit(check_spectrum, url, reference) for _ in range(2)]
            reads = 0
            while not all(job.done() for job in cli):
                counts.append(check_prefix(url, reference, through_xarray=reads % 5 == 0))
                reads += 1
            for job in cli:
                job.result()  # re-raise what a CLI check found
            after = check_prefix(url, reference)
        assert writer.poll() is None, "the writer finished before the readers did"
        assert reads >= 3
        assert counts == sorted(counts), "a later read saw fewer committed rows"
        assert after > before, "nothing was committed while the CLI ran: no concurrency tested"
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    total = int(out.split()[-1])
    assert total < MAX_ROWS, "the writer hit its row limit: raise MAX_ROWS or the pause"
    store = koopkit.open_store(url)
    assert store.run(RUN).status == "complete"
    assert check_prefix(url, reference) == total
    assert validate_store(url) == ([], 1)
