"""``koopkit info|validate|import|plugins``: data on stdout, one clear line for bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
import zarr

import koopkit
from koopkit.errors import KoopkitError, NonFiniteSnapshotWarning

RUN = "fcn/h5/seed0"


def _record(url, run=RUN, steps=5, tags=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with koopkit.Recorder(url, run, model, tags=tags or {"width": 5, "opt": "sgd"}) as rec:
        for k in range(steps):
            rec.step(loss=float(k))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    url = tmp_path_factory.mktemp("cli") / "runs.zarr"
    _record(url)
    _record(url, run="other", steps=2, tags={"width": 8})
    return url


@pytest.fixture
def copy(recorded, tmp_path):
    url = tmp_path / "copy.zarr"
    shutil.copytree(recorded, url)
    return url


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def assert_one_error(result, *fragments):
    """Non-zero exit, exactly one stderr line starting with 'Error:', no traceback."""
    stderr = result.stderr
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr + result.stdout
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_invalid(result, *fragments):
    """Exit 1 and every stderr line a reason starting with 'invalid:'."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("invalid: ") for line in lines), result.stderr
    assert "Traceback" not in result.stderr
    text = result.stderr
    for fragment in fragments:
        assert fragment in text, text


# --------------------------------------------------------------------------------------------
# info


