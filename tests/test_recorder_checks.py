"""The Recorder's arguments: refused with one clear line before the run exists, so a bad
call creates nothing and a failed open never blocks the run id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import koopkit
from koopkit.errors import InvalidRunIdError, NotAStoreError, ShapeChangedError
from koopkit.record import recorder as recorder_module
from koopkit.record import schedule as sched
from koopkit.store import writer as writer_module
from koopkit.store.validate import validate_store
from koopkit.store.writer import RunWriter, SeriesSpec

Probe = recorder_module.Probe


pytestmark = pytest.mark.usefixtures("one_torch_thread", "restore_sigterm")


def assert_nothing_created(url):
    with pytest.raises(NotAStoreError):
        koopkit.open_store(url)


def record_one_step(url, model, run="r", **kwargs):
    with koopkit.Recorder(url, run, model, **kwargs) as rec:
        rec.step(loss=torch.tensor(1.0))
    return koopkit.open_store(url)


# --------------------------------------------------------------------------------------------
# sketch, start_step, every


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sketch": 0}, "sketch=0"),
        ({"sketch": -4}, "sketch=-4"),
        ({"sketch": True}, "sketch=True"),
        ({"sketch": 2.5}, "sketch=2.5"),
        ({"sketch": "8"}, "sketch='8'"),
        ({"sketch": 8, "sketch_method": "srht"}, "sketch_method='srht'"),
        ({"sketch_method": "srht"}, "sketch_method='srht'"),
        ({"sketch": 8, "seed": 1.5}, "seed=1.5"),
        ({"start_step": -3}, "start_step=-3"),
        ({"start_step": True}, "start_step=True"),
        ({"start_step": 2.0}, "start_step=2.0"),
        ({"params": ["0.weight", "0.weight"]}, "more than once"),
        ({"max_inflight_bytes": 0}, "max_inflight_bytes=0"),
        ({"max_inflight_bytes": 2.5e8}, "max_inflight_bytes=250000000.0"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_arguments_are_refused_before_anything_is_written(
    memory_url, tiny_model, kwargs, match
):
    with pytest.raises(ValueError, match=match):
        koopkit.Recorder(memory_url, "r", tiny_model(), **kwargs).open()
    assert_nothing_created(memory_url)


def test_a_model_on_the_meta_device_is_refused_before_anything_is_written(memory_url, tiny_model):
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"'weight', 'bias' are on the meta device"):
        koopkit.Recorder(memory_url, "r", model).open()
    assert_nothing_created(memory_url)


def test_sketch_zero_is_not_the_full_parameters(memory_url, tiny_model):
    """``sketch=0`` used to record the raw parameters, as if no sketch had been asked for."""
    with pytest.raises(ValueError, match="sketch"):
        koopkit.Recorder(memory_url, "r", tiny_model(), sketch=0)
    store = record_one_step(memory_url, tiny_model(), sketch=np.int64(4))
    assert store.root["runs/r/params"].attrs["kind"] == "sketch"
    assert store.root["runs/r/params/value"].shape == (2, 4)


def test_numpy_integers_are_accepted_where_ints_are(memory_url, tiny_model):
    store = record_one_step(memory_url, tiny_model(), every=np.int64(1), start_step=np.int64(5))
    assert store.steps("r").tolist() == [5, 6]
    assert store.run("r").attrs["every"] == {"kind": "every", "n": 1}
    assert validate_store(memory_url)[0] == []


def test_schedules_take_numpy_integers_and_refuse_fractions():
    assert sched.make_schedule(np.int64(5)) == sched.every_n(5)
    assert sched.make_schedule(np.arange(0, 9, 4)).steps == frozenset({0, 4, 8})
    assert sched.at_steps([0, 3.0]).steps == frozenset({0, 3})
    assert sched.log_spaced(np.int32(4)).per_decade == 4
    for bad in (2.5, True, "2"):
        with pytest.raises(ValueError, match="per_decade"):
            sched.log_spaced(bad)
    with pytest.raises(ValueError, match="2.5"):
        sched.at_steps([0, 2.5])
    with pytest.raises(ValueError, match="every"):
        sched.make_schedule(np.float64(5))


# --------------------------------------------------------------------------------------------
# probes


def test_probes_need_a_model(memory_url):
    with pytest.raises(ValueError, match="'p'.*need a model"):
        koopkit.Recorder(memory_url, "r", None, probes={"p": Probe(torch.zeros(2, 3))})
    assert_nothing_created(memory_url)


def test_probe_names_and_kinds_are_checked(memory_url, tiny_model):
    with pytest.raises(ValueError, match="probe name 'a/b'"):
        koopkit.Recorder(memory_url, "r", tiny_model(), probes={"a/b": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="probe 'p'.*list"):
        koopkit.Recorder(memory_url, "r", tiny_model(), probes={"p": [[0.0, 1.0, 2.0]]})
    assert_nothing_created(memory_url)


class _Complex(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.real = torch.nn.Linear(3, 2)
        self.phase = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))


@pytest.mark.parametrize("kwargs", [{}, {"sketch": 4}], ids=["raw", "sketch"])
def test_complex_parameters_are_refused_not_cast_to_real(memory_url, kwargs):
    """Copying a complex parameter into a real row used to drop its imaginary part."""
    with pytest.raises(ValueError, match=r"'phase'.*complex64"):
        koopkit.Recorder(memory_url, "r", _Complex(), **kwargs).open()
    assert_nothing_created(memory_url)
    store = record_one_step(memory_url, _Complex(), params="real")
    assert store.root["runs/r/params/value"].shape == (2, 8)


@pytest.mark.parametrize(
    "probe, match",
    [
        (Probe(torch.zeros(4, 3), ids=[1, 2, 3]), r"ids of probe 'p'.*4 entries.*\(3,\)"),
        (Probe(torch.zeros(4, 3), labels=[0, 1]), r"labels of probe 'p'.*4 entries.*\(2,\)"),
        (Probe(torch.zeros(2, 3), labels=torch.eye(2)), r"labels of probe 'p'.*\(2, 2\)"),
        (Probe(torch.zeros(2, 3), labels=[None, 1]), r"labels of probe 'p'.*numbers or strings"),
        (Probe(torch.zeros(2, 3), fn=lambda m, x: 1.0), r"probe 'p'.*output"),
        (Probe(torch.zeros(2, 3), fn=lambda m, x: m(x).sum()), r"probe 'p'.*output is \(\)"),
        (Probe(torch.zeros(2, 3), fn=lambda m, x: torch.fft.fft(m(x))), r"probe 'p'.*complex64"),
        (Probe(torch.zeros(3, 3), ids=[7, 8, 7]), r"ids of probe 'p'.*distinct"),
    ],
    ids=[
        "short-ids",
        "short-labels",
        "2d-labels",
        "object-labels",
        "not-a-tensor",
        "0-d",
        "complex",
        "repeated-ids",
    ],
)
def test_probe_ids_and_labels_are_one_per_sample(memory_url, tiny_model, probe, match):
    """A length mismatch used to write a store that fails ``koopkit validate``."""
    with pytest.raises(ValueError, match=match):
        koopkit.Recorder(memory_url, "r", tiny_model(), probes={"p": probe}).open()
    assert_nothing_created(memory_url)


def test_string_ids_and_labels_are_stored_as_text(memory_url, tiny_model, tmp_path):
    ids = ["img1.png", "img2.png", "a/b.png"]
    labels = np.array(["cat", "dog", "cat"])
    url = tmp_path / "s.zarr"
    probe = Probe(torch.zeros(3, 3), labels=labels, ids=ids)
    record_one_step(url, tiny_model(), probes={"p": probe})
    assert validate_store(url)[0] == []
    data = koopkit.open_run(url, "r")["probes/p"].to_dataset()
    assert data["sample"].values.tolist() == ids
    assert data["label"].values.tolist() == labels.tolist()
    plain = xr.open_zarr(url, group="runs/r/probes/p", consolidated=False)  # no koopkit
    assert plain["label"].values.tolist() == labels.tolist()
    assert plain["value"].shape == (2, 3, 2)


def test_a_failing_probe_creates_nothing_and_the_retry_works(memory_url, tiny_model):
    """The probe's first output is computed before the run exists: a probe batch of the
    wrong width used to leave an interrupted run whose params series refused the retry."""
    model = tiny_model()
    with pytest.raises(ValueError, match="probe 'p': evaluating it raised RuntimeError"):
        koopkit.Recorder(memory_url, "exp1", model, probes={"p": torch.zeros(2, 4)}).open()
    assert_nothing_created(memory_url)
    store = record_one_step(
        memory_url, model, run="exp1", sketch=16, probes={"p": torch.zeros(2, 3)}
    )
    assert store.run("exp1").committed("params") == 2
    assert store.root["runs/exp1/params/value"].shape == (2, 16)
    assert validate_store(memory_url)[0] == []


def test_a_new_run_whose_open_fails_is_removed(tmp_path, tiny_model, monkeypatch):
    """Past the checks, an open can still fail on the store; the new run then leaves nothing
    behind (not even the groups of runs made for it), so its id stays usable."""
    url = tmp_path / "s.zarr"
    record_one_step(url, tiny_model(), run="other")
    real = RunWriter.add_series

    def refuse_probes(self, spec):
        if spec.path.startswith("probes/"):
            raise OSError(28, "injected: no space left on device")
        return real(self, spec)

    monkeypatch.setattr(RunWriter, "add_series", refuse_probes)
    probes = {"p": torch.zeros(2, 3)}
    with pytest.raises(OSError, match="injected"):
        koopkit.Recorder(url, "x/y/z", tiny_model(), probes=probes).open()
    monkeypatch.undo()
    store = koopkit.open_store(url)
    assert list(store.runs) == ["other"]
    assert not (url / "runs" / "x").exists()
    assert validate_store(url)[0] == []
    record_one_step(url, tiny_model(), run="x")  # "x" was never a group of runs
    record_one_step(url, tiny_model(), run="x2/y/z", sketch=8, probes=probes)
    assert sorted(koopkit.open_store(url).runs) == ["other", "x", "x2/y/z"]


def test_an_existing_run_whose_open_fails_is_kept(memory_url, tiny_model, monkeypatch):
    model = tiny_model()
    record_one_step(memory_url, model)
    before = koopkit.open_store(memory_url).run("r").attrs

    def refuse(self, spec):
        raise OSError(28, "injected")

    monkeypatch.setattr(RunWriter, "add_series", refuse)
    with pytest.raises(OSError):
        koopkit.Recorder(memory_url, "r", model).open()
    monkeypatch.undo()
    assert koopkit.open_store(memory_url).run("r").attrs == before


def test_a_series_with_nothing_committed_is_started_again(memory_url, tiny_model):
    """A run that an earlier failed open left with an empty params series of another width."""
    writer = RunWriter(memory_url, "exp1")
    spec = SeriesSpec("params", (36,), attrs={"kind": "full"}, row_dims=("param",))
    writer.add_series(spec)
    writer.close("interrupted")
    store = record_one_step(memory_url, tiny_model(), run="exp1", sketch=16)
    assert store.root["runs/exp1/params/value"].shape == (2, 16)
    assert store.run("exp1").committed("params") == 2
    assert validate_store(memory_url)[0] == []
    # rows once committed are never replaced
    with pytest.raises(ShapeChangedError):
        koopkit.Recorder(memory_url, "exp1", tiny_model(), sketch=8).open()


def test_a_series_with_nothing_committed_is_unlisted_while_it_is_remade(
    memory_url, tiny_model, monkeypatch
):
    """A killed writer could otherwise leave committed_steps naming a series it had deleted."""
    writer = RunWriter(memory_url, "exp1")
    writer.add_series(SeriesSpec("params", (36,), row_dims=("param",)))
    writer.close("interrupted")
    seen = []
    make = writer_module.SeriesWriter.__init__

    def spying(self, run_group, spec, committed_rows, directory=None):
        seen.append(spec.path in run_group.attrs["committed_steps"])
        make(self, run_group, spec, committed_rows, directory)

    monkeypatch.setattr(writer_module.SeriesWriter, "__init__", spying)
    record_one_step(memory_url, tiny_model(), run="exp1")
    assert seen[0] is False  # what the store said while params was remade


def test_a_half_made_series_is_made_again_whole(memory_url, tiny_model):
    """A series with its arrays but not listed (killed before its coordinates were made) is
    remade on resume, not reopened without them."""
    probes = {"p": koopkit.Probe(torch.zeros(4, 3), ids=[10, 11, 12, 13])}
    record_one_step(memory_url, tiny_model(), run="exp1")
    writer = RunWriter(memory_url, "exp1")
    half = SeriesSpec("probes/p", (4, 2), row_dims=("sample", "feature"))  # no ids
    writer_module.SeriesWriter(writer.group, half, 0)  # made, never listed
    writer.abandon()
    store = record_one_step(memory_url, tiny_model(), run="exp1", probes=probes)
    assert store.dataset("exp1", "probes/p")["sample"].values.tolist() == [10, 11, 12, 13]
    assert validate_store(memory_url)[0] == []


def test_nested_run_id_is_refused_before_any_directory_is_made(tmp_path, tiny_model):
    url = tmp_path / "s.zarr"
    record_one_step(url, tiny_model(), run="x/a")
    with pytest.raises(InvalidRunIdError, match="nest inside run 'x/a'"):
        koopkit.Recorder(url, "x/a/inner", tiny_model()).open()
    assert not (url / "runs" / "x" / "a" / "inner").exists()
    assert validate_store(url)[0] == []


# --------------------------------------------------------------------------------------------
# scalars


@pytest.mark.parametrize(
    "scalars, match",
    [
        ({"train/acc": 0.5}, r"scalar name 'train/acc'"),
        ({"loss": torch.tensor([1.0, 2.0])}, r"scalar 'loss'.*shape \(2,\)"),
        ({"acc": None}, r"scalar 'acc'=None"),
        ({"acc": "0.5"}, r"scalar 'acc'='0.5'"),
        ({"acc": torch.tensor(1 + 2j)}, r"scalar 'acc'.*complex"),
        ({"ok": 1.0, "acc": np.ones(3)}, r"scalar 'acc'"),
    ],
    ids=["slash", "vector", "none", "text", "complex", "one-bad-of-two"],
)
def test_bad_scalars_are_refused_at_the_call(memory_url, tiny_model, scalars, match):
    """Refused before anything is logged: the loop can catch it and the run carries on."""
    model = tiny_model()
    with koopkit.Recorder(memory_url, "r", model) as rec:
        with pytest.raises(ValueError, match=match) as caught:
            rec.step(**scalars)
        assert not isinstance(caught.value, InvalidRunIdError)  # a name, not a run id
        assert rec.step_count == 0  # the step was not counted
        rec.step(loss=2.0)
    store = koopkit.open_store(memory_url)
    assert store.run("r").status == "complete"
    assert list(store.run("r").series) == ["params", "scalars/loss"]
    assert store.steps("r", "scalars/loss").tolist() == [0]
    assert validate_store(memory_url)[0] == []


def test_one_element_scalars_of_every_kind_are_logged(memory_url, tiny_model):
    with koopkit.Recorder(memory_url, "r", tiny_model()) as rec:
        for value in (torch.tensor([1.5]), np.float32(2.5), np.array([3.5]), np.bool_(True), 5):
            rec.step(x=value)
    store = koopkit.open_store(memory_url)
    np.testing.assert_array_equal(np.asarray(store.array("r", "scalars/x")), [1.5, 2.5, 3.5, 1, 5])
