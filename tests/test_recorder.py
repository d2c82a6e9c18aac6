"""The Recorder: what it stores is exactly what the model held, at the steps asked for.

Also the pieces it is built from: schedules, sketches, back-pressure and write failures.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
import time
import weakref

import fsspec
import numpy as np
import pytest
import torch
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st

import koopkit
from koopkit.errors import (
    InvalidRunIdError,
    KoopkitError,
    NonFiniteSnapshotWarning,
    RunExistsError,
    RunLockedError,
    ShapeChangedError,
    WriteFailedError,
)
from koopkit.record import schedule as sched
from koopkit.record import sketch as sk
from koopkit.record import transfer
from koopkit.record.recorder import Probe
from koopkit.store.validate import validate_store
from koopkit.store.writer import RunWriter, SeriesWriter

# --------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread", "restore_sigterm")


def flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors]).numpy().copy()


def row_bytes(model) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def train(model, rec, steps, *, seed=0, grads=False, attach=False):
    """SGD on a fixed random batch stream; returns what the model held at every step.

    ``params[k]`` are the parameters after k optimizer steps, ``grads[k]`` the gradient that
    was in ``p.grad`` when ``rec.step`` was called after step k, ``losses[k]`` the loss
    computed from the parameters of step k.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    if attach:
        rec.attach(opt)
    history = {"params": {0: flat(model.parameters())}, "grads": {}, "losses": {}}
    history["grads"][0] = np.zeros_like(history["params"][0])
    for k in range(1, steps + 1):
        x = torch.randn(8, 3, generator=g).to(dtype)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        history["grads"][k] = flat(p.grad for p in model.parameters())
        if not attach:
            rec.step(loss=loss)
        opt.zero_grad()
        history["params"][k] = flat(model.parameters())
        history["losses"][k - 1] = np.float32(loss.item())
    return history


def stacked(history, key, steps):
    return np.stack([history[key][s] for s in steps])


def read(url, run="r", path="params"):
    store = koopkit.open_store(url)
    return store.steps(run, path), np.asarray(store.array(run, path))


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize(
    "every, steps, expected",
    [
        (1, 7, list(range(8))),
        (3, 10, [0, 3, 6, 9]),
        ([0, 2, 5, 7], 8, [0, 2, 5, 7]),
        (sched.log_spaced(5), 30, [0, 1, 2, 3, 4, 6, 10, 16, 25]),
    ],
    ids=["every1", "every3", "list", "log_spaced"],
)
def test_params_round_trip_bit_for_bit(memory_url, tiny_model, every, steps, expected):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=every) as rec:
        history = train(model, rec, steps)
    got_steps, values = read(memory_url)
    assert got_steps.tolist() == expected
    assert got_steps.dtype == np.int64
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, stacked(history, "params", expected))
    info = koopkit.open_store(memory_url).run("r")
    assert info.status == "complete"
    assert info.attrs["committed_steps"]["params"] == len(expected)
    assert validate_store(memory_url) == ([], 1)


def test_initial_false_leaves_out_step_zero(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=2, initial=False) as rec:
        history = train(model, rec, 6)
    got_steps, values = read(memory_url)
    assert got_steps.tolist() == [2, 4, 6]
    np.testing.assert_array_equal(values, stacked(history, "params", [2, 4, 6]))


def test_initial_step_recorded_even_if_schedule_omits_zero(memory_url, tiny_model):
    """initial=True records the initial parameters as step 0 whatever the schedule."""
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=[2, 5]) as rec:
        train(model, rec, 6)
    assert read(memory_url)[0].tolist() == [0, 2, 5]


def test_start_step_counts_from_a_restored_checkpoint(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=5, start_step=100) as rec:
        history = train(model, rec, 12)
    got_steps, values = read(memory_url)
    assert got_steps.tolist() == [100, 105, 110]
    np.testing.assert_array_equal(values, stacked(history, "params", [0, 5, 10]))


@pytest.mark.parametrize(
    "params, names", [("^0\\.", ["0.weight", "0.bias"]), (["2.bias"], ["2.bias"])]
)
def test_params_subset_by_regex_and_names(memory_url, tiny_model, params, names):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, params=params) as rec:
        train(model, rec, 3)
    store = koopkit.open_store(memory_url)
    attrs = store.root["runs/r/params"].attrs.asdict()
    assert attrs["kind"] == "subset"
    assert [t["name"] for t in attrs["tensors"]] == names
    named = dict(model.named_parameters())
    values = np.asarray(store.array("r"))
    np.testing.assert_array_equal(values[-1], flat(named[n] for n in names))
    assert validate_store(memory_url)[0] == []


def test_params_by_unknown_name_is_refused(memory_url, tiny_model):
    with pytest.raises(ValueError, match="nope"):
        koopkit.Recorder(memory_url, "r", tiny_model(), params=["nope"]).open()
    with pytest.raises(ValueError, match="selects no parameter"):
        koopkit.Recorder(memory_url, "r2", tiny_model(), params="^nothing$").open()


def test_grads_equal_p_grad_when_step_is_called_before_zero_grad(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, grads=True) as rec:
        history = train(model, rec, 5)
    got_steps, values = read(memory_url, path="grads")
    assert got_steps.tolist() == list(range(6))
    np.testing.assert_array_equal(values, stacked(history, "grads", range(6)))
    assert not np.all(values[1:] == 0)