def test_info_json(cli_runner, recorded):
    result = cli_runner("info", recorded, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["format"] == {"format": "trajectory-store", "version": "1.0"}
    runs = {r["run_id"]: r for r in summary["runs"]}
    assert list(runs) == [RUN, "other"]
    run = runs[RUN]
    assert run["status"] == "complete"
    assert run["tags"] == {"width": 5, "opt": "sgd"}
    assert run["committed_steps"] == {"params": 6, "scalars/loss": 5}
    assert set(run["series"]) == {"params", "scalars/loss"}
    params = run["series"]["params"]
    assert params["committed"] == 6 and params["shape"] == [6, 26] and params["dtype"] == "float32"
    assert (params["first_step"], params["last_step"]) == (0, 5)
    assert run["series"]["scalars/loss"]["last_step"] == 4
    assert run["dropped"] == 0 and run["nonfinite"] == {}


def test_info_text(cli_runner, recorded):
    result = cli_runner("info", recorded)
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.stdout
    assert f"{RUN}  [complete]  tags: width=5 opt=sgd" in result.stdout
    assert "params" in result.stdout and "steps 0..5" in result.stdout


def test_info_counts_every_non_finite_step(cli_runner, tmp_path):
    """The run lists the first 100 NaN steps of a series and counts them all: info says all."""
    data = np.full((150, 2), np.nan, dtype=np.float32)
    np.save(tmp_path / "x.npy", data)
    url = tmp_path / "s.zarr"
    assert cli_runner("import", "npy", tmp_path / "x.npy", url, "--run", "a").exit_code == 0
    run = json.loads(cli_runner("info", url, "--json").stdout)["runs"][0]
    assert len(run["nonfinite"]["params"]) == 100 and run["nonfinite_count"] == {"params": 150}
    assert (
        "NaN/Inf in params at 150 step(s), first [0, 1, 2, 3, 4]" in cli_runner("info", url).stdout
    )


def test_info_on_a_zipped_store(cli_runner, run_koopkit, recorded, tmp_path):
    target = tmp_path / "runs.zip"
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(recorded.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(recorded).as_posix())
    result = cli_runner("info", target, "--json")
    assert result.exit_code == 0, result.output
    assert [r["run_id"] for r in json.loads(result.stdout)["runs"]] == [RUN, "other"]
    proc = run_koopkit("info", target)
    assert proc.returncode == 0, proc.stderr
    assert RUN in proc.stdout
    assert cli_runner("validate", target).exit_code == 0


def test_version_and_help(cli_runner):
    result = cli_runner("--version")
    assert (
        result.exit_code == 0 and result.stdout.strip() == f"koopkit, version {koopkit.__version__}"
    )
    for flag in ("-h", "--help"):
        result = cli_runner(flag)
        assert result.exit_code == 0
        for command in ("info", "validate", "import", "plugins"):
            assert command in result.stdout
    result = cli_runner("import", "-h")
    assert result.exit_code == 0 and "npy" in result.stdout and "torch" in result.stdout
    result = cli_runner("info", "-h")
    assert result.exit_code == 0 and "--json" in result.stdout


def test_plugins_json(cli_runner):
    result = cli_runner("plugins", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert isinstance(entries, list)
    for entry in entries:
        assert {"kind", "name", "plugin", "package", "version"} <= set(entry)


# --------------------------------------------------------------------------------------------
# not a store, from the command line


@pytest.fixture
def not_stores(tmp_path, recorded):
    zarr.open_group(tmp_path / "plain.zarr", mode="w").attrs["x"] = 1
    (tmp_path / "x.zarr").write_bytes(np.random.default_rng(0).bytes(512))
    (tmp_path / "empty").mkdir()
    future = tmp_path / "future.zarr"
    shutil.copytree(recorded, future)
    _edit_json(future / "zarr.json", lambda m: m["attributes"]["koopkit"].update(version="2.0"))
    return {
        "plain": (tmp_path / "plain.zarr", "not a koopkit trajectory store"),
        "random bytes": (tmp_path / "x.zarr", "x.zarr"),
        "empty dir": (tmp_path / "empty", "empty"),
        "missing": (tmp_path / "missing", "missing"),
        "future version": (future, "2.0"),
    }


@pytest.mark.parametrize(
    "kind", ["plain", "random bytes", "empty dir", "missing", "future version"]
)
def test_info_refuses_what_is_not_a_store(cli_runner, not_stores, kind):
    url, fragment = not_stores[kind]
    assert_one_error(cli_runner("info", url), fragment)
    assert_one_error(cli_runner("info", url, "--json"), fragment)


@pytest.mark.parametrize(
    "kind", ["plain", "random bytes", "empty dir", "missing", "future version"]
)
def test_validate_refuses_what_is_not_a_store(cli_runner, not_stores, kind):
    url, fragment = not_stores[kind]
    assert_invalid(cli_runner("validate", url), fragment)


def test_errors_in_a_real_process_and_debug_tracebacks(run_koopkit, not_stores):
    url, fragment = not_stores["plain"]
    proc = run_koopkit("info", url)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("Error: ") and fragment in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = run_koopkit("--debug", "info", url)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "NotAStoreError" in proc.stderr


def test_debug_flag_and_env_in_process_reraise(cli_runner, not_stores, monkeypatch):
    result = cli_runner("--debug", "info", not_stores["plain"][0])
    assert result.exit_code != 0
    assert isinstance(result.exception, KoopkitError)
    monkeypatch.setenv("KOOPKIT_DEBUG", "1")
    result = cli_runner("info", not_stores["plain"][0])
    assert isinstance(result.exception, KoopkitError)


# --------------------------------------------------------------------------------------------
# validate


def test_validate_passes_on_a_recorded_store(cli_runner, recorded):
    result = cli_runner("validate", recorded)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"valid: {recorded} (2 run(s))"
    assert result.stderr == ""


def _committed_too_large(copy):
    _edit_json(
        copy / "runs" / RUN / "zarr.json",
        lambda m: m["attributes"]["committed_steps"].update(params=99),
    )


def _steps_not_increasing(copy):
    zarr.open_array(copy / "runs" / RUN / "params" / "step", mode="r+")[2] = 0


def _tensors_do_not_cover(copy):
    def edit(m):
        m["attributes"]["tensors"][-1]["shape"] = [1]

    _edit_json(copy / "runs" / RUN / "params" / "zarr.json", edit)


def _dimension_names_deleted(copy):
    _edit_json(
        copy / "runs" / RUN / "params" / "value" / "zarr.json", lambda m: m.pop("dimension_names")
    )


def _schema_violation(copy):
    def edit(m):
        m["attributes"].update(status="exploded", tags={"width": [1, 2]})
        del m["attributes"]["created"]

    _edit_json(copy / "runs" / RUN / "zarr.json", edit)


def _bad_run_id_attr(copy):
    _edit_json(
        copy / "runs" / "other" / "zarr.json", lambda m: m["attributes"].update(run_id="../x")
    )


def _value_chunk_deleted(copy):
    (copy / "runs" / RUN / "params" / "value" / "c" / "0" / "0").unlink()


def _value_chunk_truncated(copy):
    chunk = copy / "runs" / RUN / "params" / "value" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])


def _step_chunk_deleted(copy):
    (copy / "runs" / RUN / "scalars" / "loss" / "step" / "c" / "0").unlink()


def _chunk_is_a_folder(copy):
    chunk = copy / "runs" / RUN / "scalars" / "loss" / "value" / "c" / "0"
    chunk.unlink()
    (chunk / "x").mkdir(parents=True)


