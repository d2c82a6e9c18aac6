"""The trajectory store: readable without koopkit, zip and memory stores, committed rows only,
clear refusals for what is not a store, and validation that catches corruption."""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import torch
import zarr

import koopkit
from koopkit.errors import (
    FormatVersionError,
    NotAStoreError,
    RunNotFoundError,
    SelectionError,
    StoreError,
)
from koopkit.record.recorder import Probe
from koopkit.store import layout
from koopkit.store.reader import parse_where
from koopkit.store.validate import validate_store
from koopkit.store.writer import RunWriter, SeriesSpec

RUN = "fcn/h5/seed0"


def _record(url, run=RUN, steps=9, seed=0, **kwargs):
    """A small recorded run; returns the parameters at every step (steps+1, n)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    probe = Probe(torch.randn(4, 3, generator=g), labels=[0, 1, 0, 1])
    history = [torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()]
    options = {"grads": True, "probes": {"logits": probe}, "tags": {"width": 5, "seed": seed}}
    with koopkit.Recorder(url, run, model, **{**options, **kwargs}) as rec:
        for _ in range(steps):
            loss = model(torch.randn(8, 3, generator=g)).pow(2).mean()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            opt.zero_grad()
            history.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy())
    return np.stack(history)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A directory store with two runs; tests copy it before changing anything."""
    url = tmp_path_factory.mktemp("recorded") / "runs.zarr"
    history = _record(url)
    _record(url, run="fcn/h5/seed1", seed=1, every=3)
    return url, history


@pytest.fixture
def copy(recorded, tmp_path):
    """A private copy of the recorded store, to corrupt."""
    url = tmp_path / "copy.zarr"
    shutil.copytree(recorded[0], url)
    return url


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# --------------------------------------------------------------------------------------------
# plain zarr and xarray, without koopkit

PLAIN_READER = """
import json, sys
import numpy as np
import xarray as xr
import zarr

store, groups = sys.argv[1], sys.argv[2:]
root = zarr.open_group(store, mode="r")
out = {"root_attrs": root.attrs.asdict(), "groups": {}}
for group in groups:
    ds = xr.open_zarr(store, group=group, consolidated=False)
    plain = root[group + "/value"][...]
    out["groups"][group] = {
        "dims": list(ds["value"].dims),
        "indexes": list(ds.indexes),
        "step": ds["step"].values.tolist(),
        "step_dtype": str(ds["step"].dtype),
        "value": ds["value"].values.tolist(),
        "plain_equal": bool(np.array_equal(plain, ds["value"].values, equal_nan=True)),
        "coords": sorted(ds.coords),
        "attrs": sorted(ds.attrs),
    }
out["koopkit_imported"] = "koopkit" in sys.modules
print(json.dumps(out))
"""


def test_plain_xarray_and_zarr_read_a_store_without_koopkit(recorded, run_python):
    url, history = recorded
    params, probe = f"runs/{RUN}/params", f"runs/{RUN}/probes/logits"
    proc = run_python("-c", PLAIN_READER, str(url), params, probe)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["koopkit_imported"] is False
    assert out["root_attrs"] == {"koopkit": {"format": "trajectory-store", "version": "1.0"}}
    for group in (params, probe):
        got = out["groups"][group]
        assert got["dims"][0] == "step" and "step" in got["indexes"]
        assert got["step"] == list(range(10)) and got["step_dtype"] == "int64"
        assert got["plain_equal"]
    got = out["groups"][params]
    assert got["dims"] == ["step", "param"]
    np.testing.assert_array_equal(np.array(got["value"], dtype=np.float32), history)
    assert {"tensors", "kind"} <= set(got["attrs"])
    got = out["groups"][probe]
    assert got["dims"] == ["step", "sample", "feature"]
    assert {"sample", "step"} <= set(got["coords"])