def test_sparse_gradients_are_recorded_dense(memory_url):
    """``nn.Embedding(sparse=True)`` gives a sparse ``p.grad``; the snapshot used to fail with
    "reshape is not implemented for sparse tensors" inside the training loop."""
    torch.manual_seed(0)
    model = torch.nn.Embedding(6, 3, sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with koopkit.Recorder(memory_url, "r", model, grads=True, initial=False) as rec:
        model(torch.tensor([1, 4, 1])).pow(2).sum().backward()
        expected = model.weight.grad.to_dense().reshape(-1).numpy().copy()
        opt.step()
        rec.step()
    steps, values = read(memory_url, path="grads")
    assert steps.tolist() == [1]
    np.testing.assert_array_equal(values[0], expected)


def _first_output(model, inputs):
    with torch.no_grad():
        return model(inputs)[:, 0]


def test_probes_are_stored_per_sample_with_ids_and_labels(memory_url, tiny_model):
    model = tiny_model()
    inputs = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    labels = [0, 1, 1, 0, 2, 2]
    seen = {}
    probes = {
        "logits": Probe(inputs, labels),
        "first": Probe(inputs[:2], ids=[10, 20], fn=_first_output),
    }
    with koopkit.Recorder(memory_url, "r", model, probes=probes, every=2) as rec:
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def look(k):  # the same batches as the probes: kernels differ with the batch size
            with torch.no_grad():
                seen[k] = model(inputs).numpy().copy(), _first_output(model, inputs[:2]).numpy()

        look(0)
        for k in range(1, 5):
            model(torch.randn(4, 3, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
            look(k)
    assert model.training  # the probe's eval mode was undone
    run = koopkit.open_run(memory_url, "r")
    logits = run["probes/logits"].to_dataset()
    assert logits["value"].dims == ("step", "sample", "feature")
    assert logits["step"].values.tolist() == [0, 2, 4]
    assert logits["sample"].values.tolist() == list(range(6))
    assert logits["label"].values.tolist() == labels
    np.testing.assert_array_equal(logits["value"].values, np.stack([seen[s][0] for s in (0, 2, 4)]))
    first = run["probes/first"].to_dataset()
    assert first["value"].shape == (3, 2, 1)
    assert first["sample"].values.tolist() == [10, 20]
    np.testing.assert_array_equal(
        first["value"].values[:, :, 0], np.stack([seen[s][1] for s in (0, 2, 4)])
    )
    assert validate_store(memory_url)[0] == []


def test_the_default_probe_restores_each_submodule_mode(memory_url):
    """Fine-tuning keeps a frozen BatchNorm in eval mode while the rest trains; the probe used
    to restore ``model.train()`` on every submodule, so the frozen statistics drifted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    model[1].eval()
    frozen = model[1].running_mean.clone()
    with koopkit.Recorder(memory_url, "r", model, probes={"p": torch.randn(5, 3)}) as rec:
        rec.step()
        model(torch.randn(8, 3))  # the next training batch
    assert [m.training for m in model] == [True, False, True]
    torch.testing.assert_close(model[1].running_mean, frozen)


def test_probe_fn_with_autograd_enabled(memory_url, tiny_model):
    model = tiny_model()
    inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    with koopkit.Recorder(
        memory_url, "r", model, probes={"p": Probe(inputs, fn=lambda m, x: m(x))}
    ) as rec:
        rec.step()
    with torch.no_grad():
        expected = model(inputs).numpy()
    np.testing.assert_array_equal(
        np.asarray(koopkit.open_store(memory_url).array("r", "probes/p"))[-1], expected
    )


def test_scalars_are_stored_at_the_step_they_describe(memory_url, tiny_model):
    """``rec.step(loss=...)`` stores the loss at the step before the count (the parameters it
    was computed from); ``rec.log`` stores at the current count."""
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=3) as rec:
        history = train(model, rec, 7)
        rec.log(lr=0.5)
    store = koopkit.open_store(memory_url)
    assert store.steps("r", "scalars/loss").tolist() == list(range(7))
    losses = np.asarray(store.array("r", "scalars/loss"))
    assert losses.dtype == np.float32
    np.testing.assert_array_equal(losses, [history["losses"][k] for k in range(7)])
    assert store.steps("r", "scalars/lr").tolist() == [7]
    assert np.asarray(store.array("r", "scalars/lr")).tolist() == [0.5]


def test_scalar_tensor_and_python_numbers_both_log(memory_url, tiny_model):
    with koopkit.Recorder(memory_url, "r", tiny_model()) as rec:
        for k in range(3):
            rec.step(acc=torch.tensor(k / 4), n=k)
    store = koopkit.open_store(memory_url)
    assert np.asarray(store.array("r", "scalars/acc")).tolist() == [0, 0.25, 0.5]
    assert np.asarray(store.array("r", "scalars/n")).tolist() == [0, 1, 2]


def test_a_scalar_first_logged_under_inference_mode_logs_outside_it(memory_url, tiny_model):
    """An evaluation under ``torch.inference_mode()`` used to create the scalar's batch as an
    inference tensor, so the next value logged outside it raised."""
    with koopkit.Recorder(memory_url, "r", tiny_model()) as rec:
        with torch.inference_mode():
            rec.log(acc=torch.tensor(0.25))
        rec.step()
        rec.log(acc=0.5)
    acc = koopkit.open_store(memory_url).array("r", "scalars/acc")
    assert np.asarray(acc).tolist() == [0.25, 0.5]


@pytest.mark.parametrize("sketch", [None, 4])
def test_a_recorder_opened_under_inference_mode_records_outside_it(memory_url, tiny_model, sketch):
    """Its buffers used to be inference tensors, so the first snapshot outside it raised."""
    model = tiny_model()
    with torch.inference_mode():
        rec = koopkit.Recorder(memory_url, "r", model, sketch=sketch).open()
    with rec:
        for _ in range(3):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            rec.step(loss=torch.tensor(1.0))
            with torch.inference_mode():
                rec.snapshot()  # a snapshot taken during an evaluation
    assert koopkit.open_store(memory_url).steps("r").tolist() == [0, 1, 2, 3]


def test_logging_a_scalar_twice_at_one_step_is_refused_immediately(memory_url, tiny_model):
    with koopkit.Recorder(memory_url, "r", tiny_model()) as rec:
        rec.step()
        rec.log(acc=1.0)
        with pytest.raises(ValueError, match="acc"):
            rec.log(acc=2.0)
    assert koopkit.open_store(memory_url).run("r").status == "complete"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_stored_as_float32_exactly(memory_url, tiny_model, dtype):
    model = tiny_model(dtype=dtype)
    with koopkit.Recorder(memory_url, "r", model) as rec:
        history = train(model, rec, 3)
    got_steps, values = read(memory_url)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, stacked(history, "params", range(4)))
    tensors = koopkit.open_store(memory_url).root["runs/r/params"].attrs["tensors"]
    assert {t["dtype"] for t in tensors} == {str(dtype).removeprefix("torch.")}


def test_float64_storage_dtype(memory_url, tiny_model):
    model = tiny_model(dtype=torch.float64)
    with koopkit.Recorder(memory_url, "r", model, dtype="float64") as rec:
        train(model, rec, 2)
    values = read(memory_url)[1]
    assert values.dtype == np.float64
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_array_equal(values[-1], expected)


def test_attach_records_after_every_optimizer_step(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, grads=True) as rec:
        history = train(model, rec, 5, attach=True)
    got_steps, values = read(memory_url)
    assert got_steps.tolist() == list(range(6))
    np.testing.assert_array_equal(values, stacked(history, "params", range(6)))
    np.testing.assert_array_equal(
        read(memory_url, path="grads")[1], stacked(history, "grads", range(6))
    )
    attrs = koopkit.open_store(memory_url).run("r").attrs
    assert attrs["optimizer"]["class"] == "SGD"
    assert attrs["optimizer"]["hyperparams"]["lr"] == 0.1


def test_attach_hook_is_removed_at_close(memory_url, tiny_model):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with koopkit.Recorder(memory_url, "r", model) as rec:
        rec.attach(opt)
        opt.step()
    opt.step()  # no recorder any more: must neither record nor raise
    assert read(memory_url)[0].tolist() == [0, 1]


@pytest.mark.parametrize("when", ["before open", "once", "every epoch"])
def test_an_attached_optimizer_records_again_when_the_recorder_is_reopened(
    memory_url, tiny_model, when
):
    """Reopening is how a loop records epoch by epoch: a hook lost at close would record
    nothing from then on, and one added twice would count each step twice."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = koopkit.Recorder(memory_url, "r", model)
    if when == "before open":
        rec.attach(opt)
    for epoch in range(2):
        with rec:
            if when == "every epoch" or (when == "once" and epoch == 0):
                rec.attach(opt)
            for _ in range(3):
                model(torch.ones(2, 3)).sum().backward()
                opt.step()
                opt.zero_grad()
        opt.step()  # closed: neither records nor raises
    assert read(memory_url)[0].tolist() == list(range(7))
    assert rec.step_count == 6


def test_removing_an_attachment_stops_recording_now_and_after_a_reopen(memory_url, tiny_model):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = koopkit.Recorder(memory_url, "r", model)
    with rec:
        attachment = rec.attach(opt)
        opt.step()
        attachment.remove()
        opt.step()
    with rec:
        opt.step()
    assert read(memory_url)[0].tolist() == [0, 1]


def test_chunk_depth_that_does_not_divide_the_step_count(memory_url, tiny_model):
    model = tiny_model()
    budget = 2 * 2 * row_bytes(model) * 4  # params and grads share it: chunk_steps = 4
    with koopkit.Recorder(memory_url, "r", model, max_inflight_bytes=budget, grads=True) as rec:
        history = train(model, rec, 13)
    store = koopkit.open_store(memory_url)
    value = store.root["runs/r/params/value"]
    assert value.chunks[0] == 4
    assert store.root["runs/r/params"].attrs["chunk_steps"] == 4
    got_steps, values = read(memory_url)
    assert got_steps.tolist() == list(range(14))
    np.testing.assert_array_equal(values, stacked(history, "params", range(14)))
    np.testing.assert_array_equal(
        read(memory_url, path="grads")[1], stacked(history, "grads", range(14))
    )
    assert validate_store(memory_url)[0] == []


def test_per_tensor_views_equal_the_reshaped_history(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=2) as rec:
        history = train(model, rec, 6)
    run = koopkit.open_run(memory_url, "r")
    full = stacked(history, "params", [0, 2, 4, 6])
    offset = 0
    for name, p in model.named_parameters():
        view = run.koopkit.tensor(name)
        assert view.dims[0] == "step"
        assert view["step"].values.tolist() == [0, 2, 4, 6]
        assert view.shape == (4, *p.shape)
        np.testing.assert_array_equal(
            view.values, full[:, offset : offset + p.numel()].reshape(4, *p.shape)
        )
        offset += p.numel()
    assert [t["name"] for t in run.koopkit.tensors()] == [n for n, _ in model.named_parameters()]
    with pytest.raises(KeyError, match="nope"):
        run.koopkit.tensor("nope")


def test_nested_run_ids_and_tags_are_selectable(memory_url, tiny_model):
    for width, seed in [(4, 0), (4, 1), (8, 0)]:
        with koopkit.Recorder(
            memory_url,
            f"fcn/h{width}/seed{seed}",
            tiny_model(seed),
            tags={"width": width, "seed": seed},
        ):
            pass
    store = koopkit.open_store(memory_url)
    assert list(store.runs) == ["fcn/h4/seed0", "fcn/h4/seed1", "fcn/h8/seed0"]
    assert [r.run_id for r in store.select({"width": "4"})] == ["fcn/h4/seed0", "fcn/h4/seed1"]
    assert [r.run_id for r in store.select({"width": "8", "seed": "0"})] == ["fcn/h8/seed0"]
    assert store.select({"missing": "1"}) == []
    assert validate_store(memory_url) == ([], 3)


# --------------------------------------------------------------------------------------------
# run ids, resume and refusals


@pytest.mark.parametrize(
    "run_id", ["../escape", "a/../../b", "/abs/path", "a\x00b", "", "a//b", "."]
)
def test_invalid_run_ids_are_refused(tmp_path, tiny_model, run_id):
    with pytest.raises(InvalidRunIdError):
        koopkit.Recorder(tmp_path / "s.zarr", run_id, tiny_model())
    with pytest.raises(InvalidRunIdError):
        RunWriter(tmp_path / "s.zarr", run_id)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()


def test_a_group_of_runs_is_not_a_run(memory_url, tiny_model):
    with koopkit.Recorder(memory_url, "x/y", tiny_model()):
        pass
    with pytest.raises(KoopkitError):
        koopkit.Recorder(memory_url, "x", tiny_model()).open()
    store = koopkit.open_store(memory_url)
    assert list(store.runs) == ["x/y"]
    assert store.root["runs/x"].attrs.asdict() == {}


def test_a_run_group_a_killed_writer_left_undescribed_is_recorded_into(tmp_path, tiny_model):
    """An empty group without attributes at the run's path (a writer killed between making
    it and describing it) is taken as the new run; one holding runs is still refused."""
    url = tmp_path / "s.zarr"
    with koopkit.Recorder(url, "other", tiny_model()):
        pass
    zarr.open_group(str(url), mode="r+").create_group("runs/left")
    with koopkit.Recorder(url, "left", tiny_model()) as rec:
        rec.step()
    store = koopkit.open_store(url)
    assert store.run("left").committed("params") == 2
    assert validate_store(url) == ([], 2)


def test_a_run_inside_a_run_is_refused(memory_url, tiny_model):
    with koopkit.Recorder(memory_url, "a", tiny_model()):
        pass
    with pytest.raises(KoopkitError):
        with koopkit.Recorder(memory_url, "a/b", tiny_model()) as rec:
            rec.step()
    assert list(koopkit.open_store(memory_url).runs) == ["a"]


def test_refused_resume_leaves_the_run_as_it_was(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model) as rec:
        train(model, rec, 3)
    before = koopkit.open_store(memory_url).run("r").attrs
    other = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    with pytest.raises(ShapeChangedError):
        koopkit.Recorder(memory_url, "r", other).open()
    after = koopkit.open_store(memory_url).run("r").attrs
    assert after["status"] == "complete"
    assert after == before


@pytest.mark.parametrize(
    "tags",
    [
        {"width": np.int64(40)},
        {"lr": np.float32(0.5)},
        {"seed": torch.tensor(2)},
        {"layers": [1, 2]},
        {"opt": {"name": "sgd"}},
    ],
    ids=["numpy-int", "numpy-float", "torch-scalar", "list", "dict"],
)
def test_tag_values_are_coerced_or_refused_up_front(memory_url, tiny_model, tags):
    try:
        with koopkit.Recorder(memory_url, "r", tiny_model(), tags=tags):
            pass
    except ValueError:  # refused before anything was written: not even the store exists
        with pytest.raises(koopkit.errors.NotAStoreError):
            koopkit.open_store(memory_url)
    else:
        assert validate_store(memory_url)[0] == []
    with koopkit.Recorder(memory_url, "r", tiny_model(), tags={"width": 40}):  # id still usable
        pass
    assert validate_store(memory_url)[0] == []


def test_a_float16_overflow_is_named_in_the_nonfinite_warning(memory_url):
    model = torch.nn.Embedding(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = 1e5  # finite, beyond float16's 65504
    with pytest.warns(NonFiniteSnapshotWarning, match=r"beyond float16's range, 65504"):
        with koopkit.Recorder(memory_url, "r", model, dtype="float16"):
            pass
    assert np.isinf(read(memory_url)[1][0, 0])


def test_resuming_with_another_storage_dtype_is_refused(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model) as rec:
        train(model, rec, 2)
    with pytest.raises(ShapeChangedError, match=r"holds float32 rows; got float64 rows"):
        koopkit.Recorder(memory_url, "r", model, dtype="float64").open()
    assert read(memory_url)[1].dtype == np.float32


def test_resuming_adds_to_the_runs_tags(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, tags={"width": 40, "seed": 2}) as rec:
        train(model, rec, 2)
    with koopkit.Recorder(memory_url, "r", model, tags={"seed": 3, "resumed": True}) as rec:
        train(model, rec, 1)
    tags = koopkit.open_store(memory_url).run("r").attrs["tags"]
    assert tags == {"width": 40, "seed": 3, "resumed": True}


def test_resume_false_on_a_run_with_committed_steps(memory_url, tiny_model):
    with koopkit.Recorder(memory_url, "r", tiny_model()) as rec:
        rec.step()
    with pytest.raises(RunExistsError, match="resume"):
        koopkit.Recorder(memory_url, "r", tiny_model(), resume=False).open()
    # the refusal released the run: resuming works
    with koopkit.Recorder(memory_url, "r", tiny_model()):
        pass


def test_resume_replays_without_gap_or_duplicate(memory_url, tiny_model):
    model = tiny_model()
    budget = 2 * row_bytes(model) * 4
    with koopkit.Recorder(memory_url, "r", model, max_inflight_bytes=budget) as rec:
        train(model, rec, 6)
    model = tiny_model()  # the same deterministic training again, from the start
    with koopkit.Recorder(memory_url, "r", model, max_inflight_bytes=budget) as rec:
        history = train(model, rec, 11)
    store = koopkit.open_store(memory_url)
    assert store.steps("r").tolist() == list(range(12))
    np.testing.assert_array_equal(
        np.asarray(store.array("r")), stacked(history, "params", range(12))
    )
    assert store.steps("r", "scalars/loss").tolist() == list(range(11))
    np.testing.assert_array_equal(
        np.asarray(store.array("r", "scalars/loss")), [history["losses"][k] for k in range(11)]
    )
    assert store.run("r").status == "complete"


def test_shape_change_mid_run_names_the_parameter(memory_url, tiny_model):
    model = tiny_model()
    with pytest.raises(ShapeChangedError, match=r"'2\.weight'"):
        with koopkit.Recorder(memory_url, "r", model) as rec:
            train(model, rec, 2)
            model[2].weight = torch.nn.Parameter(torch.zeros(3, 5))
            rec.step()
    store = koopkit.open_store(memory_url)
    assert store.run("r").status == "interrupted"
    assert store.steps("r").tolist() == [0, 1, 2]
    assert validate_store(memory_url)[0] == []


def test_a_parameter_added_mid_run_to_a_full_recording_is_refused(memory_url, tiny_model):
    """``params=True`` records the whole model; an adapter added after the Recorder opened
    used to be left out silently while the run still said ``kind: full``."""
    model = tiny_model()
    with pytest.raises(ShapeChangedError, match=r"'3\.weight', '3\.bias'.*added at step 2"):
        with koopkit.Recorder(memory_url, "r", model) as rec:
            train(model, rec, 1)
            model.append(torch.nn.Linear(2, 2))
            rec.step()
    assert koopkit.open_store(memory_url).steps("r").tolist() == [0, 1]
    with koopkit.Recorder(memory_url, "named", model, params=["0.weight"]) as rec:
        model.append(torch.nn.Linear(2, 2))
        rec.step()  # a named selection is unaffected
    assert koopkit.open_store(memory_url).steps("named").tolist() == [0, 1]


def test_replaced_parameter_of_the_same_shape_is_followed(memory_url, tiny_model):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model) as rec:
        model[0].bias = torch.nn.Parameter(torch.full((5,), 7.0))
        rec.step()
    assert np.all(read(memory_url)[1][1, 15:20] == 7.0)


def test_a_shape_changed_through_data_on_the_same_parameter_is_refused(memory_url, tiny_model):
    """The parameter object stays the one recorded; only its shape tells the change."""
    model = tiny_model()
    with pytest.raises(ShapeChangedError, match=r"'2\.weight' changed from shape \(2, 5\)"):
        with koopkit.Recorder(memory_url, "r", model) as rec:
            rec.step()
            model[2].weight.data = torch.zeros(3, 5)
            rec.step()
    assert koopkit.open_store(memory_url).steps("r").tolist() == [0, 1]


def test_a_module_renamed_mid_run_is_refused(memory_url):
    """The same parameter objects under new names: the store's tensor table would lie."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)

    model = Net()
    with pytest.raises(ShapeChangedError, match=r"'a\.weight' changed .* to removed"):
        with koopkit.Recorder(memory_url, "r", model, params=["a.weight", "b.bias"]) as rec:
            rec.step()
            model.c = model.a
            del model.a
            rec.step()
    assert koopkit.open_store(memory_url).steps("r").tolist() == [0, 1]


def _replace_weight(model, how):
    """Replace model[0]'s weight (or model[0]) by new objects with the same shapes."""
    new = torch.nn.Parameter(torch.full_like(model[0].weight, 0.25))
    if how == "setattr":
        model[0].weight = new
    elif how == "parameters dict":
        model[0]._parameters["weight"] = new  # as some libraries do, past every hook
    elif how == "module":
        model[0] = torch.nn.Linear(3, 5)
    elif how == "modules dict":
        model._modules["0"] = torch.nn.Linear(3, 5)
    elif how == "data":  # same object, new storage: not a layout change
        model[0].weight.data = torch.full_like(model[0].weight, 0.25)


@pytest.mark.parametrize("how", ["setattr", "parameters dict", "module", "modules dict", "data"])
def test_a_replaced_parameter_is_recorded_however_it_was_replaced(memory_url, tiny_model, how):
    """The layout check walks the model again only when something changed; every way of
    replacing a parameter must count as a change, so the new one is what gets recorded."""
    model, recorded = tiny_model(), []
    with koopkit.Recorder(memory_url, "r", model) as rec:  # a snapshot at step 0
        rec.step()  # one with nothing changed: the walk is skipped
        for _ in range(2):  # the second time after the walk that followed the first
            _replace_weight(model, how)
            rec.step()
            recorded.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    rows = np.asarray(koopkit.open_store(memory_url).array("r"))
    assert rows.shape[0] == 4
    for row, flat in zip(rows[2:], recorded, strict=True):
        np.testing.assert_array_equal(row, flat.numpy())
    assert not np.array_equal(rows[1], rows[2])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: delattr(m[2], "bias"), r"'2\.bias' changed from shape \(2,\) to removed"),
        (lambda m: m[0]._parameters.pop("bias"), r"'0\.bias' changed .* to removed"),
        (lambda m: setattr(m[1], "extra", torch.nn.Parameter(torch.zeros(1))), "'1.extra'"),
        (lambda m: m[1]._parameters.update(extra=torch.nn.Parameter(torch.zeros(1))), "1.extra"),
        (lambda m: m._modules.update(z=torch.nn.Linear(1, 1)), "'z.weight', 'z.bias'"),
    ],
    ids=["delattr", "parameters dict pop", "setattr", "parameters dict", "modules dict"],
)
def test_a_parameter_removed_or_added_past_the_hooks_is_refused(
    memory_url, tiny_model, change, message
):
    model = tiny_model()
    with pytest.raises(ShapeChangedError, match=message):
        with koopkit.Recorder(memory_url, "r", model) as rec:
            rec.step()
            rec.step()
            change(model)
            rec.step()
    assert koopkit.open_store(memory_url).steps("r").tolist() == [0, 1, 2]


