"""``koopkit info`` reads a local store from its JSON documents; the answer is zarr's, byte for byte.

Every case runs ``koopkit info`` and ``koopkit info --json`` twice in-process: as shipped (a
local directory goes through ``LocalNodes``) and with that reader switched off (everything
through zarr, as before). Exit code, stdout, stderr and warnings must agree, and each case
also says which reader must have answered, so a fast path that quietly falls back (or one
that answers for input only zarr understands) fails too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import zarr
import zarr.codecs
from click.testing import CliRunner

from koopkit.cli import cli
from koopkit.store import reader
from koopkit.store.writer import RunWriter, SeriesSpec

WIDTH = 6


def _params(chunk_steps=4):
    table = [{"name": "w", "offset": 0, "shape": [WIDTH], "dtype": "float32"}]
    return SeriesSpec(
        "params",
        (WIDTH,),
        attrs={"kind": "full", "tensors": table},
        chunk_steps=chunk_steps,
        row_dims=("param",),
    )


def _rows(steps, seed=0):
    return np.random.default_rng(seed).standard_normal((len(steps), WIDTH)).astype(np.float32)


def _write(url, run_id, steps, *, tags=None, close="complete", scalars=("loss",), **series):
    writer = RunWriter(url, run_id, {"tags": tags or {}})
    writer.add_series(_params(**series))
    for name in scalars:
        writer.add_series(SeriesSpec(f"scalars/{name}", (), chunk_steps=4))
    if len(steps):
        writer.append("params", steps, _rows(steps))
        for name in scalars:
            writer.append(f"scalars/{name}", steps, np.linspace(1, 0, len(steps)))
    if close == "interrupted":
        writer.flush()
        writer.abandon()
    elif close == "recording":
        writer.flush()
        writer.lock.release()
    else:
        writer.close()
    return writer


def write_runs(url):
    """Several runs: nested ids, resumed, interrupted, still recording, empty, NaN, analyses."""
    _write(url, "mlp/seed0", np.arange(10), tags={"seed": 0, "width": 40, "opt": "sgd"})
    _write(url, "mlp/seed1", np.arange(5, 60, 5), tags={"seed": 1, "lr": 0.1, "note": "héllo"})
    _write(
        url, "fcn/h5/seed0", np.arange(7), tags={"flag": True, "none": None}, close="interrupted"
    )
    _write(url, "fcn/h5/seed1", np.arange(3), close="recording", scalars=("loss", "acc"))
    _write(url, "resumed", np.arange(6))
    writer = RunWriter(url, "resumed", {"tags": {"resumed": "yes"}})
    writer.add_series(_params())
    writer.append("params", np.arange(6, 9), _rows(range(3), seed=3))
    writer.set(dropped=2)
    writer.close()
    _write(url, "empty", np.arange(0))
    _write(url, "one-row", np.arange(1), scalars=())
    writer = RunWriter(url, "nan", {"tags": {}})
    writer.add_series(_params())
    rows = _rows(range(5))
    rows[2, 1], rows[4, 0] = np.nan, np.inf
    writer.append("params", np.arange(5), rows)
    writer.close()
    zarr.open_group(url, mode="r+").create_group(
        "analyses/spectrum-1", attributes={"koopkit": {"node": "analysis", "version": "1.0"}}
    )
    # a chunk holding only the fill value may be left unwritten: readers see fill values
    (Path(url) / "runs/one-row/params/step/c/0").unlink()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    url = tmp_path_factory.mktemp("fast") / "base.zarr"
    write_runs(url)
    return url


def invoke(url, *args, fast: bool):
    """``koopkit info URL ARGS`` in-process: (exit code, stdout, stderr, warnings, zarr used)."""
    opened = []
    real_open = reader.open_store

    def open_store(u):
        opened.append(u)
        return real_open(u)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(reader, "open_store", open_store))
        if not fast:
            stack.enter_context(mock.patch.object(reader, "open_local_nodes", lambda u: None))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, ["info", str(url), *args], prog_name="koopkit")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    seen = [(w.category.__name__, str(w.message)) for w in caught]
    return (result.exit_code, result.stdout, result.stderr, seen), bool(opened)


def check_same(url, *, fast: bool):
    """Both readers give the same output; ``fast``: the JSON reader answered (zarr not opened)."""
    outputs = []
    for args in ((), ("--json",)):
        got, used_zarr = invoke(url, *args, fast=True)
        expected, _ = invoke(url, *args, fast=False)
        assert got == expected
        assert used_zarr is not fast, "answered by zarr" if fast else "answered without zarr"
        outputs.append(got)
    return outputs


# --------------------------------------------------------------------------------------------
# stores the JSON reader answers for


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _run_attrs(run, edit):
    return lambda d: _edit_json(d / "runs" / run / "zarr.json", lambda m: edit(m["attributes"]))


def _schema_violation(attrs):
    attrs.update(status="exploded", tags={"width": [1, 2]})
    del attrs["created"]


def _rename(old, new):
    return lambda d: (d / "runs" / old).rename(d / "runs" / new)


def _value_doc(run, edit):
    return lambda d: _edit_json(d / "runs" / run / "params" / "value" / "zarr.json", edit)


FAST = {
    "as-written": lambda d: None,
    "schema-invalid-run": _run_attrs("mlp/seed0", _schema_violation),
    "committed-past-the-rows": _run_attrs(
        "mlp/seed1", lambda a: a["committed_steps"].update(params=99)
    ),
    "committed-steps-not-a-mapping": _run_attrs("resumed", lambda a: a.update(committed_steps=7)),
    "committed-steps-negative": _run_attrs(
        "nan", lambda a: a.update(committed_steps={"params": -3})
    ),
    "tags-not-a-mapping": _run_attrs("mlp/seed0", lambda a: a.update(tags=["x"], nonfinite=[1])),
    "attrs-with-nan-and-huge-text": _run_attrs(
        "empty", lambda a: a.update(device="x" * 100_000, lr=float("nan"))
    ),
    "value-dtype-bool": _value_doc(
        "mlp/seed0",
        lambda m: m.update(data_type="bool", fill_value=False, codecs=[{"name": "bytes"}]),
    ),
    "value-fill-nan": _value_doc("mlp/seed0", lambda m: m.update(fill_value="NaN")),
    "run-dir-with-an-invalid-name": _rename("empty", "em pty"),
    "not-a-run-group-only": lambda d: zarr.open_group(d, mode="r+").create_group("runs/lonely"),
    "no-runs-group": lambda d: shutil.rmtree(d / "runs"),
    "plain-zarr-group": lambda d: _edit_json(
        d / "zarr.json", lambda m: m.update(attributes={"x": 1})
    ),
    "future-format-version": lambda d: _edit_json(
        d / "zarr.json", lambda m: m["attributes"]["koopkit"].update(version="2.0")
    ),
    "other-format": lambda d: _edit_json(
        d / "zarr.json", lambda m: m["attributes"].update(koopkit="trajectory-store")
    ),
}


@pytest.mark.parametrize("edit", FAST.values(), ids=FAST.keys())
def test_json_reader_answers_as_zarr_does(base, tmp_path, edit):
    url = tmp_path / "s.zarr"
    shutil.copytree(base, url)
    edit(url)
    check_same(url, fast=True)


def test_the_answer_itself(base):
    (code, text, err, seen), (_, js, _, _) = check_same(base, fast=True)
    assert code == 0 and err == "" and seen == []
    summary = json.loads(js)
    runs = {run["run_id"]: run for run in summary["runs"]}
    assert list(runs) == sorted(runs) and len(runs) == 8
    assert {"fcn/h5/seed0", "fcn/h5/seed1", "mlp/seed0", "mlp/seed1"} <= set(runs)
    assert runs["fcn/h5/seed0"]["status"] == "interrupted"
    assert runs["fcn/h5/seed1"]["status"] == "recording"
    assert runs["resumed"]["series"]["params"]["last_step"] == 8
    assert runs["resumed"]["dropped"] == 2
    assert runs["mlp/seed1"]["series"]["params"]["first_step"] == 5
    assert runs["empty"]["series"]["params"]["first_step"] is None
    fill = json.loads((base / "runs/one-row/params/step/zarr.json").read_text())["fill_value"]
    assert runs["one-row"]["series"]["params"] == {
        "committed": 1,
        "shape": [1, WIDTH],
        "dtype": "float32",
        "first_step": fill,  # its only chunk was never written
        "last_step": fill,
    }
    assert runs["nan"]["nonfinite"] == {"params": [2, 4]}
    assert summary["analyses"] == ["spectrum-1"]
    assert "NaN/Inf in params at 2 step(s)" in text


def test_a_file_url_is_read_without_zarr(base):
    check_same(f"file://{base}", fast=True)


@pytest.mark.parametrize(
    "name, make, fragment",
    [
        ("missing", lambda p: None, "not a directory"),
        ("a-file", lambda p: p.write_bytes(b"\x00" * 64), "not a directory"),
    ],
)
def test_errors_before_any_document(tmp_path, name, make, fragment):
    url = tmp_path / name
    make(url)
    (code, _, err, _), _ = check_same(url, fast=True)
    assert code == 1 and err.startswith("Error: ") and fragment in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# stores only zarr can answer for: the JSON reader steps aside, and the output is the same


def _root_text(text):
    return lambda d: (d / "zarr.json").write_text(text)


def _compress_steps(d):
    path = d / "runs" / "mlp" / "seed0" / "params" / "step"
    old = zarr.open_array(path, mode="r")
    data, chunks = old[...], old.chunks
    shutil.rmtree(path)
    zarr.open_group(path.parent, mode="r+").create_array(
        "step",
        data=data,
        chunks=chunks,
        dimension_names=("step",),
        compressors=zarr.codecs.ZstdCodec(level=1),
    )


def _truncate_step_chunk(d):
    chunk = d / "runs" / "mlp" / "seed1" / "params" / "step" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])


def _scalars_is_an_array(d):
    shutil.rmtree(d / "runs" / "resumed" / "scalars")
    zarr.open_group(d / "runs" / "resumed", mode="r+").create_array(
        "scalars", shape=(2,), dtype="int8"
    )


def _consolidate(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not part of the Zarr format 3 specification"
        zarr.consolidate_metadata(str(d))


ZARR_ONLY = {
    "stray-file-among-runs": lambda d: (d / "runs" / "notes.txt").write_text("hi"),
    "folder-without-metadata": lambda d: (d / "runs" / "mlp" / "scratch").mkdir(),
    "consolidated-metadata": _consolidate,
    "steps-compressed": _compress_steps,
    "step-chunk-truncated": _truncate_step_chunk,
    "scalars-is-an-array": _scalars_is_an_array,
    "value-doc-extra-field": _value_doc(
        "mlp/seed1", lambda m: m.update(extra={"must_understand": False})
    ),
    "value-doc-unknown-codec": _value_doc(
        "mlp/seed1", lambda m: m["codecs"].append({"name": "crc32c"})
    ),
    "value-doc-bad-fill": _value_doc("mlp/seed1", lambda m: m.update(fill_value="zero")),
    "value-doc-missing": lambda d: (d / "runs" / "nan" / "params" / "value" / "zarr.json").unlink(),
    "run-doc-not-json": lambda d: (d / "runs" / "empty" / "zarr.json").write_text("{not json"),
    "root-not-json": _root_text("{not json"),
    "root-a-json-list": _root_text("[1, 2, 3]"),
    "root-an-array": _root_text(json.dumps({"zarr_format": 3, "node_type": "array", "shape": [2]})),
    "root-nested-200000-deep": _root_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {"koopkit": '
        + "[" * 200_000
        + "]" * 200_000
        + "}}"
    ),
    "root-metadata-missing": lambda d: (d / "zarr.json").unlink(),
}


@pytest.mark.parametrize("edit", ZARR_ONLY.values(), ids=ZARR_ONLY.keys())
def test_zarr_answers_what_the_json_reader_does_not_vouch_for(base, tmp_path, edit):
    url = tmp_path / "s.zarr"
    shutil.copytree(base, url)
    edit(url)
    check_same(url, fast=False)


def test_zarr_warnings_are_kept(base, tmp_path):
    url = tmp_path / "s.zarr"
    shutil.copytree(base, url)
    (url / "runs" / "notes.txt").write_text("hi")
    (code, _, _, seen), _ = check_same(url, fast=False)
    assert code == 0 and any("notes.txt" in message for _, message in seen), seen


def test_an_empty_folder_is_refused_alike(tmp_path):
    (code, _, err, _), _ = check_same(tmp_path, fast=False)
    assert code == 1 and err.startswith("Error: ")


def test_zip_and_memory_stores_go_through_zarr(base, tmp_path, memory_url):
    target = tmp_path / "s.zip"
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(base.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(base).as_posix())
    (code, _, _, _), _ = check_same(target, fast=False)
    assert code == 0
    _write(memory_url, "a/b", np.arange(4))
    (code, text, _, _), _ = check_same(memory_url, fast=False)
    assert code == 0 and "a/b  [complete]" in text