def test_every_array_names_its_dimensions(recorded):
    root = zarr.open_group(recorded[0], mode="r")
    arrays = []

    def walk(group):
        for _, array in group.arrays():
            arrays.append(array)
        for _, child in group.groups():
            walk(child)

    walk(root)
    assert len(arrays) >= 10
    for array in arrays:
        names = array.metadata.dimension_names
        assert names is not None and len(names) == array.ndim and all(names), array.path
        if array.path.endswith(("/value", "/step")):
            assert names[0] == "step"


# --------------------------------------------------------------------------------------------
# the reader


def test_open_store_lists_runs_tags_and_series(recorded):
    store = koopkit.open_store(recorded[0])
    assert list(store.runs) == [RUN, "fcn/h5/seed1"]
    info = store.run(RUN)
    assert info.tags == {"width": 5, "seed": 0}
    assert info.status == "complete"
    assert info.series == ("params", "grads", "scalars/loss", "probes/logits")
    assert info.committed("params") == 10 and info.committed("scalars/loss") == 9
    assert info.attrs["model"] == {"class": "Sequential", "parameter_count": 32}
    assert info.attrs["every"] == {"kind": "every", "n": 1}
    assert store.steps("fcn/h5/seed1").tolist() == [0, 3, 6, 9]
    assert [r.run_id for r in store.select({"seed": "1"})] == ["fcn/h5/seed1"]
    assert [r.run_id for r in store.select(parse_where(["width=5.0"]))] == list(store.runs)


