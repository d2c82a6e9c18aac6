"""Which rows a Recorder keeps: resumes fill every series, repeated snapshots and interrupts
lose nothing, memory in flight is bounded in total, and misuse is reported, not recorded."""

from __future__ import annotations

import json
import signal
import time
import types
import warnings

import numpy as np
import pytest
import torch
import zarr

import koopkit
from koopkit.errors import NonFiniteSnapshotWarning
from koopkit.record import transfer
from koopkit.record.recorder import Probe
from koopkit.store.validate import validate_store
from koopkit.store.writer import NONFINITE_LIMIT

pytestmark = pytest.mark.usefixtures("one_torch_thread", "restore_sigterm")


def flat(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def row_bytes(model) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


class Loop:
    """SGD on a seeded batch stream; ``params[k]`` is what the model held after k steps."""

    def __init__(self, model, seed=0):
        self.model, self.g = model, torch.Generator().manual_seed(seed)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.params = {0: flat(model)}
        self.k = 0

    def run(self, rec, steps, *, zero_grad_first=False):
        for _ in range(steps):
            loss = self.model(torch.randn(4, 3, generator=self.g)).pow(2).mean()
            loss.backward()
            self.opt.step()
            if zero_grad_first:
                self.opt.zero_grad()
            rec.step(loss=loss)
            self.opt.zero_grad()
            self.k += 1
            self.params[self.k] = flat(self.model)

    def expected(self, steps):
        return np.stack([self.params[s] for s in steps])


# --------------------------------------------------------------------------------------------
# resume


def test_resume_fills_each_series_from_its_own_commit_point(tmp_path, tiny_model):
    """A crash leaves series committed to different steps (chunk depths differ, and params is
    committed before the probe of the same snapshot); a replay must fill each one without a
    gap, not skip every series up to the furthest one."""
    url = tmp_path / "s.zarr"
    inputs = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    options = {"probes": {"p": Probe(inputs)}, "max_inflight_bytes": 4 * row_bytes(tiny_model())}
    with koopkit.Recorder(url, "r", tiny_model(), **options) as rec:
        Loop(rec.model).run(rec, 12)
    store = koopkit.open_store(url)
    reference = {path: np.asarray(store.array("r", path)) for path in ("params", "probes/p")}
    losses = np.asarray(store.array("r", "scalars/loss"))

    # what a SIGKILL can leave: params 12 rows, the probe and the loss only 4
    group = zarr.open_group(url / "runs" / "r", mode="r+")
    attrs = group.attrs.asdict()
    attrs["committed_steps"] = {"params": 12, "probes/p": 4, "scalars/loss": 4}
    attrs["status"] = "recording"
    group.attrs.put(attrs)

    with koopkit.Recorder(url, "r", tiny_model(), **options) as rec:  # a deterministic replay
        Loop(rec.model).run(rec, 12)
    store = koopkit.open_store(url)
    for path in ("params", "probes/p"):
        assert store.steps("r", path).tolist() == list(range(13)), path
        np.testing.assert_array_equal(np.asarray(store.array("r", path)), reference[path])
    assert store.steps("r", "scalars/loss").tolist() == list(range(12))
    np.testing.assert_array_equal(np.asarray(store.array("r", "scalars/loss")), losses)
    assert validate_store(url)[0] == []


# --------------------------------------------------------------------------------------------
# repeated snapshots


def test_a_snapshot_at_a_step_already_captured_is_ignored(memory_url, tiny_model):
    """An end-of-epoch ``rec.snapshot()`` on top of ``every``, and one right after open,
    used to make the writer refuse the whole buffer at close and lose every row."""
    model = tiny_model()
    loop = Loop(model)
    # (after zero_grad the extra snapshots' gradients are zeros, which the Recorder says)
    with pytest.warns(RuntimeWarning, match="no recorded parameter has a gradient at step 10"):
        with koopkit.Recorder(memory_url, "r", model, every=4, grads=True) as rec:
            rec.snapshot()  # step 0 was just recorded by ``initial``
            for _ in range(3):
                loop.run(rec, 10)
                rec.snapshot()  # steps 10 and 30 are new, step 20 is on the schedule
                rec.snapshot()
    expected = [0, 4, 8, 10, 12, 16, 20, 24, 28, 30]
    store = koopkit.open_store(memory_url)
    assert store.run("r").status == "complete"
    for path in ("params", "grads"):
        assert store.steps("r", path).tolist() == expected
    np.testing.assert_array_equal(np.asarray(store.array("r")), loop.expected(expected))
    assert validate_store(memory_url)[0] == []


def test_a_snapshot_at_an_earlier_step_is_refused_at_once(memory_url, tiny_model):
    model = tiny_model()
    loop = Loop(model)
    with koopkit.Recorder(memory_url, "r", model) as rec:
        loop.run(rec, 2)
        rec.step_count = 1
        with pytest.raises(ValueError, match="step 1 after one at step 2"):
            rec.snapshot()
        rec.step_count = 2
        loop.run(rec, 1)
    store = koopkit.open_store(memory_url)
    assert store.run("r").status == "complete"
    assert store.steps("r").tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(store.array("r")), loop.expected(range(4)))


