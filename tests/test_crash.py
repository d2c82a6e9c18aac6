"""Crash safety and one writer per run, with real processes: SIGKILL, SIGTERM, concurrent writers.

The training in tests/helpers/record_and_die.py is deterministic (fixed seed, one thread), so
every committed row must equal the reference trajectory computed here, and a resumed replay
must finish with exactly the reference, no gap and no duplicate step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import koopkit
from koopkit.errors import RunLockedError
from koopkit.store.validate import validate_store
from koopkit.store.writer import RunWriter

RUN = "mlp/seed1234"


@pytest.fixture(scope="module")
def reference(crash_helper):
    """Parameters at steps 0..STEPS and the loss of each iteration, computed in-process."""
    params, losses = crash_helper.reference_params(crash_helper.STEPS)
    return params, np.asarray(losses, dtype=np.float32)


class Child:
    """A helper process whose stdout lines are read one by one."""

    def __init__(self, helper_path, *args):
        self.proc = subprocess.Popen(
            [sys.executable, helper_path("record_and_die"), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for(self, line, timeout=60):
        deadline = time.monotonic() + timeout
        seen = []
        for text in self.proc.stdout:
            seen.append(text.strip())
            if text.strip() == line:
                return seen
            assert time.monotonic() < deadline, f"no {line!r} in time; saw {seen[-5:]}"
        self.proc.wait(timeout=10)
        raise AssertionError(f"child ended before {line!r}: {seen[-5:]}\n{self.proc.stderr.read()}")

    def finish(self, timeout=60):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def children():
    started = []
    yield started
    for child in started:  # never leave a helper behind, even when a test fails
        child.kill()


def _check_committed(url, reference):
    """Committed rows are contiguous from step 0 and equal the reference; returns the count."""
    params, losses = reference
    store = koopkit.open_store(url)
    steps = store.steps(RUN)
    assert steps.tolist() == list(range(len(steps)))
    np.testing.assert_array_equal(np.asarray(store.array(RUN)), params[: len(steps)])
    loss_steps = store.steps(RUN, "scalars/loss") if "scalars/loss" in store.run(RUN).series else []
    assert list(loss_steps) == list(range(len(loss_steps)))
    if len(loss_steps):
        np.testing.assert_array_equal(
            np.asarray(store.array(RUN, "scalars/loss")), losses[: len(loss_steps)]
        )
    return len(steps)


def _resume_to_the_end(crash_helper, url, reference):
    crash_helper.record(url, RUN, echo=lambda line: None)
    params, losses = reference
    store = koopkit.open_store(url)
    info = store.run(RUN)
    assert info.status == "complete"
    assert store.steps(RUN).tolist() == list(range(crash_helper.STEPS + 1))
    np.testing.assert_array_equal(np.asarray(store.array(RUN)), params)
    assert store.steps(RUN, "scalars/loss").tolist() == list(range(crash_helper.STEPS))
    np.testing.assert_array_equal(np.asarray(store.array(RUN, "scalars/loss")), losses)
    assert validate_store(url) == ([], 1)


def _kill_at(helper_path, children, url, n):
    child = Child(helper_path, url, RUN, "--sleep", "0.01")
    children.append(child)
    child.wait_for(f"step {n}")
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(timeout=30)
    assert child.proc.returncode == -signal.SIGKILL


def _crash_and_resume(crash_helper, helper_path, children, cli_runner, tmp_path, reference, n):
    url = tmp_path / "crash.zarr"
    _kill_at(helper_path, children, url, n)
    result = cli_runner("validate", url)
    assert result.exit_code == 0, result.output
    committed = _check_committed(url, reference)
    assert 4 <= committed <= n + 1  # at least the first chunk row (4 steps) was committed
    assert koopkit.open_store(url).run(RUN).status == "recording"  # it never got to say more
    _resume_to_the_end(crash_helper, url, reference)


# chunk rows hold 4 snapshots (steps 0-3, 4-7, 8-11, ...): kill just before, at and after one
@pytest.mark.parametrize("n", [10, 11, 13])
def test_sigkill_keeps_committed_rows_and_resumes(
    crash_helper, helper_path, children, cli_runner, tmp_path, reference, n
):
    _crash_and_resume(crash_helper, helper_path, children, cli_runner, tmp_path, reference, n)


@pytest.mark.slow
@pytest.mark.parametrize("n", [*range(7, 41, 2), 8, 12, 24])
def test_sigkill_at_many_points(
    crash_helper, helper_path, children, cli_runner, tmp_path, reference, n
):
    if n == crash_helper.STEPS:  # the child may have closed cleanly before the kill landed
        pytest.skip("the last step")
    _crash_and_resume(crash_helper, helper_path, children, cli_runner, tmp_path, reference, n)


def test_sigkill_before_the_first_commit_leaves_a_valid_store(
    crash_helper, helper_path, children, cli_runner, tmp_path, reference
):
    """Killed with nothing committed yet: series exist that committed_steps does not list."""
    url = tmp_path / "crash.zarr"
    _kill_at(helper_path, children, url, 1)
    assert _check_committed(url, reference) == 0
    result = cli_runner("validate", url)
    assert result.exit_code == 0, result.output
    _resume_to_the_end(crash_helper, url, reference)


# --------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_marks_the_run_interrupted(
    crash_helper, helper_path, children, tmp_path, reference
):
    url = tmp_path / "term.zarr"
    child = Child(helper_path, url, RUN, "--sleep", "0.05")
    children.append(child)
    child.wait_for("step 10")
    child.proc.send_signal(signal.SIGTERM)
    code, out, err = child.finish()
    assert code == 128 + signal.SIGTERM, err
    assert "done" not in out
    assert "Traceback" not in err
    info = koopkit.open_store(url).run(RUN)
    assert info.status == "interrupted"
    committed = _check_committed(url, reference)
    assert committed >= 11  # the buffered rows were flushed on the way out
    assert validate_store(url) == ([], 1)
    _resume_to_the_end(crash_helper, url, reference)  # the lock was released


# --------------------------------------------------------------------------------------------
# one writer per run, across processes

SECOND_WRITER = """
import sys, time
from koopkit.errors import RunLockedError
from koopkit.store.writer import RunWriter
start = time.monotonic()
try:
    RunWriter(sys.argv[1], sys.argv[2])