@pytest.mark.parametrize(
    "corrupt, fragments",
    [
        (_committed_too_large, ["committed_steps is 99 but only 6 rows"]),
        (
            _value_chunk_deleted,
            ["params/value: chunk c/0/0 of committed rows 0..5 is missing", "fill value NaN"],
        ),
        (_value_chunk_truncated, ["params/value: chunk c/0/0 holds 100 bytes; a whole chunk is"]),
        (_step_chunk_deleted, ["scalars/loss/step: chunk c/0 of committed rows 0..4 is missing"]),
        (_chunk_is_a_folder, ["scalars/loss/value: chunk c/0 is not a file"]),
        (_steps_not_increasing, ["params/step: steps must be >= 0 and strictly increasing"]),
        (_tensors_do_not_cover, ["tensors cover 25 parameters but value has 26 columns"]),
        (_dimension_names_deleted, ["params/value: array has no dimension_names"]),
        (_schema_violation, ["status", "created: required key is missing", "tags.width"]),
        (_bad_run_id_attr, ["runs/other: run: run_id"]),
    ],
    ids=[
        "committed",
        "value-chunk-missing",
        "value-chunk-short",
        "step-chunk-missing",
        "chunk-is-a-folder",
        "steps",
        "tensors",
        "dimension_names",
        "schema",
        "run_id",
    ],
)
def test_validate_fails_with_reasons_on_a_corrupted_copy(cli_runner, copy, corrupt, fragments):
    corrupt(copy)
    result = cli_runner("validate", copy)
    assert_invalid(result, *fragments)
    assert result.stdout == ""


def test_validate_passes_a_chunk_of_nan_rows_left_unstored(cli_runner, tmp_path):
    """A chunk of nothing but the fill value (NaN) is not stored, as zarr does; its rows are
    the run's nonfinite steps, so it is not missing."""
    url, model = tmp_path / "nan.zarr", torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.warns(NonFiniteSnapshotWarning, match="NaN"):
        with koopkit.Recorder(url, "diverged", model) as rec:
            for _ in range(3):
                rec.step()
    assert not (url / "runs" / "diverged" / "params" / "value" / "c").exists()
    result = cli_runner("validate", url)
    assert result.exit_code == 0, result.output
    _edit_json(url / "runs" / "diverged" / "zarr.json", lambda m: m["attributes"].pop("nonfinite"))
    result = cli_runner("validate", url)  # written without the list: the rows may be NaN
    assert result.exit_code == 0, result.output


def test_info_never_shows_more_rows_than_are_written(cli_runner, copy):
    _committed_too_large(copy)
    summary = json.loads(cli_runner("info", copy, "--json").stdout)
    run = next(r for r in summary["runs"] if r["run_id"] == RUN)
    params = run["series"]["params"]
    assert params["committed"] == 6 and params["shape"] == [6, 26]
    assert run["committed_steps"]["params"] == 99  # the attribute as stored
    assert run["problems"] == ["params: committed_steps is 99 but only 6 rows are written"]
    text = cli_runner("info", copy).stdout
    assert "invalid: params: committed_steps is 99 but only 6 rows are written" in text
    assert "99 committed" not in text and "(6 x 26 float32)" in text