def test_after_a_refused_layout_the_restored_model_is_what_gets_recorded(memory_url, tiny_model):
    """A refusal must not leave the recorder following a parameter the model gave back."""
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model) as rec:
        original, kept = model[0].weight, model[2].weight.data
        model[0].weight = torch.nn.Parameter(torch.full_like(original, 7.0))  # followed ...
        model[2].weight.data = torch.zeros(4, 4)  # ... before this is refused
        with pytest.raises(ShapeChangedError, match=r"'2\.weight' changed"):
            rec.step()
        model[0].weight, model[2].weight.data = original, kept  # put back as it was
        rec.step()
        expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    store = koopkit.open_store(memory_url)
    assert store.steps("r").tolist() == [0, 2]
    np.testing.assert_array_equal(np.asarray(store.array("r"))[-1], expected)


def test_the_layout_check_keeps_no_replaced_module_alive(memory_url):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    model = Net()
    with koopkit.Recorder(memory_url, "r", model, every=1000, params=["head.weight"]):
        old = weakref.ref(model.backbone)
        model.backbone = torch.nn.Linear(4, 4)
        gc.collect()
        assert old() is None


def test_a_named_parameters_set_on_the_instance_is_honoured(memory_url, tiny_model):
    model = tiny_model()
    plain = model.named_parameters
    model.named_parameters = lambda *a, **k: ((n, p) for n, p in plain(*a, **k) if p.requires_grad)
    with pytest.raises(ShapeChangedError, match=r"'0\.weight' changed .* to removed"):
        with koopkit.Recorder(memory_url, "r", model) as rec:
            rec.step()
            model[0].requires_grad_(False)  # no longer listed by the instance's method
            rec.step()


def test_a_model_whose_named_parameters_takes_only_the_old_arguments(memory_url):
    """An override without ``remove_duplicate`` (torch's own has it since 2.0) still selects."""

    class Listing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 1)

        def named_parameters(self, prefix="", recurse=True):
            yield from self.inner.named_parameters(prefix="inner")

    for params in (True, "weight", ("inner.bias",)):
        with koopkit.Recorder(memory_url, f"r{len(str(params))}", Listing(), params=params):
            pass


def test_a_model_listing_its_own_parameters_is_walked_at_every_snapshot(memory_url):
    """A class that overrides named_parameters may answer differently with nothing in its
    modules changed; it gets the full walk every time."""

    class Swapping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 1)
            self.use_other = False
            self.other = torch.nn.Linear(2, 1)

        def named_parameters(self, *args, **kwargs):
            source = self.other if self.use_other else self.inner
            yield from source.named_parameters(*args, **kwargs)

    model = Swapping()
    torch.nn.init.constant_(model.other.weight, 0.5)
    torch.nn.init.constant_(model.other.bias, -1.0)
    with koopkit.Recorder(memory_url, "r", model) as rec:  # snapshots at steps 0 and 1
        rec.step()
        model.use_other = True
        rec.step()
        assert rec._walked is False  # decided once: no listing of modules at each snapshot
    rows = np.asarray(koopkit.open_store(memory_url).array("r"))
    assert rows[2].tolist() == [0.5, 0.5, -1.0]
    assert rows[1].tolist() != rows[2].tolist()