except RunLockedError as exc:
    print(f"{time.monotonic() - start:.3f} {exc}")
    sys.exit(3)
"""


def test_second_writer_in_another_process_is_refused(
    crash_helper, helper_path, children, run_python, tmp_path, reference
):
    url = tmp_path / "lock.zarr"
    holder = Child(helper_path, url, RUN, "--hold", "--steps", "8")
    children.append(holder)
    holder.wait_for(f"ready {holder.proc.pid}")
    # a second process
    proc = run_python("-c", SECOND_WRITER, str(url), RUN)
    assert proc.returncode == 3, proc.stderr
    seconds, message = proc.stdout.split(" ", 1)
    assert float(seconds) < 2.0  # refused at once, never waiting for the holder
    assert f"process {holder.proc.pid}" in message and RUN in message
    # this process: a RunWriter and a Recorder
    with pytest.raises(RunLockedError, match=f"process {holder.proc.pid}"):
        RunWriter(url, RUN)
    with pytest.raises(RunLockedError, match=f"process {holder.proc.pid}"):
        koopkit.Recorder(url, RUN, crash_helper.make_model()).open()
    # the holder is not disturbed by the refusals
    holder.proc.stdin.write("go\n")
    holder.proc.stdin.flush()
    code, out, err = holder.finish()
    assert code == 0, err
    assert out.strip().endswith("done")
    store = koopkit.open_store(url)
    assert store.run(RUN).status == "complete"
    np.testing.assert_array_equal(np.asarray(store.array(RUN)), reference[0][:9])
    RunWriter(url, RUN).close()  # free again


NEVER_CLOSED = """
import sys, torch, koopkit
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
for run, options in (("full", {}), ("sketch", {"sketch": 4})):
    rec = koopkit.Recorder(sys.argv[1], run, model, every=1, **options).open()
    for _ in range(5):
        rec.step(loss=1.0)
print(rec._writer.attrs["committed_steps"]["params"], flush=True)  # nothing yet: 0
"""


@pytest.mark.parametrize("end", ["return", "exception"])
def test_a_recorder_never_closed_commits_its_rows_at_exit(tmp_path, end):
    """A script that opens a Recorder and ends without closing it (or on an uncaught error)
    keeps every row it recorded, its run marked interrupted, with a warning saying why."""
    url = tmp_path / "s.zarr"
    script = NEVER_CLOSED + (
        "raise RuntimeError('the loop failed')\n" if end == "exception" else ""
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(url)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == (0 if end == "return" else 1), proc.stderr
    assert proc.stdout.split() == ["0"]  # the rows were still in the Recorder's buffers
    assert "was never closed" in proc.stderr
    store = koopkit.open_store(url)
    for run in ("full", "sketch"):
        assert store.run(run).status == "interrupted"
        assert store.steps(run).tolist() == list(range(6))
        assert store.steps(run, "scalars/loss").tolist() == list(range(5))
    assert validate_store(url) == ([], 2)


FORK_AND_WAIT = """
import os, sys, time
from koopkit.store.writer import RunWriter
writer = RunWriter(sys.argv[1], "r")
child = os.fork()
if child == 0:  # a DataLoader worker, say: here it outlives its parent
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_writer(tmp_path):
    """flock belongs to the open file, which a fork shares: without care a child would hold
    the run after its parent was SIGKILLed, and every later writer be refused."""
    url = tmp_path / "s.zarr"
    parent = subprocess.Popen(
        [sys.executable, "-c", FORK_AND_WAIT, str(url)], stdout=subprocess.PIPE, text=True
    )
    child = int(parent.stdout.readline())
    try:
        with pytest.raises(RunLockedError):
            RunWriter(url, "r")  # the parent holds it
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        os.kill(child, 0)  # the child lives on...
        RunWriter(url, "r").close()  # ...and holds nothing
    finally:
        for pid in (parent.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.communicate(timeout=30)


def test_two_processes_record_different_runs_into_one_store(
    helper_path, children, tmp_path, reference
):
    url = tmp_path / "shared.zarr"  # does not exist yet: both processes create it
    runs = ["a/seed", "b/seed"]
    pair = [Child(helper_path, url, run, "--steps", "20") for run in runs]
    children.extend(pair)
    results = [child.finish() for child in pair]
    for code, out, err in results:
        assert code == 0, err
        assert out.strip().endswith("done")
    params = reference[0][:21]
    store = koopkit.open_store(url)
    assert list(store.runs) == runs
    for run in runs:
        assert store.run(run).status == "complete"
        np.testing.assert_array_equal(np.asarray(store.array(run)), params)
    assert validate_store(url) == ([], 2)