def test_parse_where_refuses_malformed_items():
    assert parse_where(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    for bad in (["noequals"], ["=1"]):
        with pytest.raises(SelectionError):
            parse_where(bad)
    with pytest.raises(SelectionError, match=r"'cond' is given twice \(cond=a, cond=b\)"):
        parse_where(["cond=a", "seed=1", "cond=b"])  # AND would match nothing, the last wins


def test_dataset_and_datatree(recorded):
    url, history = recorded
    store = koopkit.open_store(url)
    ds = store.dataset(RUN)
    assert ds["value"].dims == ("step", "param")
    np.testing.assert_array_equal(ds["value"].values, history)
    assert ds.attrs["kind"] == "full" and "koopkit" not in ds.attrs
    tree = koopkit.open_run(url, RUN)
    assert tree.attrs["run_id"] == RUN and "writer" not in tree.attrs
    assert set(tree.children) == {"params", "grads", "scalars", "probes"}
    assert tree["scalars/loss"]["step"].values.tolist() == list(range(9))
    assert tree["probes/logits"]["label"].values.tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(tree.koopkit.tensor("2.bias").values, history[:, -2:])


def test_unknown_run_and_series(recorded):
    store = koopkit.open_store(recorded[0])
    with pytest.raises(RunNotFoundError, match="fcn/h5/seed0"):
        store.run("nope")
    with pytest.raises(RunNotFoundError, match="params, grads"):
        store.array(RUN, "scalars/acc")
    with pytest.raises(KeyError):
        koopkit.open_run(recorded[0], "fcn/h5")


def test_reader_never_shows_rows_past_committed(copy):
    _edit_json(
        copy / "runs" / RUN / "zarr.json",
        lambda m: m["attributes"]["committed_steps"].update(params=4),
    )
    store = koopkit.open_store(copy)
    assert store.array(RUN).shape == (4, 32)
    assert store.steps(RUN).tolist() == [0, 1, 2, 3]
    assert store.dataset(RUN)["step"].values.tolist() == [0, 1, 2, 3]
    assert koopkit.open_run(copy, RUN)["params"]["value"].shape == (4, 32)
    assert validate_store(copy)[0] == []  # rows past the commit point are allowed


def test_resume_trims_rows_past_the_commit_point(copy, recorded):
    _edit_json(
        copy / "runs" / RUN / "zarr.json",
        lambda m: m["attributes"]["committed_steps"].update(params=4),
    )
    writer = RunWriter(copy, RUN)
    spec = SeriesSpec("params", (32,), attrs=dict(koopkit.open_store(copy).dataset(RUN).attrs))
    series = writer.add_series(spec)
    assert series.written == 4 and series.last_step == 3
    writer.append("params", [4], recorded[1][4:5] + 1)
    writer.close()
    store = koopkit.open_store(copy)
    assert store.steps(RUN).tolist() == [0, 1, 2, 3, 4]
    values = np.asarray(store.array(RUN))
    np.testing.assert_array_equal(values[:4], recorded[1][:4])
    np.testing.assert_array_equal(values[4], recorded[1][4] + 1)
    assert zarr.open_group(copy, mode="r")[f"runs/{RUN}/params/value"].shape == (5, 32)
    assert validate_store(copy)[0] == []


def test_writer_refuses_steps_that_do_not_increase(memory_url):
    writer = RunWriter(memory_url, "r")
    try:
        writer.add_series(SeriesSpec("scalars/x", (), attrs={"kind": "scalar"}, chunk_steps=4))
        writer.append("scalars/x", [0, 1], [0.5, 0.25])
        with pytest.raises(ValueError, match="must increase"):
            writer.append("scalars/x", [1], [0.0])
        with pytest.raises(ValueError, match="must increase"):
            writer.append("scalars/x", [5, 5], [0.0, 0.0])
    finally:
        writer.close()
    assert koopkit.open_store(memory_url).steps("r", "scalars/x").tolist() == [0, 1]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_writer_flags_exactly_the_rows_holding_nan_or_inf(memory_url, dtype):
    """Rows whose sum overflows are finite and not flagged; one NaN, +Inf or -Inf is."""
    big = float(np.finfo(dtype).max)
    rows = np.ones((6, 8), dtype=dtype)
    rows[1] = big  # the sum overflows, every entry is finite
    rows[2, 3] = np.nan
    rows[3, 0], rows[3, 1] = np.inf, -np.inf  # the sum is NaN
    rows[4, 7] = -np.inf
    rows[5, :2] = big, -big
    writer = RunWriter(memory_url, "r")
    spec = SeriesSpec("params", (8,), dtype=dtype, attrs={"kind": "full"}, row_dims=("param",))
    writer.add_series(spec)
    writer.append("params", np.arange(0, 12, 2), rows)
    writer.close()
    assert koopkit.open_store(memory_url).run("r").attrs["nonfinite"] == {"params": [4, 6, 8]}


def test_writer_lists_the_first_nonfinite_steps_and_counts_all(memory_url):
    """The run metadata is rewritten at every commit: it must not grow with each NaN row.
    Runs written before the count existed keep their full list and gain a count."""
    from koopkit.store.writer import NONFINITE_LIMIT

    table = [{"name": "w", "offset": 0, "shape": [3], "dtype": "float32"}]
    spec = SeriesSpec("params", (3,), attrs={"kind": "full", "tensors": table}, row_dims=("param",))
    rows = np.full((4, 3), np.nan, dtype="float32")
    writer = RunWriter(memory_url, "r")
    writer.add_series(spec)
    for start in range(0, NONFINITE_LIMIT + 60, 4):  # a commit every call
        writer.append("params", np.arange(start, start + 4), rows)
    writer.close()
    attrs = koopkit.open_store(memory_url).run("r").attrs
    assert attrs["nonfinite"] == {"params": list(range(NONFINITE_LIMIT))}
    assert attrs["nonfinite_count"] == {"params": NONFINITE_LIMIT + 60}

    old = RunWriter(memory_url, "old")  # as an older writer left it: every step, no count
    old.add_series(spec)
    old.append("params", np.arange(4), np.ones((4, 3), dtype="float32"))
    old.set(nonfinite={"params": list(range(200, 200 + 2 * NONFINITE_LIMIT))})
    old.close()
    resumed = RunWriter(memory_url, "old")
    resumed.add_series(spec)
    resumed.append("params", np.arange(4, 8), rows)
    resumed.close()
    attrs = koopkit.open_store(memory_url).run("old").attrs
    assert attrs["nonfinite"]["params"] == list(range(200, 200 + 2 * NONFINITE_LIMIT))
    assert attrs["nonfinite_count"] == {"params": 2 * NONFINITE_LIMIT + 4}
    assert validate_store(memory_url)[0] == []


def test_static_arrays_round_trip(memory_url):
    writer = RunWriter(memory_url, "r", {"tags": {"kind": "ntk"}})
    ntk = np.arange(9.0).reshape(3, 3)
    writer.write_static("ntk", ntk, ("sample", "sample_b"), description="NTK on the probe set")
    writer.close()
    tree = koopkit.open_run(memory_url, "r")
    np.testing.assert_array_equal(tree["static"]["ntk"].values, ntk)
    assert validate_store(memory_url) == ([], 1)


# --------------------------------------------------------------------------------------------
# memory and zip stores


def test_memory_store_records_and_reads_in_process(memory_url):
    history = _record(memory_url, steps=4)
    store = koopkit.open_store(memory_url)
    assert list(store.runs) == [RUN]
    np.testing.assert_array_equal(np.asarray(store.array(RUN)), history)
    assert validate_store(memory_url) == ([], 1)


def test_zipped_directory_store_opens(recorded, tmp_path, zip_directory):
    url, history = recorded
    target = zip_directory(url, tmp_path / "runs.zip")
    store = koopkit.open_store(target)
    assert list(store.runs) == [RUN, "fcn/h5/seed1"]
    np.testing.assert_array_equal(np.asarray(store.array(RUN)), history)
    tree = koopkit.open_run(target, RUN)
    np.testing.assert_array_equal(tree["params"]["value"].values, history)
    assert validate_store(target) == ([], 2)


def test_zip_stores_are_read_only(recorded, tmp_path, zip_directory):
    target = zip_directory(recorded[0], tmp_path / "runs.zip")
    with pytest.raises(StoreError, match="zip"):
        RunWriter(target, "new")
    with pytest.raises(NotAStoreError):
        koopkit.open_store(tmp_path / "missing.zip")


# --------------------------------------------------------------------------------------------
# what is not a store


def test_plain_zarr_group_is_not_a_store(tmp_path):
    zarr.open_group(tmp_path / "plain.zarr", mode="w").attrs["x"] = 1
    with pytest.raises(NotAStoreError, match="not a koopkit trajectory store"):
        koopkit.open_store(tmp_path / "plain.zarr")
    with pytest.raises(NotAStoreError):
        RunWriter(tmp_path / "plain.zarr", "r")


def test_random_bytes_and_missing_paths_are_not_stores(tmp_path):
    (tmp_path / "x.zarr").write_bytes(np.random.default_rng(0).bytes(256))
    (tmp_path / "empty").mkdir()
    for url in ("x.zarr", "empty", "missing"):
        with pytest.raises(NotAStoreError):
            koopkit.open_store(tmp_path / url)
    with pytest.raises(NotAStoreError):
        RunWriter(tmp_path / "x.zarr", "r")


def test_non_empty_directory_is_not_written_into(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(NotAStoreError, match="refusing"):
        RunWriter(tmp_path / "data", "r")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["notes.txt"]


def test_future_format_version_is_refused(copy):
    _edit_json(copy / "zarr.json", lambda m: m["attributes"]["koopkit"].update(version="2.0"))
    with pytest.raises(FormatVersionError, match="2.0"):
        koopkit.open_store(copy)
    with pytest.raises(FormatVersionError):
        RunWriter(copy, "new")
    reasons, _ = validate_store(copy)
    assert len(reasons) == 1 and "2.0" in reasons[0]


# --------------------------------------------------------------------------------------------
# validation


def test_recorded_store_validates(recorded):
    assert validate_store(recorded[0]) == ([], 2)


def _set_run_attr(key, value):
    return lambda copy: _edit_json(
        copy / "runs" / RUN / "zarr.json", lambda m: m["attributes"].__setitem__(key, value)
    )


def _set_run_attrs(attrs):
    return lambda copy: _edit_json(
        copy / "runs" / RUN / "zarr.json", lambda m: m.__setitem__("attributes", attrs)
    )


def _committed_too_large(copy):
    _edit_json(
        copy / "runs" / RUN / "zarr.json",
        lambda m: m["attributes"]["committed_steps"].update(params=11),
    )


def _steps_not_increasing(copy):
    step = zarr.open_array(copy / "runs" / RUN / "params" / "step", mode="r+")
    step[3] = 1


def _tensors_do_not_cover(copy):
    _edit_json(
        copy / "runs" / RUN / "params" / "zarr.json",
        lambda m: m["attributes"]["tensors"].pop(),
    )


def _dimension_names_deleted(copy):
    _edit_json(
        copy / "runs" / RUN / "grads" / "value" / "zarr.json", lambda m: m.pop("dimension_names")
    )


def _series_not_committed(copy):
    _edit_json(
        copy / "runs" / RUN / "zarr.json",
        lambda m: m["attributes"]["committed_steps"].pop("grads"),
    )


def _committed_names_missing_series(copy):
    _edit_json(
        copy / "runs" / RUN / "zarr.json",
        lambda m: m["attributes"]["committed_steps"].update({"scalars/acc": 3}),
    )


def _probe_labels_wrong_length(copy):
    label = copy / "runs" / RUN / "probes" / "logits" / "label"
    shutil.rmtree(label)
    zarr.create_array(
        zarr.storage.LocalStore(copy),
        name=f"runs/{RUN}/probes/logits/label",
        data=np.arange(3),
        dimension_names=("sample",),
    )


def _sketch_dim_wrong(copy):
    def edit(m):
        m["attributes"].update(kind="sketch", sketch={"method": "gaussian", "dim": 3, "seed": 0})

    _edit_json(copy / "runs" / RUN / "params" / "zarr.json", edit)


def _params_value_1d(copy):
    group = zarr.open_group(copy / "runs" / RUN / "params", mode="r+")
    del group["value"]
    group.create_array("value", data=np.zeros(10, "f4"), dimension_names=("step",))


CORRUPTIONS = {
    "committed_steps > rows": (_committed_too_large, "committed_steps is 11 but only 10 rows"),
    "steps not increasing": (_steps_not_increasing, "strictly increasing"),
    "tensors do not cover": (_tensors_do_not_cover, "tensors cover 30 parameters but value has 32"),
    "dimension_names deleted": (
        _dimension_names_deleted,
        "grads/value: array has no dimension_names",
    ),
    "bad status": (_set_run_attr("status", "finished"), "status"),
    "run_id mismatch": (_set_run_attr("run_id", "other"), "does not match its path"),
    "bad created": (_set_run_attr("created", "yesterday"), "created"),
    "negative committed": (_set_run_attr("committed_steps", {"params": -1}), "committed_steps"),
    "committed names a missing series": (_committed_names_missing_series, "does not exist"),
    "probe labels": (_probe_labels_wrong_length, "label: expected 4 entries"),
    "sketch dim": (_sketch_dim_wrong, "sketch dim 3 != value width 32"),
    "params value 1-D": (_params_value_1d, "params/value: a full series is (step, param), got 1-D"),
    # a run whose koopkit block is lost or wrong is still judged as a run, not skipped
    "run attrs lost": (_set_run_attrs({}), "run: koopkit: required key is missing"),
    "run node wrong": (
        _set_run_attr("koopkit", {"node": "rnu", "version": "1.0"}),
        "run: koopkit.node: expected 'run', got 'rnu'",
    ),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_validation_catches_corruption(copy, name):
    corrupt, reason = CORRUPTIONS[name]
    corrupt(copy)
    reasons, runs = validate_store(copy)
    assert runs == 2
    assert reasons, "the corrupted store validated"
    assert any(reason in r for r in reasons), reasons
    assert all(r.startswith(f"runs/{RUN}") for r in reasons), reasons


def test_series_not_yet_committed_is_ignored(copy):
    """A series that committed_steps does not list is still being created: not an error, and
    not shown to readers."""
    _series_not_committed(copy)
    assert validate_store(copy) == ([], 2)
    assert "grads" not in koopkit.open_store(copy).run(RUN).series
    assert "grads" not in koopkit.open_run(copy, RUN).children


def test_a_series_a_killed_writer_was_creating_is_not_shown(copy):
    """SIGKILL between creating a series' group and its arrays: every reader skips it."""
    zarr.open_group(str(copy), mode="r+")[f"runs/{RUN}/probes"].create_group(
        "half", attributes={layout.NAMESPACE: layout.node_block("series")}
    )
    assert validate_store(copy) == ([], 2)
    store = koopkit.open_store(copy)
    assert "probes/half" not in store.run(RUN).series
    assert "probes/logits" in store.run(RUN).series
    tree = koopkit.open_run(copy, RUN)
    assert "half" not in tree["probes"].children
    assert np.array_equal(tree["params"]["value"].values, store.trajectory(RUN)[:])


def test_validation_reports_an_unreadable_node(copy):
    (copy / "runs" / RUN / "grads" / "zarr.json").write_text("{not json")
    reasons, _ = validate_store(copy)
    assert reasons


def test_layout_names():
    assert layout.run_path("a/b") == "runs/a/b"
    assert layout.series_path("scalars", "loss") == "scalars/loss"
    assert layout.series_path("params") == "params"
    with pytest.raises(ValueError):
        layout.series_path("weights")
    for bad in ("..", "a/b", "", "x\x00", "sp ace"):
        with pytest.raises(StoreError):
            layout.check_name(bad)


def test_a_store_another_process_just_created_is_opened(tmp_path, monkeypatch):
    """zarr's check-then-create races with a second creator: the loser opens the winner's."""
    import zarr
    import zarr.errors

    from koopkit.store import layout, location

    url = tmp_path / "s.zarr"
    real_open_group, calls = zarr.open_group, []

    def racing_open_group(store, **kwargs):
        calls.append(kwargs["mode"])
        if len(calls) == 1:  # the other process creates the store between check and create
            location.open_root(url, writable=True)
            raise zarr.errors.ContainsGroupError("A group exists in store at path ''.")
        return real_open_group(store, **kwargs)

    monkeypatch.setattr(zarr, "open_group", racing_open_group)
    group = location.open_root(url, writable=True)
    assert group.attrs[layout.NAMESPACE]["format"] == layout.FORMAT_NAME
    assert calls[0] == calls[-1] == "a" and len(calls) == 3


def _append_rows(url, steps):
    table = [{"name": "w", "offset": 0, "shape": [4], "dtype": "float32"}]
    spec = SeriesSpec(
        "params", (4,), attrs={"kind": "full", "tensors": table}, chunk_steps=2, row_dims=("param",)
    )
    writer = RunWriter(url, "r", {"tags": {}})
    writer.add_series(spec)
    writer.append("params", steps, np.repeat(steps.astype(np.float32)[:, None], 4, axis=1))
    writer.close()


def test_consolidated_metadata_is_never_read_stale(tmp_path):
    """A root document holding consolidated metadata (``zarr.consolidate_metadata``, or xarray's
    ``to_zarr``) is a snapshot koopkit never updates: readers and writers use the live nodes."""
    url = tmp_path / "s.zarr"
    _append_rows(url, np.arange(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not part of the Zarr format 3 specification"
        zarr.consolidate_metadata(str(url))
    _append_rows(url, np.arange(3, 8))
    store = koopkit.open_store(url)
    assert store.run("r").committed("params") == 8
    assert store.trajectory("r").shape == (8, 4) and store.steps("r").tolist() == list(range(8))
    _append_rows(url, np.arange(8, 10))  # resumes after the 8 rows, not the snapshot's 3
    view = koopkit.open_store(url).trajectory("r")
    np.testing.assert_array_equal(view[:, 0], np.arange(10))
    # the writer dropped the snapshot, so plain zarr (which trusts one) reads the live rows
    assert json.loads((url / "zarr.json").read_text()).get("consolidated_metadata") is None
    plain = zarr.open_group(str(url), mode="r")[f"runs/r/{layout.PARAMS}/value"]
    assert plain.shape[0] == 10


def _truncate_chunk(url, array, chunk):
    path = url / "runs" / RUN / array / "c" / chunk
    path.write_bytes(path.read_bytes()[:-5])


def _recompress(url, array, **options):
    """``array`` of the run written again by zarr, with the same data and metadata."""
    root = zarr.open_group(url, mode="r+")
    old = root[f"runs/{RUN}/{array}"]
    parent, name = f"runs/{RUN}/{array}".rsplit("/", 1)
    data, attrs, dims = old[...], old.attrs.asdict(), old.metadata.dimension_names
    del root[parent][name]
    new = root[parent].create_array(
        name, data=data, attributes=attrs, dimension_names=dims, **options
    )
    assert new.shape == data.shape


READS = {
    "trajectory": lambda url: koopkit.open_store(url).trajectory(RUN)[:],
    "dask": lambda url: koopkit.open_store(url).array(RUN).compute(),
    "open_run": lambda url: koopkit.open_run(url, RUN)["params"]["value"].values,
    "tensor": lambda url: (
        koopkit.open_run(url, RUN).koopkit.tensor("0.bias").values
    ),  # columns 15-19
}


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
@pytest.mark.parametrize("compressors", [None, "zstd"])
def test_a_truncated_chunk_is_named_by_every_reader(copy, read, compressors):
    codec = zarr.codecs.ZstdCodec(level=1) if compressors else None
    _recompress(copy, "params/value", chunks=(4, 8), compressors=codec)
    _truncate_chunk(copy, "params/value", "1/2")
    with pytest.raises(StoreError, match="Cannot read") as caught:
        read(copy)
    message = str(caught.value)
    assert "params/value" in message and "c/1/2" in message and len(message.splitlines()) == 1


def test_a_truncated_step_chunk_is_named(copy):
    _truncate_chunk(copy, "params/step", "0")
    with pytest.raises(StoreError, match=r"Cannot read chunk 'c/0' of .*params/step"):
        koopkit.open_store(copy).steps(RUN)


def test_file_urls_name_the_path_with_their_escapes_decoded(tmp_path, tiny_model, zip_directory):
    """``file:///a%20b.zarr`` (as ``Path.as_uri`` writes it) is the directory ``a b.zarr``; a
    URL built by hand (``f"file://{path}"``) keeps a ``#`` or ``?`` as part of the name."""
    where = tmp_path / "with space#1?.zarr"
    url = where.as_uri()
    assert "%20" in url and "%231%3F" in url
    with koopkit.Recorder(url, "r", tiny_model()) as rec:
        rec.step()
    assert sorted(p.name for p in tmp_path.iterdir()) == [where.name]
    by_hand = f"file://{where}"
    for opened in (where, url, by_hand, f"file://localhost{where}"):
        assert koopkit.open_store(opened).run("r").committed("params") == 2
    zipped = zip_directory(where, tmp_path / "z 1.zip")
    assert koopkit.open_store(zipped.as_uri()).run("r").committed("params") == 2
    with zipfile.ZipFile(zipped, "a") as zf:  # a member that would escape if extracted
        zf.writestr("../evil.txt", "x")
    for given in (zipped, zipped.as_uri()):
        reasons, _ = validate_store(given)
        assert any("unsafe name" in r for r in reasons), (given, reasons)