def test_keyboard_interrupt_marks_the_run_interrupted(memory_url, tiny_model):
    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        with koopkit.Recorder(memory_url, "r", model) as rec:
            history = train(model, rec, 5)
            raise KeyboardInterrupt
    store = koopkit.open_store(memory_url)
    assert store.run("r").status == "interrupted"
    np.testing.assert_array_equal(
        np.asarray(store.array("r")), stacked(history, "params", range(6))
    )
    assert validate_store(memory_url)[0] == []


def test_closed_run_no_longer_names_a_writer(memory_url, tiny_model):
    with koopkit.Recorder(memory_url, "r", tiny_model()):
        pass
    assert "writer" not in koopkit.open_store(memory_url).run("r").attrs


def test_nonfinite_snapshots_are_stored_and_flagged(memory_url, tiny_model):
    model = tiny_model()
    with pytest.warns(NonFiniteSnapshotWarning, match="params at steps"):
        with koopkit.Recorder(memory_url, "r", model) as rec:
            rec.step()
            with torch.no_grad():
                model[0].weight[1, 2] = float("nan")
            rec.step()
            with torch.no_grad():
                model[0].weight[1, 2] = float("inf")
            rec.step()
            with torch.no_grad():
                model[0].weight[1, 2] = 1.0
            rec.step()
    store = koopkit.open_store(memory_url)
    values = np.asarray(store.array("r"))
    assert np.isnan(values[2, 5]) and np.isposinf(values[3, 5])
    assert np.isfinite(np.delete(values, 5, axis=1)).all()
    assert np.isfinite(values[[0, 1, 4]]).all()
    assert store.run("r").attrs["nonfinite"] == {"params": [2, 3]}
    assert store.run("r").status == "complete"
    assert validate_store(memory_url)[0] == []


# --------------------------------------------------------------------------------------------
# one writer per run


def test_second_writer_in_process_is_refused_memory(memory_url, tiny_model):
    import os

    with koopkit.Recorder(memory_url, "r", tiny_model()):
        with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
            koopkit.Recorder(memory_url, "r", tiny_model()).open()
        with pytest.raises(RunLockedError):
            RunWriter(memory_url, "r")
        with koopkit.Recorder(memory_url, "other", tiny_model()):  # another run is fine
            pass
    with koopkit.Recorder(memory_url, "r", tiny_model()):  # released at close
        pass


def test_second_writer_in_process_is_refused_directory(tmp_path, tiny_model):
    url = tmp_path / "s.zarr"
    with koopkit.Recorder(url, "a/b", tiny_model()):
        with pytest.raises(RunLockedError, match="one writer per run"):
            RunWriter(url, "a/b")
    RunWriter(url, "a/b").close()


# --------------------------------------------------------------------------------------------
# back-pressure


def _slow_append(monkeypatch, delay):
    original = RunWriter.append

    def slow(self, path, steps, rows):
        time.sleep(delay)
        return original(self, path, steps, rows)

    monkeypatch.setattr(RunWriter, "append", slow)


def test_on_full_drop_counts_what_it_drops(memory_url, tiny_model, monkeypatch):
    model = tiny_model()
    _slow_append(monkeypatch, 0.05)
    budget = 2 * row_bytes(model)  # chunk_steps = 1, two buffers
    with koopkit.Recorder(memory_url, "r", model, on_full="drop", max_inflight_bytes=budget) as rec:
        history = train(model, rec, 30)
    store = koopkit.open_store(memory_url)
    steps = store.steps("r")
    dropped = store.run("r").attrs["dropped"]
    assert dropped > 0
    assert len(steps) + dropped == 31
    assert np.all(np.diff(steps) > 0)
    np.testing.assert_array_equal(np.asarray(store.array("r")), stacked(history, "params", steps))
    assert validate_store(memory_url)[0] == []


def test_dropped_snapshots_are_counted_in_the_store_before_close(tmp_path, tiny_model, monkeypatch):
    """A run still recording (or killed) says how many snapshots it dropped so far."""
    model, url = tiny_model(), tmp_path / "s.zarr"
    _slow_append(monkeypatch, 0.05)
    budget = 2 * row_bytes(model)  # chunk_steps = 1: every row written is committed
    with koopkit.Recorder(url, "r", model, on_full="drop", max_inflight_bytes=budget) as rec:
        train(model, rec, 30)
        deadline = time.monotonic() + 30
        while True:  # the writer commits what is in flight; the last commit counts every drop
            run = koopkit.open_store(url).run("r")
            if run.committed("params") + run.attrs["dropped"] == 31:
                break
            assert time.monotonic() < deadline, run.attrs
            time.sleep(0.05)
        assert run.status == "recording" and run.attrs["dropped"] > 0


def test_on_full_drop_never_waits_for_a_slow_write(memory_url, tiny_model, monkeypatch):
    """While the writer thread spends 0.5 s writing a chunk (holding the run), every
    rec.step returns at once: dropping is the point of on_full="drop"."""
    model = tiny_model()
    write = SeriesWriter._write

    def slow(self, steps, rows):
        time.sleep(0.5)
        return write(self, steps, rows)

    monkeypatch.setattr(SeriesWriter, "_write", slow)
    budget = 2 * row_bytes(model)
    with koopkit.Recorder(memory_url, "r", model, on_full="drop", max_inflight_bytes=budget) as rec:
        longest = 0.0
        for _ in range(40):
            start = time.monotonic()
            rec.step()
            longest = max(longest, time.monotonic() - start)
            time.sleep(0.005)
    assert koopkit.open_store(memory_url).run("r").attrs["dropped"] > 0
    assert longest < 0.25, longest  # not one step waited out a write


def test_on_full_block_loses_nothing(memory_url, tiny_model, monkeypatch):
    model = tiny_model()
    _slow_append(monkeypatch, 0.01)
    budget = 2 * row_bytes(model)
    start = time.monotonic()
    with koopkit.Recorder(memory_url, "r", model, max_inflight_bytes=budget) as rec:
        history = train(model, rec, 30)
        elapsed = time.monotonic() - start
    # 31 rows written 10 ms or more apart into two buffers: the loop waited for most
    assert 0.1 < rec.waited_s < elapsed, (rec.waited_s, elapsed)
    store = koopkit.open_store(memory_url)
    assert store.steps("r").tolist() == list(range(31))
    assert store.run("r").attrs["dropped"] == 0
    np.testing.assert_array_equal(
        np.asarray(store.array("r")), stacked(history, "params", range(31))
    )


def test_a_writer_that_keeps_up_costs_no_wait(memory_url, tiny_model):
    model = tiny_model()
    rec = koopkit.Recorder(memory_url, "r", model)
    assert rec.waited_s == 0.0  # not open yet
    with rec:
        train(model, rec, 30)
    assert rec.waited_s == 0.0  # eight buffers of 64 rows: never all in flight


def test_invalid_options_are_refused(memory_url, tiny_model):
    for kwargs in (
        {"on_full": "wait"},
        {"on_error": "ignore"},
        {"dtype": "int8"},
        {"every": 0},
        {"every": "often"},
        {"every": []},
        {"compressor": "lz4"},
    ):
        with pytest.raises(ValueError):
            koopkit.Recorder(memory_url, "r", tiny_model(), **kwargs)


@pytest.mark.parametrize("params", [None, 3, ["0.weight", 2]])
def test_params_of_another_kind_are_refused_in_one_line(tmp_path, tiny_model, params):
    with pytest.raises(ValueError, match=r"expected True, a regex string, a list of parameter"):
        koopkit.Recorder(tmp_path / "s.zarr", "r", tiny_model(), params=params).open()
    assert not (tmp_path / "s.zarr").exists()


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5)
        self.out.weight = self.emb.weight  # one tensor, two names


@pytest.mark.parametrize(
    "params, names",
    [
        ("out", ["emb.weight", "out.bias"]),
        (["out.weight"], ["emb.weight"]),
        (["out.bias", "emb.weight"], ["out.bias", "emb.weight"]),
    ],
)
def test_a_tied_parameter_is_chosen_by_any_of_its_names_and_recorded_once(
    memory_url, params, names
):
    model = Tied()
    with koopkit.Recorder(memory_url, "r", model, params=params):
        pass
    tensors = koopkit.open_store(memory_url).root["runs/r/params"].attrs["tensors"]
    assert [t["name"] for t in tensors] == names


def test_a_tied_parameter_named_twice_is_refused(memory_url):
    with pytest.raises(ValueError, match=r"name one parameter more than once \(tied"):
        koopkit.Recorder(memory_url, "r", Tied(), params=["emb.weight", "out.weight"]).open()


# --------------------------------------------------------------------------------------------
# write failures


class FailingMemoryFS(MemoryFileSystem):
    """An in-memory filesystem whose ``nth`` write after ``arm`` (only writes to paths that
    contain ``match``, if given) raises OSError; every write is counted in ``log``."""

    protocol = ("failmem",)
    store: dict = {}
    pseudo_dirs = [""]
    log: list = []
    counted = 0
    fail_at = None
    match = None

    @classmethod
    def arm(cls, nth=1, match=None):
        cls.counted, cls.fail_at, cls.match = 0, nth, match

    @classmethod
    def disarm(cls):
        cls.fail_at = None

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        cls = type(self)
        cls.log.append(path)
        if cls.fail_at is not None and (cls.match is None or cls.match in path):
            cls.counted += 1
            if cls.counted == cls.fail_at:
                raise OSError(28, "injected: no space left on device")
        return super().pipe_file(path, value, mode=mode, **kwargs)


@pytest.fixture
def failing_url(request):
    fsspec.register_implementation("failmem", FailingMemoryFS, clobber=True)
    FailingMemoryFS.disarm()
    url = f"failmem://{request.node.name.translate({ord('['): '-', ord(']'): None})}"  # no globs
    yield url
    FailingMemoryFS.disarm()
    FailingMemoryFS.log.clear()
    FailingMemoryFS.store.clear()
    FailingMemoryFS.pseudo_dirs[:] = [""]