def test_info_survives_a_schema_violating_store(cli_runner, copy):
    _schema_violation(copy)
    result = cli_runner("info", copy, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["status"] == "exploded"


def test_info_text_survives_a_malformed_nonfinite_entry(cli_runner, copy):
    _edit_json(
        copy / "runs" / RUN / "zarr.json",
        lambda m: m["attributes"].update(nonfinite={"params": 5}, nonfinite_count=[1]),
    )
    result = cli_runner("info", copy)
    assert result.exit_code == 0, result.output
    assert "invalid: run: nonfinite.params: 5 is not of type 'array'" in result.stdout


# --------------------------------------------------------------------------------------------
# import


def test_import_npy_and_torch(cli_runner, tmp_path):
    data = np.random.default_rng(0).standard_normal((12, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    url = tmp_path / "s.zarr"
    result = cli_runner(
        "import",
        "npy",
        tmp_path / "x.npy",
        url,
        "--run",
        "np/a",
        "--tag",
        "width=40",
        "--tag",
        "opt=sgd",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "imported 12 steps" in result.stderr
    (tmp_path / "ckpts").mkdir()
    for step in (0, 10):
        torch.save({"w": torch.full((2, 2), float(step))}, tmp_path / "ckpts" / f"model_{step}.pt")
    result = cli_runner(
        "import", "torch", tmp_path / "ckpts", url, "--run", "pt/a", "--params", "w"
    )
    assert result.exit_code == 0, result.output
    assert "imported 2 checkpoints" in result.stderr
    store = koopkit.open_store(url)
    assert store.run("np/a").tags == {"width": 40, "opt": "sgd"}
    np.testing.assert_array_equal(np.asarray(store.array("np/a")), data)
    assert store.steps("pt/a").tolist() == [0, 10]
    assert cli_runner("validate", url).exit_code == 0


@pytest.fixture
def npy_inputs(tmp_path):
    np.save(tmp_path / "one_d.npy", np.arange(5.0))
    np.save(tmp_path / "objects.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "good.npy", np.ones((3, 2)))
    return tmp_path


@pytest.mark.parametrize(
    "source, run_id, fragment",
    [
        ("one_d.npy", "a", "2-D"),
        ("objects.npy", "a", "objects.npy"),
        ("missing.npy", "a", "missing.npy"),
        ("good.npy", "../escape", "Invalid run id"),
        ("good.npy", "/abs/path", "Invalid run id"),
        ("good.npy", "a\x00b", "Invalid run id"),
        ("good.npy", "a/../b", "Invalid run id"),
    ],
    ids=["1-D", "object", "missing", "dotdot", "absolute", "nul", "inner-dotdot"],
)
def test_import_npy_bad_input(cli_runner, npy_inputs, source, run_id, fragment):
    url = npy_inputs / "s.zarr"
    result = cli_runner("import", "npy", npy_inputs / source, url, "--run", run_id)
    assert_one_error(result, fragment)
    assert not (npy_inputs / "escape").exists()
    if url.exists():
        assert koopkit.open_store(url).runs == {}


@pytest.mark.parametrize(
    "tags, fragment",
    [
        (["w=1", "w=2"], "'w' is given twice"),
        (["lr=NaN"], "numbers must be finite"),
        (["note=" + "x" * 1025], "at most 1024"),
        (["k" * 129 + "=1"], "at most 128"),
    ],
    ids=["twice", "nan", "long-value", "long-key"],
)
def test_import_refuses_tags_a_store_cannot_hold_before_creating_it(
    cli_runner, npy_inputs, tags, fragment
):
    url = npy_inputs / "s.zarr"
    options = [arg for tag in tags for arg in ("--tag", tag)]
    result = cli_runner("import", "npy", npy_inputs / "good.npy", url, "--run", "a", *options)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.exit_code in (1, 2) and len(errors) == 1, result.stderr  # 2: click's usage
    assert fragment in errors[0] and "Traceback" not in result.stderr
    assert not url.exists()


def test_a_store_url_of_an_unknown_protocol_is_one_line(cli_runner, npy_inputs):
    result = cli_runner("import", "npy", npy_inputs / "good.npy", "nosuch://x", "--run", "a")
    assert_one_error(result, "Cannot open 'nosuch://x'")


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _evil_folder(tmp_path, how):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "step_0.pt")
    _Evil.marker = str(tmp_path / "pwned")
    evil = {"w": torch.zeros(2), "payload": _Evil()}
    if how == "torch.save":
        torch.save(evil, folder / "step_1.pt")
    else:
        with open(folder / "step_1.pt", "wb") as f:
            pickle.dump(evil, f)
    return folder


def test_import_torch_refuses_code_execution(cli_runner, tmp_path):
    folder = _evil_folder(tmp_path, "torch.save")
    url = tmp_path / "s.zarr"
    result = cli_runner("import", "torch", folder, url, "--run", "a")
    assert_one_error(result, "weights_only", "step_1.pt")
    assert not (tmp_path / "pwned").exists()
    assert not url.exists() or koopkit.open_store(url).runs == {}


def test_import_torch_refuses_code_execution_in_a_real_process(run_koopkit, tmp_path):
    folder = _evil_folder(tmp_path, "torch.save")
    proc = run_koopkit("import", "torch", folder, tmp_path / "s.zarr", "--run", "a")
    assert proc.returncode == 1
    assert not (tmp_path / "pwned").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "weights_only" in lines[0]


def test_import_torch_plain_pickle_is_one_line_in_a_real_process(run_koopkit, tmp_path):
    folder = _evil_folder(tmp_path, "pickle.dump")
    proc = run_koopkit("import", "torch", folder, tmp_path / "s.zarr", "--run", "a")
    assert proc.returncode == 1
    assert not (tmp_path / "pwned").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr


def test_import_torch_mismatched_shapes_leave_no_run(cli_runner, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step, shape in [(0, (2, 3)), (1, (2, 3)), (2, (3, 3))]:
        torch.save({"w": torch.zeros(shape), "b": torch.zeros(3)}, folder / f"ckpt_{step}.pt")
    url = tmp_path / "s.zarr"
    _record(url, run="kept", steps=1)
    result = cli_runner("import", "torch", folder, url, "--run", "nested/bad")
    assert_one_error(result, "ckpt_2.pt", "'w'")
    assert list(koopkit.open_store(url).runs) == ["kept"]
    assert not (url / "runs" / "nested" / "bad").exists()
    assert cli_runner("validate", url).exit_code == 0


def test_import_torch_not_a_folder_and_run_exists(cli_runner, tmp_path, npy_inputs):
    url = tmp_path / "s.zarr"
    result = cli_runner("import", "torch", tmp_path / "missing", url, "--run", "a")
    assert_one_error(result, "missing")
    assert cli_runner("import", "npy", npy_inputs / "good.npy", url, "--run", "a").exit_code == 0
    result = cli_runner("import", "npy", npy_inputs / "good.npy", url, "--run", "a")
    assert_one_error(result, "already exists")