# --------------------------------------------------------------------------------------------
# interrupts


def test_an_interrupt_inside_a_hand_off_never_submits_a_buffer_twice(
    memory_url, tiny_model, monkeypatch
):
    """Ctrl-C just after the params buffer was queued: it used to be queued again at close,
    and the writer's refusal of the duplicate then silently dropped grads and scalars."""
    model = tiny_model()
    submit = transfer.WriterThread.submit
    armed = {"params": False}

    def interrupted_submit(self, stream, steps, buffer, done, flush=False):
        submit(self, stream, steps, buffer, done, flush=flush)
        if armed["params"] and stream.path == "params":
            armed["params"] = False
            raise KeyboardInterrupt

    monkeypatch.setattr(transfer.WriterThread, "submit", interrupted_submit)
    budget = 2 * 2 * row_bytes(model) * 4  # params and grads: chunk_steps = 4
    with pytest.raises(KeyboardInterrupt):
        with koopkit.Recorder(memory_url, "r", model, grads=True, max_inflight_bytes=budget) as rec:
            loop = Loop(model)
            loop.run(rec, 6)  # steps 0..3 handed off, 4..6 buffered
            armed["params"] = True
            loop.run(rec, 1)  # step 7 fills the params buffer: interrupted in its hand-off
    loop.params[7] = flat(model)
    store = koopkit.open_store(memory_url)
    run = store.run("r")
    assert run.status == "interrupted"
    assert store.steps("r", "params").tolist() == list(range(8))
    assert store.steps("r", "grads").tolist() == list(range(7))  # step 7 was never captured
    assert store.steps("r", "scalars/loss").tolist() == list(range(7))
    np.testing.assert_array_equal(np.asarray(store.array("r")), loop.expected(range(8)))
    assert validate_store(memory_url)[0] == []


def test_sigterm_stays_handled_while_any_recorder_is_open(memory_url, tiny_model):
    """With overlapping Recorders, closing the first used to restore the default action,
    so SIGTERM then killed the process without flushing the second."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    a = koopkit.Recorder(memory_url, "a", tiny_model()).open()
    with pytest.raises(SystemExit):
        with koopkit.Recorder(memory_url, "b", tiny_model()) as b:
            a.close()
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler)
            b.step()
            handler(signal.SIGTERM, None)  # what the interpreter calls on SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the last one restored it
    store = koopkit.open_store(memory_url)
    assert store.run("b").status == "interrupted"
    assert store.steps("b").tolist() == [0, 1]


def test_a_failed_initial_snapshot_releases_the_run_and_sigterm(memory_url, tiny_model):
    """``open`` raising leaves no ``with`` block to close the Recorder: it closes itself."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    calls = []

    def second_call_fails(model, inputs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("probe failed at the initial snapshot")
        return model(inputs)

    probes = {"p": Probe(torch.zeros(2, 3), fn=second_call_fails)}
    with pytest.raises(RuntimeError, match="initial snapshot"):
        koopkit.Recorder(memory_url, "r", tiny_model(), probes=probes).open()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert koopkit.open_store(memory_url).run("r").status == "interrupted"
    with koopkit.Recorder(memory_url, "r", tiny_model()) as rec:  # the run was released
        rec.step()
    assert koopkit.open_store(memory_url).run("r").status == "complete"


def test_a_handler_of_the_program_is_left_alone(memory_url, tiny_model):
    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    with koopkit.Recorder(memory_url, "a", tiny_model()):
        with koopkit.Recorder(memory_url, "b", tiny_model()):
            assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGTERM) is mine