def _check_committed(url, history):
    store = koopkit.open_store(url)
    steps = store.steps("r")
    assert np.all(np.diff(steps) == 1) and (steps.size == 0 or steps[0] == 0)
    np.testing.assert_array_equal(np.asarray(store.array("r")), stacked(history, "params", steps))
    assert validate_store(url)[0] == []
    return store


def _wait_committed(url, rows, timeout=10.0):
    """Wait until the writer thread has committed ``rows`` rows of params and gone quiet."""
    deadline = time.monotonic() + timeout
    while koopkit.open_store(url).run("r").committed("params") < rows:
        assert time.monotonic() < deadline, "the writer thread did not commit in time"
        time.sleep(0.01)
    if str(url).startswith("failmem://"):  # a commit may still be writing its last attributes
        seen = -1
        while seen != len(FailingMemoryFS.log):
            seen = len(FailingMemoryFS.log)
            time.sleep(0.1)


def _loop(model, rec, steps, history, g, opt):
    start = max(history["params"])
    for k in range(start + 1, start + steps + 1):
        model(torch.randn(4, 3, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        rec.step(loss=torch.tensor(float(k)))
        history["params"][k] = flat(model.parameters())


@pytest.mark.parametrize("nth", [1, 2, 3, 5])
def test_write_failure_raises_once_and_keeps_committed_rows(failing_url, tiny_model, nth):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = {"params": {0: flat(model.parameters())}}
    budget = 2 * row_bytes(model) * 2  # chunk_steps = 2
    with pytest.raises(WriteFailedError) as caught:
        with koopkit.Recorder(failing_url, "r", model, max_inflight_bytes=budget) as rec:
            _loop(model, rec, 6, history, g, opt)
            _wait_committed(failing_url, 6)
            FailingMemoryFS.arm(nth)
            _loop(model, rec, 40, history, g, opt)
    assert "injected" in str(caught.value)
    assert isinstance(caught.value, OSError)
    FailingMemoryFS.disarm()
    store = _check_committed(failing_url, history)
    assert store.steps("r").size >= 6  # everything committed before the failure is kept
    assert store.run("r").status == "interrupted"


@pytest.mark.parametrize("nth", [1, 2, 3, 4])
def test_a_store_that_refuses_writes_at_open_is_one_write_failed_error(
    failing_url, tiny_model, nth
):
    """A full disk while the store, the run or its first series is made: the same error as
    later in the run, and no run left half made."""
    FailingMemoryFS.arm(nth)
    with pytest.raises(WriteFailedError, match="injected"):
        koopkit.Recorder(failing_url, "r", tiny_model()).open()
    FailingMemoryFS.disarm()
    if FailingMemoryFS.store:  # the root was made: the store is valid, without the run
        assert validate_store(failing_url)[0] == []
        assert "r" not in koopkit.open_store(failing_url).runs


def test_write_failure_with_on_error_warn_lets_training_continue(failing_url, tiny_model):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = {"params": {0: flat(model.parameters())}}
    budget = 2 * row_bytes(model) * 2
    with pytest.warns(RuntimeWarning, match="stopped"):
        with koopkit.Recorder(
            failing_url, "r", model, max_inflight_bytes=budget, on_error="warn"
        ) as rec:
            _loop(model, rec, 6, history, g, opt)
            _wait_committed(failing_url, 6)
            FailingMemoryFS.arm(1)
            _loop(model, rec, 40, history, g, opt)  # all 40 steps run
    assert len(history["params"]) == 47
    FailingMemoryFS.disarm()
    store = _check_committed(failing_url, history)
    assert store.run("r").status == "interrupted"


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_write_failure_while_closing(failing_url, tiny_model, on_error):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = {"params": {0: flat(model.parameters())}}
    budget = 2 * row_bytes(model) * 2
    rec = koopkit.Recorder(failing_url, "r", model, max_inflight_bytes=budget, on_error=on_error)
    expect = (
        pytest.raises(WriteFailedError) if on_error == "raise" else pytest.warns(RuntimeWarning)
    )
    with expect:
        with rec:
            _loop(model, rec, 6, history, g, opt)  # one row (step 6) is still pending
            _wait_committed(failing_url, 6)
            FailingMemoryFS.arm(1)
    FailingMemoryFS.disarm()
    store = _check_committed(failing_url, history)
    assert store.run("r").status == "interrupted"


def test_write_failure_releases_sigterm_handler_and_optimizer_hook(failing_url, tiny_model):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    budget = 2 * row_bytes(model) * 2
    try:
        with pytest.raises(WriteFailedError):
            with koopkit.Recorder(failing_url, "r", model, max_inflight_bytes=budget) as rec:
                rec.attach(opt)
                FailingMemoryFS.arm(1)
                for _ in range(40):
                    opt.step()
        FailingMemoryFS.disarm()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        opt.step()  # training goes on without the recorder
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_each_commit_is_one_metadata_write(failing_url, tiny_model):
    """attrs.update would write the run's zarr.json once per key (16 PUTs on object storage)."""
    model = tiny_model()
    budget = 2 * row_bytes(model) * 4  # chunk_steps = 4
    with koopkit.Recorder(failing_url, "r", model, max_inflight_bytes=budget) as rec:
        for _ in range(63):
            rec.step()
    run_meta = sum(p.endswith("runs/r/zarr.json") for p in FailingMemoryFS.log)
    commits = 64 // 4
    assert run_meta <= commits + 4, f"{run_meta} writes of the run metadata for {commits} commits"


@pytest.mark.parametrize(
    "where", ["scalars/acc/zarr.json", "scalars/acc/value", "scalars/acc/step"]
)
def test_failure_while_creating_a_series_leaves_a_valid_store(failing_url, tiny_model, where):
    """The group, then its arrays: whichever write fails, what is left validates."""
    with pytest.raises(WriteFailedError):
        with koopkit.Recorder(failing_url, "r", tiny_model()) as rec:
            rec.step()
            FailingMemoryFS.arm(1, match=where)
            rec.log(acc=1.0)
    FailingMemoryFS.disarm()
    store = koopkit.open_store(failing_url)
    assert store.run("r").status == "interrupted"
    assert store.steps("r").tolist() == [0, 1]
    assert validate_store(failing_url)[0] == []


def _root_ignores_permissions(tmp_path) -> bool:
    probe = tmp_path / "perm-probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("x")
        return True
    except PermissionError:
        return False
    finally:
        probe.chmod(0o755)


def test_store_made_read_only_mid_run(tmp_path, tiny_model):
    if _root_ignores_permissions(tmp_path):
        pytest.skip("running as root: chmod cannot make the store read-only")
    url = tmp_path / "s.zarr"
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = {"params": {0: flat(model.parameters())}}
    budget = 2 * row_bytes(model) * 2
    paths = []
    try:
        with pytest.raises(WriteFailedError):
            with koopkit.Recorder(url, "r", model, max_inflight_bytes=budget) as rec:
                _loop(model, rec, 6, history, g, opt)
                _wait_committed(url, 6)
                paths = [url, *url.rglob("*")]
                for p in paths:
                    p.chmod(0o555 if p.is_dir() else 0o444)
                _loop(model, rec, 40, history, g, opt)
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    store = _check_committed(url, history)
    assert store.steps("r").size >= 6


# --------------------------------------------------------------------------------------------
# sketches


def _pairs(n, count, seed, structured=False):
    """Random pairs (half of them correlated); ``structured``: smooth, mostly positive vectors
    like real parameters, where only the sketch's own randomness can hide collisions."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    for i in range(count):
        if structured:
            x = (
                1
                + torch.sin(6.28 * (i + 1) * t) / 2
                + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
            )
            z = 1 + t + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        else:
            x = torch.randn(n, generator=g, dtype=torch.float64)
            z = torch.randn(n, generator=g, dtype=torch.float64)
        y = z if i % 2 else 0.6 * x + 0.8 * z
        yield x, y


def _sketch(method, k, n, seed, *tensors):
    out = torch.empty(k, dtype=torch.float64)
    return sk.make_sketch(method, k, n, seed, "cpu").project(list(tensors), out)


def _dot(a, b) -> float:
    # not a BLAS dot: alternating BLAS and OpenMP thread pools is slow on a busy small machine
    return float((a * b).sum())


def _inner_product_errors(method, n, k, count, structured, seed=1):
    """(error, variance bound 2|x|^2|y|^2/k, std sqrt((|x|^2|y|^2+<x,y>^2)/k)) per pair, each
    pair sketched with its own seed, so the errors sample the sketch's randomness."""
    out = []
    for i, (x, y) in enumerate(_pairs(n, count, seed, structured)):
        sx, sy = (
            _sketch(method, k, n, 1000 * seed + i, x),
            _sketch(method, k, n, 1000 * seed + i, y),
        )
        xx, yy, xy = _dot(x, x), _dot(y, y), _dot(x, y)
        out.append((_dot(sx, sy) - xy, 2 * xx * yy / k, math.sqrt((xx * yy + xy**2) / k)))
    return np.array(out).T


@pytest.mark.parametrize(
    "method, n, k, count",
    [
        ("countsketch", 20_000, 256, 200),
        ("gaussian", 2_000, 128, 100),
    ],
)
def test_sketch_inner_product_error_is_within_the_jl_bound(method, n, k, count):
    errors, bounds, _ = _inner_product_errors(method, n, k, count, structured=False)
    ratio = np.mean(errors**2) / np.mean(bounds)
    # Var <= (|x|^2|y|^2 + <x,y>^2)/k <= bound; for these vectors it is about 0.6 of the bound
    assert 0.15 < ratio < 1.2, ratio
    # unbiased: the mean error is small against its standard error
    assert abs(errors.mean()) < 4 * np.sqrt(np.mean(bounds) / len(errors))


@pytest.mark.parametrize(
    "method, n, k",
    [
        ("countsketch", 20_000, 256),
        ("gaussian", 2_000, 128),
    ],
)
def test_sketch_keeps_inner_products_of_structured_vectors(method, n, k):
    errors, bounds, std = _inner_product_errors(method, n, k, 60, structured=True)
    assert np.mean(errors**2) < 1.2 * np.mean(bounds)
    assert abs(errors.mean()) < 4 * np.sqrt(np.mean(bounds) / len(errors))
    assert np.mean(np.abs(errors) <= 4 * std) >= 0.95


def test_countsketch_k4096_n100000_errors_within_four_std():
    errors, _, std = _inner_product_errors(
        "countsketch", 100_000, 4096, 40, structured=False, seed=2
    )
    assert np.mean(np.abs(errors) <= 4 * std) >= 0.9


def test_countsketch_uses_every_bucket_with_random_signs_within_a_bucket():
    n, k = 4096, 64
    for seed in range(8):
        buckets, signs = sk.make_sketch("countsketch", k, n, seed, "cpu")._buckets_and_signs(0, n)
        assert len(buckets.unique()) == k
        # within one bucket, both signs occur
        for b in range(4):
            assert len(signs[buckets == b].unique()) == 2


@pytest.mark.parametrize("method", sk.METHODS)
def test_sketch_is_seeded_linear_and_accumulates_per_tensor(method):
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(4, 5, generator=g, dtype=torch.float64),
        torch.randn(7, generator=g, dtype=torch.float64),
    )
    n, k = 27, 8
    x = torch.cat([a.reshape(-1), b])
    y = torch.randn(n, generator=g, dtype=torch.float64)
    s0 = _sketch(method, k, n, 0, x)
    assert torch.equal(s0, _sketch(method, k, n, 0, x))
    assert not torch.equal(s0, _sketch(method, k, n, 1, x))
    torch.testing.assert_close(
        _sketch(method, k, n, 0, 2 * x - 3 * y),
        2 * s0 - 3 * _sketch(method, k, n, 0, y),
        rtol=1e-12,
        atol=1e-12,
    )
    torch.testing.assert_close(_sketch(method, k, n, 0, a, b), s0, rtol=1e-13, atol=1e-13)


def test_countsketch_hashing_on_the_fly_equals_cached_tables(monkeypatch):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cached = _sketch("countsketch", 32, 1000, 5, x)
    monkeypatch.setattr(sk, "_TABLE_LIMIT", 10)
    sketch = sk.make_sketch("countsketch", 32, 1000, 5, "cpu")
    assert sketch._tables is None
    torch.testing.assert_close(sketch.project([x], torch.empty(32, dtype=torch.float64)), cached)


def test_countsketch_is_a_signed_bucket_map_rotating_each_tile():
    n, k = 500, 16
    sketch = sk.make_sketch("countsketch", k, n, 3, "cpu")
    matrix = torch.stack([sketch.project([e], torch.empty(k)) for e in torch.eye(n)], dim=1)
    assert set(matrix.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.all((matrix != 0).sum(dim=0) == 1)  # each coordinate lands in exactly one bucket
    buckets = (matrix != 0).int().argmax(dim=0)
    rotations = set()
    for start in range(0, n, k):  # coordinate t * k + j lands in bucket (j + a_t) mod k
        tile = buckets[start : start + k]
        rotation = int(tile[0])
        assert tile.tolist() == [(j + rotation) % k for j in range(len(tile))]
        rotations.add(rotation)
    assert len(rotations) >= k // 2  # the rotations are drawn, not fixed (expected ~14 of 16)
    signs = matrix.sum(dim=0)
    assert 0.4 < (signs > 0).float().mean() < 0.6


def test_recorder_sketch_on_cpu_projects_off_the_training_thread(
    memory_url, tiny_model, projection_beside
):
    """The training thread only copies; a failed projection is reported at a later step."""
    model = tiny_model()
    threads = set()
    with koopkit.Recorder(memory_url, "r", model, sketch=8, max_inflight_bytes=256) as rec:
        project = rec._sketcher.project

        def spy(tensors, out):
            threads.add(threading.current_thread().name)
            return project(tensors, out)

        rec._workers["params"].project = spy
        train(model, rec, 3)
    assert threads and all(name.startswith("koopkit-sketch") for name in threads)

    def broken(tensors, out):
        raise RuntimeError("projection failed")

    with pytest.raises(WriteFailedError, match="projection failed"):
        with koopkit.Recorder(memory_url, "r2", model, sketch=8, max_inflight_bytes=256) as rec:
            rec._workers["params"].project = broken
            train(model, rec, 50)
    assert koopkit.open_store(memory_url).run("r2").status == "interrupted"


@pytest.mark.parametrize("on_full", ["drop", "block"])
def test_a_busy_cpu_projection_drops_the_snapshot_when_on_full_is_drop(
    memory_url, tiny_model, projection_beside, on_full
):
    """on_full="drop" never waits: not for a buffer, nor for the projection of the last step."""
    model = tiny_model()
    release = threading.Event()
    with koopkit.Recorder(memory_url, "r", model, sketch=8, on_full=on_full) as rec:
        project = rec._sketcher.project

        def slow(tensors, out):
            release.wait(timeout=1.0 if on_full == "block" else 30.0)
            return project(tensors, out)

        rec._workers["params"].barrier().synchronize()  # step 0 projected
        rec._workers["params"].project = slow
        rec.step()  # step 1 queued, its projection held
        rec.step()  # step 2: dropped, or waits up to a second for step 1's projection
        release.set()
        waited = rec.waited_s
    run = koopkit.open_store(memory_url).run("r")
    if on_full == "drop":
        assert waited < 0.5 and run.attrs["dropped"] == 1
        assert read(memory_url)[0].tolist() == [0, 1]
    else:
        assert waited > 0.5 and run.attrs["dropped"] == 0
        assert read(memory_url)[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("grads", [False, True])
def test_without_a_free_core_the_step_projects_and_stores_the_same(
    memory_url, tiny_model, monkeypatch, grads
):
    from koopkit.record import recorder

    stored = {}
    for beside in (True, False):
        monkeypatch.setattr(recorder, "a_core_is_free", lambda beside=beside: beside)
        model, run = tiny_model(), f"beside-{beside}"
        with koopkit.Recorder(memory_url, run, model, sketch=8, grads=grads) as rec:
            assert (rec._workers["params"].pool is not None) is beside
            train(model, rec, 5)
        tree = koopkit.open_run(memory_url, run)
        series = ("params", "grads") if grads else ("params",)
        stored[beside] = {s: tree[s].to_dataset()["value"].values for s in series}
    for series in stored[True]:
        assert stored[True][series].shape == (6, 8)  # the initial snapshot and 5 steps
        assert np.abs(stored[True][series][1:]).min() > 0
        np.testing.assert_array_equal(stored[True][series], stored[False][series])


@pytest.mark.parametrize("beside", [True, False])
def test_a_failed_cpu_projection_fails_the_run_inside_or_beside_the_step(
    memory_url, tiny_model, monkeypatch, beside
):
    from koopkit.record import recorder

    monkeypatch.setattr(recorder, "a_core_is_free", lambda: beside)

    def broken(tensors, out):
        raise RuntimeError("projection failed")

    model = tiny_model()
    with pytest.raises(WriteFailedError, match="projection failed"):
        with koopkit.Recorder(memory_url, "r", model, sketch=8, max_inflight_bytes=256) as rec:
            rec._workers["params"].project = broken
            train(model, rec, 50)
    assert koopkit.open_store(memory_url).run("r").status == "interrupted"


def test_a_core_is_free_only_when_torch_leaves_one(one_torch_thread):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    assert not transfer.a_core_is_free()
    if cores > 1:
        torch.set_num_threads(cores - 1)
        assert transfer.a_core_is_free()


def test_waiting_for_a_slow_cpu_projection_counts_in_waited_s(
    memory_url, tiny_model, projection_beside
):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, sketch=8) as rec:
        project = rec._sketcher.project

        def slow(tensors, out):
            time.sleep(0.02)
            return project(tensors, out)

        rec._workers["params"].project = slow
        start = time.monotonic()
        train(model, rec, 10)  # 11 projections of 20 ms behind one input
        elapsed = time.monotonic() - start
    assert 0.1 < rec.waited_s < elapsed, (rec.waited_s, elapsed)


def test_params_and_grads_sketches_project_independently(memory_url, tiny_model, projection_beside):
    """Each series has its own projection input: the grads copy never waits for params'."""
    model = tiny_model()
    release, stepped = threading.Event(), threading.Event()
    with koopkit.Recorder(memory_url, "r", model, sketch=8, grads=True, initial=False) as rec:
        params = rec._workers["params"]
        assert params is not rec._workers["grads"]
        project = params.project

        def held(tensors, out):
            release.wait(30)
            return project(tensors, out)

        params.project = held
        trainer = threading.Thread(target=lambda: (train(model, rec, 1), stepped.set()))
        trainer.start()
        try:
            assert stepped.wait(10), "the grads copy waited for the params projection"
        finally:
            release.set()
            trainer.join()
    history = koopkit.open_store(memory_url).run("r")
    assert history.committed("params") == history.committed("grads") == 1


@pytest.mark.parametrize("method", sk.METHODS)
def test_float16_sketch_is_the_rounded_float32_sketch(memory_url, tiny_model, method):
    """The projection sums in float32 and rounds once, not term by term in float16 (the
    Gaussian sketch used to round the parameters and its matrix to float16 first)."""
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    with koopkit.Recorder(
        memory_url, "r", model, sketch=4, sketch_method=method, dtype="float16"
    ) as rec:
        history = train(model, rec, 3)
    values = np.asarray(koopkit.open_store(memory_url).array("r"))
    assert values.dtype == np.float16
    sketch = sk.make_sketch(method, 4, n, 0, "cpu")
    for step in range(4):
        params = torch.from_numpy(history["params"][step])
        wide = sketch.project([params], torch.empty(4))
        np.testing.assert_array_equal(values[step], wide.half().numpy())
    rounded = sketch.project([torch.from_numpy(history["params"][3])], torch.empty(4).half())
    np.testing.assert_array_equal(rounded.numpy(), values[3])


def test_projection_worker_frees_its_input_when_a_copy_fails():
    worker = transfer.ProjectionWorker(10, torch.float32, lambda tensors, out: out.zero_())
    try:
        with pytest.raises(ValueError, match="Expected 10 values"):
            worker.submit([torch.zeros(11)], torch.empty(4))  # does not fit the input
        assert worker.input_free.acquire(blocking=False)  # not held: the next snapshot proceeds
        worker.input_free.release()
        row = torch.full((4,), 7.0)
        worker.submit([torch.ones(10)], row)
        worker.barrier().synchronize()
        assert torch.equal(row, torch.zeros(4))
    finally:
        worker.close()


def test_flatten_into_keeps_order_and_dtypes_and_refuses_a_wrong_size():
    tensors = [torch.arange(6.0).reshape(2, 3), torch.tensor([0.5, -1.5], dtype=torch.bfloat16)]
    row = torch.full((8,), 7.0)
    transfer.flatten_into(row, tensors)
    assert row.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, -1.5]
    wide = torch.full((9,), 7.0)
    with pytest.raises(ValueError, match="Expected 9 values to fill a row; got 8"):
        transfer.flatten_into(wide, tensors)
    assert wide.shape == (9,)  # not resized to fit


def test_flattener_makes_its_views_once_and_fills_like_flatten_into():
    tensors = [torch.arange(6.0).reshape(2, 3), torch.tensor([0.5, -1.5], dtype=torch.bfloat16)]
    row, flatten = torch.full((8,), 7.0), transfer.Flattener()
    flatten(row, tensors)
    assert row.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, -1.5]
    views = flatten.views
    tensors[0].mul_(-1)  # a step updates the parameters in place
    flatten(row, tensors)
    assert flatten.views is views  # same destination and layout: no new views
    assert row.tolist() == [0.0, -1.0, -2.0, -3.0, -4.0, -5.0, 0.5, -1.5]
    other = torch.zeros(8)
    flatten(other, tensors)  # another destination: views of it
    assert torch.equal(other, row) and flatten.views is not views
    reshaped = [tensors[0].reshape(3, 2), tensors[1]]  # same sizes, another layout
    flatten(other, reshaped)
    assert [tuple(v.shape) for v in flatten.views] == [(3, 2), (2,)]
    with pytest.raises(ValueError, match="Expected 8 values to fill a row; got 7"):
        flatten(row, [tensors[0], tensors[1][:1]])
    flatten(row, tensors)  # the refused call left nothing half-planned
    assert row.tolist() == [0.0, -1.0, -2.0, -3.0, -4.0, -5.0, 0.5, -1.5]


def test_flattener_copies_odd_sources_on_their_own_and_all_values_right():
    """Sources of another dtype or other strides than the views (a channels_last weight)
    are copied one by one; the rest in one foreach copy. The values come out the same."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(2, 3, generator=g),
        torch.randn(2, 3, 2, 2, generator=g).to(memory_format=torch.channels_last),
        torch.randn(4, generator=g).to(torch.bfloat16),
        torch.randn(3, 2, generator=g).t(),  # transposed
        torch.randn(5, generator=g),
        torch.tensor(2.5),  # 0-d
        torch.zeros(0),
    ]
    n = sum(t.numel() for t in tensors)
    out, flatten = torch.full((n,), 9.0), transfer.Flattener()
    flatten(out, tensors)
    assert torch.equal(out, torch.cat([t.reshape(-1).float() for t in tensors]))
    assert flatten.together == [0, 4, 5, 6] and flatten.alone == [1, 2, 3]
    for t in tensors:
        t.add_(1)
    flatten(out, tensors)
    assert torch.equal(out, torch.cat([t.reshape(-1).float() for t in tensors]))


class _ReferenceKernel:
    """Stands in for the Triton module on a CPU: the torch reference, launch by launch."""

    def __init__(self, reference):
        self.reference, self.launches = reference, []

    def supports(self, out):
        return out.dtype == torch.float32

    def accumulate(self, flat, offset, out, tile_offsets, tile_keys):
        self.launches.append((offset, flat.numel(), flat.data_ptr()))
        self.reference._accumulate(flat, offset, out)


def test_fused_countsketch_groups_small_tensors_into_one_launch_each(monkeypatch):
    """The fused path's plan, checked on a CPU: runs of small tensors copied into the reused
    buffer, large ones sketched where they lie, the plan made once per layout."""
    monkeypatch.setattr(sk, "_GROUP", 8)
    g = torch.Generator().manual_seed(0)
    sizes = [3, 4, 2, 9, 1, 1]  # runs: [3, 4] | [2] | [9] | [1, 1]
    tensors = [torch.randint(-4, 5, (n,), generator=g).float() for n in sizes]
    tensors[1] = tensors[1].reshape(2, 2).to(torch.bfloat16)
    n, k = sum(sizes), 5
    fused, reference = sk.CountSketch(k, n, seed=2), sk.CountSketch(k, n, seed=2)
    kernel = fused._fused = _ReferenceKernel(reference)
    expected = reference.project(tensors, torch.zeros(k))
    got = fused.project(tensors, torch.zeros(k))
    assert torch.equal(got, expected)  # small integers: every sum is exact
    buffer = fused._buffer.data_ptr()
    assert kernel.launches == [
        (0, 7, buffer),
        (7, 2, tensors[2].data_ptr()),
        (9, 9, tensors[3].data_ptr()),
        (18, 2, buffer),
    ]
    groups = fused._groups
    tensors[0].mul_(3)  # in place, as an optimizer step
    got = fused.project(tensors, torch.zeros(k))
    assert fused._groups is groups  # same layout: the plan is reused
    assert torch.equal(got, reference.project(tensors, torch.zeros(k)))
    with pytest.raises(ValueError, match=f"Expected {n} coordinates to sketch; got {n - 1}"):
        fused.project([*tensors[:-1], tensors[-1][:0]], torch.zeros(k))
    assert fused._groups is groups  # a refused layout does not replace the plan


def test_countsketch_graphs_only_tensors_it_sketches_without_a_copy(monkeypatch):
    """A tensor sketched on its own (large, or a small one the next would overflow the group
    after) is flattened in place if contiguous, into a temporary (which a CUDA graph's pool
    would keep) if not; tensors in a group are copied into the buffer, strided or not."""
    monkeypatch.setattr(sk, "_GROUP", 8)
    sketch = sk.CountSketch(4, 46, seed=0)
    grouped, alone, large = torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(4, 8)
    # groups: [grouped.t(), 2 more] | [alone] | [large]
    assert sketch.capturable([grouped.t(), torch.zeros(2), torch.zeros(2), alone, large])
    assert not sketch.capturable([grouped, torch.zeros(2), torch.zeros(2), alone.t(), large])
    assert not sketch.capturable([grouped, torch.zeros(2), torch.zeros(2), alone, large.t()])


def test_a_new_cuda_stream_waits_for_every_series_last_fill(monkeypatch):
    """Checked on a CPU with stand-in streams: the sketch's group buffer is shared by the
    params and grads fills, so a loop that changes streams orders them across the change."""
    from types import SimpleNamespace

    waits, current = [], [None]

    class Stream:
        def __init__(self, handle):
            self.cuda_stream = handle

        def wait_event(self, event):
            waits.append((self.cuda_stream, event))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: current[0])
    series = {"params": SimpleNamespace(filled="p"), "grads": SimpleNamespace(filled="g")}
    rec = SimpleNamespace(device="cuda:0", _vectors=series, _fill_stream=None)
    for handle in (1, 1, 2, 2, 1):
        current[0] = Stream(handle)
        koopkit.Recorder._follow_stream(rec)
    assert waits == [(1, "p"), (1, "g"), (2, "p"), (2, "g"), (1, "p"), (1, "g")]


def test_failed_open_closes_the_projection_worker(
    memory_url, tiny_model, projection_beside, monkeypatch
):
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, sketch=8, probes={"p": torch.zeros(2, 3)}):
        pass
    closed = []
    monkeypatch.setattr(transfer.ProjectionWorker, "close", lambda self: closed.append(self))
    # the params series (and its worker) opens, then the probe's stored rows do not fit
    with pytest.raises(ShapeChangedError, match="probes/p"):
        koopkit.Recorder(memory_url, "r", model, sketch=8, probes={"p": torch.zeros(3, 3)}).open()
    assert len(closed) == 1


def test_countsketch_map_is_made_once_when_two_threads_project(monkeypatch):
    """Params and grads project on two threads; the first use must not build the map twice."""
    sketch = sk.make_sketch("countsketch", 8, 100, 0, "cpu")
    made, build = [], sketch._csr

    def slow_build(dtype):
        made.append(dtype)
        time.sleep(0.2)
        return build(dtype)

    monkeypatch.setattr(sketch, "_csr", slow_build)
    x = torch.randn(100)
    outs = [torch.empty(8), torch.empty(8)]
    threads = [threading.Thread(target=sketch.project, args=([x], out)) for out in outs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert made == [torch.float32]
    assert torch.equal(outs[0], outs[1])


def test_countsketch_caches_its_map_on_first_use_and_checks_the_size():
    sketch = sk.make_sketch("countsketch", 8, 100, 0, "cpu")
    assert sketch._matrices == {}
    x = torch.randn(100)
    first = sketch.project([x], torch.empty(8))
    matrix = sketch._matrices[torch.float32]
    assert torch.equal(sketch.project([x], torch.empty(8)), first)
    assert sketch._matrices == {torch.float32: matrix}
    with pytest.raises(ValueError, match="Expected 100 coordinates"):
        sketch.project([x[:99]], torch.empty(8))


def test_countsketch_matrix_on_cpu_equals_the_scatter_of_its_tables():
    """The CPU map (CSR) and the tables other devices scatter with are one map: partial
    last tiles, k above n, k not dividing n."""
    g = torch.Generator().manual_seed(1)
    for n, k, seed in [(1000, 32, 5), (1000, 7, 1), (5, 16, 2), (4096, 4096, 3), (10007, 64, 9)]:
        x = torch.randint(-4, 5, (n,), generator=g).double()  # small integers: exact sums
        sketch = sk.CountSketch(k, n, seed)
        scattered = torch.zeros(k, dtype=torch.float64)
        sketch._accumulate(x, 0, scattered)  # the tables' path
        assert torch.equal(sketch.project([x], torch.empty(k, dtype=torch.float64)), scattered)


def test_close_frees_the_host_buffers_without_the_garbage_collector(
    memory_url, tiny_model, projection_beside
):
    model = tiny_model()
    rec = koopkit.Recorder(memory_url, "r", model, sketch=8).open()
    buffers = [weakref.ref(b) for s in rec._vectors.values() for b in [s.current]]
    worker = weakref.ref(rec._workers["params"])
    gc.disable()
    try:
        rec.close()
        assert all(b() is None for b in buffers) and worker() is None
    finally:
        gc.enable()


def test_make_sketch_refuses_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        sk.make_sketch("srht", 8, 10, 0, "cpu")
    for dim in (0, -3, 2.5):
        with pytest.raises(ValueError, match="sketch"):
            sk.make_sketch("countsketch", dim, 10, 0, "cpu")


@pytest.mark.parametrize("method", sk.METHODS)
def test_recorder_with_sketch_stores_the_projection(memory_url, tiny_model, method):
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    with koopkit.Recorder(
        memory_url, "r", model, sketch=16, sketch_method=method, seed=7, grads=True
    ) as rec:
        history = train(model, rec, 4)
    store = koopkit.open_store(memory_url)
    attrs = store.root["runs/r/params"].attrs.asdict()
    assert attrs["kind"] == "sketch"
    assert attrs["sketch"] == {
        "method": method,
        "dim": 16,
        "seed": 7,
        "hash": sk.make_sketch(method, 16, n, 7, "cpu").hash,
    }
    assert attrs["source_size"] == n
    values = np.asarray(store.array("r"))
    assert values.shape == (5, 16)
    sketch = sk.make_sketch(method, 16, n, 7, "cpu")
    for s in range(5):
        expected = sketch.project([torch.from_numpy(history["params"][s])], torch.empty(16))
        np.testing.assert_allclose(values[s], expected.numpy(), rtol=1e-5, atol=1e-6)
    grads = np.asarray(store.array("r", "grads"))
    expected = sketch.project([torch.from_numpy(history["grads"][3])], torch.empty(16))
    np.testing.assert_allclose(grads[3], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert validate_store(memory_url)[0] == []


def test_resuming_with_another_sketch_is_refused(memory_url, tiny_model):
    """Same width, other seed, method or hash: the new rows would be another projection."""
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, sketch=8, seed=1) as rec:
        train(model, rec, 2)
    with koopkit.Recorder(memory_url, "r", model, sketch=8, seed=1, start_step=2) as rec:
        rec.step()  # the same sketch: resumes with step 3
    for kwargs in ({"seed": 2}, {"seed": 1, "sketch_method": "gaussian"}):
        with pytest.raises(ShapeChangedError, match="recorded with sketch"):
            koopkit.Recorder(memory_url, "r", model, sketch=8, **kwargs).open()
    run = koopkit.open_store(memory_url).run("r")
    assert run.committed("params") == 4 and validate_store(memory_url)[0] == []


def test_negative_sketch_seed_is_refused(memory_url, tiny_model):
    """A negative seed would be written as sketch.seed, which the series schema forbids."""
    with pytest.raises(ValueError, match="seed"):
        koopkit.Recorder(memory_url, "r", tiny_model(), sketch=8, seed=-1).open()
    with pytest.raises(ValueError, match="seed"):
        sk.make_sketch("countsketch", 8, 10, -1, "cpu")
    # the refusal released the run
    with koopkit.Recorder(memory_url, "r", tiny_model(), sketch=8, seed=1):
        pass
    assert validate_store(memory_url)[0] == []


# --------------------------------------------------------------------------------------------
# schedules


def test_every_n():
    s = sched.every_n(3)
    assert [k for k in range(13) if k in s] == [0, 3, 6, 9, 12]
    assert s.to_json() == {"kind": "every", "n": 3}
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(ValueError):
            sched.every_n(bad)


def test_at_steps():
    s = sched.at_steps([7, 1, 1, 3])
    assert [k for k in range(10) if k in s] == [1, 3, 7]
    assert s.to_json() == {"kind": "steps", "steps": [1, 3, 7]}
    for bad in ([], [-1, 2]):
        with pytest.raises(ValueError):
            sched.at_steps(bad)


@pytest.mark.parametrize("per_decade", [1, 2, 3, 7, 10, 20, 50])
def test_log_spaced_membership_matches_the_grid(per_decade):
    s = sched.log_spaced(per_decade)
    limit = 20_000
    grid = {0} | {round(10 ** (j / per_decade)) for j in range(0, 5 * per_decade + 1)}
    grid = {g for g in grid if g <= limit}
    assert {k for k in range(limit + 1) if k in s} == grid
    assert s.to_json() == {"kind": "log", "per_decade": per_decade, "start": 0}


def test_log_spaced_refuses_bad_density():
    with pytest.raises(ValueError):
        sched.log_spaced(0)


def test_log_steps_examples():
    assert sched.log_steps(0, 5) == [0]
    assert sched.log_steps(1, 5) == [0, 1]
    steps = sched.log_steps(1000, 10)
    assert steps[0] == 0 and steps[-1] == 1000 and 1 in steps
    ratios = np.array(steps[2:]) / np.array(steps[1:-1])
    assert np.allclose(ratios[-4:], 1000 ** (1 / 9), rtol=0.1)
    assert koopkit.log_steps is sched.log_steps


@settings(max_examples=100, deadline=None)
@given(stop=st.integers(0, 10**7), num=st.integers(1, 300))
def test_log_steps_properties(stop, num):
    steps = sched.log_steps(stop, num)
    assert steps[0] == 0 and steps[-1] == stop
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
    assert len(steps) <= num + 2
    assert all(isinstance(s, int) for s in steps)


def test_log_steps_as_a_recorder_schedule(memory_url, tiny_model):
    steps = sched.log_steps(20, 6)
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model, every=steps) as rec:
        history = train(model, rec, 20)
    got, values = read(memory_url)
    assert got.tolist() == steps
    np.testing.assert_array_equal(values, stacked(history, "params", steps))


def test_make_schedule():
    s = sched.log_spaced(4)
    assert sched.make_schedule(s) is s
    assert sched.make_schedule(2).n == 2
    assert sched.make_schedule(range(0, 10, 5)).steps == frozenset({0, 5})
    with pytest.raises(ValueError):
        sched.make_schedule("1")
    with pytest.raises(ValueError):
        sched.make_schedule(None)


# --------------------------------------------------------------------------------------------
# CUDA: device buffer, pinned ring buffer, side stream and events

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("every", [1, 3])
def test_cuda_round_trip_bit_for_bit(memory_url, tiny_model, every):
    """Snapshots copied asynchronously on a side stream equal the parameters of their step,
    even though training keeps changing them in place right after each ``rec.step``."""
    model = tiny_model().cuda()
    inputs = torch.randn(6, 3, generator=torch.Generator().manual_seed(5)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    budget = 2 * row_bytes(model) * 4  # chunk_steps = 4, two pinned buffers: constant reuse
    kept = {"params": {}, "grads": {}, "outputs": {}, "losses": {}}

    def keep(k):  # device-side clones only: the loop never waits for the GPU
        kept["params"][k] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        kept["grads"][k] = torch.cat(
            [
                (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                for p in model.parameters()
            ]
        ).clone()
        with torch.no_grad():
            model.eval()
            kept["outputs"][k] = model(inputs).clone()
            model.train()

    g = torch.Generator(device="cuda").manual_seed(0)
    with koopkit.Recorder(
        memory_url,
        "r",
        model,
        every=every,
        grads=True,
        probes={"p": Probe(inputs)},
        max_inflight_bytes=budget,
    ) as rec:
        keep(0)
        for k in range(1, 41):
            loss = model(torch.randn(4096, 3, device="cuda", generator=g)).pow(2).mean()
            loss.backward()
            opt.step()
            keep(k)
            rec.step(loss=loss)
            kept["losses"][k - 1] = loss.detach().clone()
            opt.zero_grad()
    params, grads, outputs = (
        {k: v.float().cpu().numpy() for k, v in kept[key].items()}
        for key in ("params", "grads", "outputs")
    )
    losses = {k: np.float32(v.item()) for k, v in kept["losses"].items()}
    steps = [k for k in range(41) if k % every == 0]
    store = koopkit.open_store(memory_url)
    assert store.run("r").attrs["device"].startswith("cuda")
    assert store.steps("r").tolist() == steps
    np.testing.assert_array_equal(
        np.asarray(store.array("r")), np.stack([params[k] for k in steps])
    )
    np.testing.assert_array_equal(
        np.asarray(store.array("r", "grads")), np.stack([grads[k] for k in steps])
    )
    np.testing.assert_array_equal(
        np.asarray(store.array("r", "probes/p")), np.stack([outputs[k] for k in steps])
    )
    np.testing.assert_array_equal(
        np.asarray(store.array("r", "scalars/loss")), [losses[k] for k in range(40)]
    )
    assert validate_store(memory_url)[0] == []


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("grads_to_none", [True, False])
def test_cuda_sketches_every_step_equal_the_sketches_of_each_step(
    memory_url, tiny_model, grads_to_none
):
    """Sketched every step (on the fused kernel, replayed as a CUDA graph once the addresses
    repeat), params and grads equal the CPU sketch of each step's vectors, whether the
    gradients are freed and allocated anew at each step or zeroed in place."""
    model = tiny_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n = sum(p.numel() for p in model.parameters())
    kept = {"params": [], "grads": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    with koopkit.Recorder(memory_url, "r", model, every=1, grads=True, sketch=8, seed=2) as rec:
        for _ in range(12):
            model(torch.randn(64, 3, device="cuda", generator=g)).pow(2).mean().backward()
            opt.step()
            kept["params"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
            kept["grads"].append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            rec.step()
            opt.zero_grad(set_to_none=grads_to_none)
        graphs = {path: rec._fillers[path].keywords["project"] for path in ("params", "grads")}
        if rec._sketcher.graphable(torch.float32):
            assert graphs["params"].graph is not None  # the replay is what was checked
    cpu = sk.make_sketch("countsketch", 8, n, 2, "cpu")
    store = koopkit.open_store(memory_url)
    for key in ("params", "grads"):
        expected = [cpu.project([v.cpu()], torch.empty(8)).numpy() for v in kept[key]]
        stored = np.asarray(store.array("r", key))[1:]
        np.testing.assert_allclose(stored, np.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "method",
    [
        "countsketch",
        "gaussian",
    ],
)
def test_cuda_sketch_matches_the_cpu_sketch(memory_url, tiny_model, method):
    """The sketch is a function of (method, dim, seed) alone, whatever the device."""
    model = tiny_model().cuda()
    n = sum(p.numel() for p in model.parameters())
    with koopkit.Recorder(memory_url, "r", model, sketch=16, sketch_method=method, seed=3):
        pass
    stored = np.asarray(koopkit.open_store(memory_url).array("r"))[0]
    cpu = sk.make_sketch(method, 16, n, 3, "cpu").project(
        [p.detach().cpu() for p in model.parameters()], torch.empty(16)
    )
    np.testing.assert_allclose(stored, cpu.numpy(), rtol=1e-5, atol=1e-6)


def test_a_relative_store_path_stays_where_it_was_opened(tmp_path, monkeypatch, tiny_model):
    """A training script may chdir after opening the Recorder; its rows must not follow."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    with koopkit.Recorder("runs.zarr", "r", model, flush_every_s=None) as rec:
        monkeypatch.chdir(tmp_path / "sub")
        train(model, rec, 5)
    assert list((tmp_path / "sub").iterdir()) == []
    assert read(str(tmp_path / "runs.zarr"))[0].tolist() == list(range(6))