# --------------------------------------------------------------------------------------------
# durability of sparse schedules


def _committed(url, path="params"):
    return koopkit.open_store(url).run("r").committed(path)


def _wait_committed(url, path, rows, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _committed(url, path) < rows:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("kind", ["memory", "directory"])
def test_rows_that_waited_flush_every_s_are_committed(memory_url, tmp_path, tiny_model, kind):
    """Rows used to wait for a full chunk row (up to 64 snapshots): under a sparse schedule
    most of a run stayed uncommitted until close, and a crash lost it. A partial chunk row
    is written, then completed (in place, for the chunk files of a directory store)."""
    url = memory_url if kind == "memory" else tmp_path / "s.zarr"
    model = tiny_model()
    loop = Loop(model)
    every = [0, 3, 5, 6, 8, 9, 10, 20]
    budget = 2 * row_bytes(model) * 4  # chunk_steps = 4
    options = {"every": every, "max_inflight_bytes": budget, "flush_every_s": 0.2}
    with koopkit.Recorder(url, "r", model, **options) as rec:
        loop.run(rec, 3)  # snapshots 0 and 3, losses 0..2: half a chunk row
        time.sleep(0.3)
        loop.run(rec, 1)  # the first step after the interval hands them off
        assert _wait_committed(url, "params", 2)
        assert _wait_committed(url, "scalars/loss", 3)
        assert koopkit.open_store(url).run("r").status == "recording"
        rec.flush_every_s = None
        loop.run(rec, 2)  # snapshots 5 and 6 complete the chunk row: handed off at once
        assert _wait_committed(url, "params", 4)
        loop.run(rec, 20)
    store = koopkit.open_store(url)
    assert store.steps("r").tolist() == every
    np.testing.assert_array_equal(np.asarray(store.array("r")), loop.expected(every))
    assert store.steps("r", "scalars/loss").tolist() == list(range(26))
    assert validate_store(url)[0] == []


def test_rows_are_handed_off_as_soon_as_they_waited_flush_every_s(
    memory_url, tiny_model, monkeypatch
):
    """The first step after a row's deadline hands it off, not one up to a quarter of the
    interval later."""
    from koopkit.record import recorder

    now = [100.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr(recorder, "time", clock)
    monkeypatch.setattr(transfer, "time", clock)
    model = tiny_model()
    loop = Loop(model)
    with koopkit.Recorder(memory_url, "r", model, every=100, flush_every_s=1.0) as rec:
        for t in (100.3, 100.9):  # the initial snapshot waits from 100.0
            now[0] = t
            loop.run(rec, 1)
        assert _committed(memory_url) == 0
        now[0] = 101.01
        loop.run(rec, 1)
        assert _wait_committed(memory_url, "params", 1)


def test_flush_every_s_none_waits_for_whole_chunk_rows(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=5, flush_every_s=None) as rec:
        Loop(model).run(rec, 1)
        time.sleep(0.3)
        Loop(model).run(rec, 1)
        assert not _wait_committed(memory_url, "params", 1, timeout=0.3)
    assert _committed(memory_url) == 1
    with pytest.raises(ValueError, match="flush_every_s"):
        koopkit.Recorder(memory_url, "r2", model, flush_every_s=0)


# --------------------------------------------------------------------------------------------
# memory in flight


def _host_bytes(rec) -> int:
    """Bytes of every host chunk buffer the Recorder's vector series own."""
    total = 0
    for stream in rec._vectors.values():
        buffers = stream.free.qsize() + (stream.current is not None)
        total += buffers * stream.chunk_steps * stream.size * stream.dtype.itemsize
    return total


def test_max_inflight_bytes_bounds_all_series_together(memory_url):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    row = row_bytes(model)
    budget = 16 * row
    probes = {"p": Probe(torch.zeros(8, 64))}
    rec = koopkit.Recorder(
        memory_url, "r", model, grads=True, probes=probes, max_inflight_bytes=budget
    ).open()
    try:
        assert _host_bytes(rec) <= budget
        chunks = {path: stream.chunk_steps for path, stream in rec._vectors.items()}
        assert chunks == {"params": 2, "grads": 2, "probes/p": 2}  # shares are proportional
    finally:
        rec.close()
    # one series alone still gets the whole budget
    with koopkit.Recorder(memory_url, "alone", model, max_inflight_bytes=budget) as rec:
        assert rec._vectors["params"].chunk_steps == 8
        assert _host_bytes(rec) == budget


# --------------------------------------------------------------------------------------------
# gradients


def test_grads_cleared_before_rec_step_warn_once(memory_url, tiny_model):
    """The loop order opt.step(); opt.zero_grad(); rec.step() records zeros as gradients."""
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="zero_grad") as caught:
        with koopkit.Recorder(memory_url, "r", model, grads=True) as rec:
            Loop(model).run(rec, 5, zero_grad_first=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "'r'" in messages[0] and "step 1" in messages[0] and "attach" in messages[0]


@pytest.mark.parametrize("sketch", [None, 8])
def test_grads_zeroed_in_place_before_rec_step_warn_at_close(memory_url, tiny_model, sketch):
    """zero_grad(set_to_none=False) leaves gradients that exist and are zero: stored as the
    zeros they are, and named when the run closes."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="zero_grad") as caught:
        with koopkit.Recorder(memory_url, "r", model, grads=True, sketch=sketch) as rec:
            for _ in range(7):
                model(torch.ones(2, 3)).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=False)
                rec.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "'r'" in messages[0] and "steps [1, 2, 3, 4]" in messages[0]
    grads = np.asarray(koopkit.open_store(memory_url).array("r", "grads"))
    assert grads.shape[0] == 8 and not grads.any()


def test_grads_recorded_before_zero_grad_do_not_warn(memory_url, tiny_model):
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with koopkit.Recorder(memory_url, "r", model, grads=True, start_step=10) as rec:
            Loop(model).run(rec, 3)  # the snapshot at the start step has no gradient yet
        with koopkit.Recorder(memory_url, "r2", model, grads=True) as rec:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            rec.attach(opt)
            for _ in range(3):
                model(torch.ones(2, 3)).sum().backward()
                opt.step()
                opt.zero_grad()
    grads = np.asarray(koopkit.open_store(memory_url).array("r2", "grads"))
    assert not np.all(grads[1:] == 0)


# --------------------------------------------------------------------------------------------
# per-tensor views


def test_per_tensor_views_of_a_sketch_are_refused(memory_url, tiny_model):
    """The tensors table of a sketch describes its source: slicing the sketch columns by it
    used to return numbers reshaped as a tensor that were not the tensor."""
    for width in (64, 8):
        run_id = f"k{width}"
        with koopkit.Recorder(memory_url, run_id, tiny_model(), sketch=width):
            pass
        run = koopkit.open_run(memory_url, run_id)
        with pytest.raises(ValueError, match=f"countsketch sketch of width {width}"):
            run.koopkit.tensor("0.weight")
        with pytest.raises(ValueError, match="'full' or 'subset'"):
            run.koopkit.tensors()
        assert run["params"].attrs["tensors"][0]["name"] == "0.weight"  # still described


# --------------------------------------------------------------------------------------------
# NaN and Inf


def test_a_diverged_run_lists_the_first_nonfinite_steps_and_counts_all(memory_url, tiny_model):
    """One entry per NaN row made the run metadata, rewritten at every commit, grow forever."""
    model = tiny_model()
    budget = 2 * row_bytes(model) * 4  # a commit every 4 snapshots
    steps = NONFINITE_LIMIT + 50
    with pytest.warns(NonFiniteSnapshotWarning, match=rf"params at steps \[1, 2.*\({steps} rows\)"):
        with koopkit.Recorder(memory_url, "r", model, max_inflight_bytes=budget) as rec:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
            for _ in range(steps):
                rec.step(loss=float("nan"))
    attrs = koopkit.open_store(memory_url).run("r").attrs
    assert attrs["nonfinite"]["params"] == list(range(1, NONFINITE_LIMIT + 1))
    assert attrs["nonfinite_count"]["params"] == steps
    assert attrs["nonfinite"]["scalars/loss"] == list(range(NONFINITE_LIMIT))
    assert attrs["nonfinite_count"]["scalars/loss"] == steps
    assert len(json.dumps(attrs)) < 4000
    assert validate_store(memory_url)[0] == []
