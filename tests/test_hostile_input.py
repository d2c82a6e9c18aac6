"""Hostile and malformed input, one table: every case fails cleanly in a real ``koopkit`` process.

Each case builds its input in a private directory and runs the ``koopkit`` command in a fresh
interpreter (cwd = that directory). Whatever the input, the command must

- exit non-zero;
- print exactly one non-empty line on stderr, starting with ``Error:`` (``koopkit validate``
  prints one ``invalid:`` line per reason instead), naming the problem, and no traceback;
- write or change nothing outside the output the command was asked to write (a snapshot of
  path -> (size, mtime_ns, sha256) of the case directory before and after must agree);
- never run code from the data (payloads would create a marker file; it must not exist).

Plugins are code the user installed, so a broken plugin may also warn; its warnings must be
one ``Warning:`` line each, before the ``Error:`` line.

A fresh interpreter costs ~1 s of CPU in imports, too much for 50 cases. So the first time a
case asks for its outcome, every selected case is built and run at once: plugin cases (which
need plugin discovery to see their PYTHONPATH) in fresh interpreters, the others in children
forked from one preloaded interpreter (FORKSERVER): each is still a separate process running
``koopkit.cli.main`` with its own cwd, argv, stdout, stderr and exit status. Each test then
checks its own case. ``--debug`` is checked on the case that sets ``debug``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import koopkit
from koopkit.errors import KoopkitError
from koopkit.store.writer import RunWriter, SeriesSpec

LAUNCHER = "import sys; from koopkit.cli import main; sys.argv[0] = 'koopkit'; main()"
MARKER = "pwned"  # what a code-execution payload would create, in the case directory
WIDTH, STEPS = 3, 12
# Names that absolute zip members and escaping run ids would create; never there before.
ESCAPE = f"koopkit-hostile-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------
# building blocks


def trajectory(steps=STEPS, width=WIDTH, seed=0):
    """A well-conditioned linear trajectory: DMD gives a finite spectrum on it."""
    rng = np.random.default_rng(seed)
    matrix = np.diag(np.linspace(0.5, 0.95, width))
    states = [rng.standard_normal(width)]
    for _ in range(steps - 1):
        states.append(matrix @ states[-1])
    return np.asarray(states, dtype=np.float32)


def write_store(path, rows=None, run="r0"):
    """A small valid store with one run whose params are ``rows``."""
    rows = trajectory() if rows is None else np.asarray(rows, dtype=np.float32)
    writer = RunWriter(path, run, {"tags": {"seed": 0}}, resume=False)
    table = [{"name": "w", "offset": 0, "shape": [rows.shape[1]], "dtype": "float32"}]
    writer.add_series(
        SeriesSpec(
            "params",
            (rows.shape[1],),
            attrs={"kind": "full", "tensors": table},
            chunk_steps=4,
            row_dims=("param",),
        )
    )
    if len(rows):
        writer.append("params", np.arange(len(rows)), rows)
    writer.close()
    return path


def edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def edit_run(store, edit, run="r0"):
    edit_json(store / "runs" / run / "zarr.json", lambda m: edit(m["attributes"]))


def edit_root(store, edit):
    edit_json(store / "zarr.json", lambda m: edit(m["attributes"]))


class Payload:
    """Unpickling this runs code: it creates the marker directory ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def fake_plugin(d, source, entry="hostile"):
    """A third-party plugin distribution in ``d/site``, to put on PYTHONPATH."""
    site = d / "site"
    site.mkdir()
    (site / "koopkit_hostile_plugin.py").write_text(textwrap.dedent(source))
    info = site / "koopkit_hostile_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: koopkit-hostile-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(f"[koopkit]\n{entry} = koopkit_hostile_plugin\n")
    return {"PYTHONPATH": str(site)}


def zip_directory(directory, target, extra=()):
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(directory).as_posix())
        for name, data in extra:
            zf.writestr(name, data)
    return target


# --------------------------------------------------------------------------------------------
# the cases: build(d) makes the input under d and returns the command (and extra environment)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], list | tuple]
    fragments: tuple[str, ...] = ()  # each must appear in the error line (or the reasons)
    output: str | None = None  # the one path under d the command may create or change
    warnings_ok: bool = False  # a broken plugin may warn first, one line per warning
    debug: bool = False  # also run with --debug: then a traceback is expected
    bug: str | None = None  # a known bug: the case is a strict xfail

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {self.bug}")] if self.bug else []
        return pytest.param(self, id=self.id, marks=marks)


def _random_bytes(name):
    def build(d):
        (d / name).write_bytes(np.random.default_rng(0).bytes(4096))
        return ["info", name]

    return build


def _root_json(text):
    def build(d):
        (d / "s.zarr").mkdir()
        (d / "s.zarr" / "zarr.json").write_text(text)
        return ["info", "s.zarr"]

    return build


def _deeply_nested_root(d):
    (d / "s.zarr").mkdir()
    attrs = "[" * 200_000 + "]" * 200_000
    (d / "s.zarr" / "zarr.json").write_text(
        f'{{"zarr_format": 3, "node_type": "group", "attributes": {{"koopkit": {attrs}}}}}'
    )
    return ["info", "s.zarr"]


def _plain_group(d):
    zarr.open_group(d / "s.zarr", mode="w").attrs["x"] = 1
    return ["info", "s.zarr"]


def _root_attrs(edit, command="info"):
    def build(d):
        write_store(d / "s.zarr")
        edit_root(d / "s.zarr", edit)
        return [command, "s.zarr"]

    return build


def _run_attrs(edit, command=("validate",), run="r0"):
    def build(d):
        write_store(d / "s.zarr", run=run)
        edit_run(d / "s.zarr", edit, run=run)
        return [command[0], "s.zarr", *command[1:]]

    return build


def _huge_strings(attrs):
    attrs["tags"] = {"note": "A" * 5_000_000, "k" * 100_000: 1}
    attrs["device"] = "cuda:" + "9" * 1_000_000


def _missing_keys(attrs):
    for key in ("run_id", "committed_steps", "created"):
        del attrs[key]


def _wrong_types(attrs):
    attrs.update(status=42, tags=["width", 40], committed_steps={"params": "12"}, dropped=-1)


def _arrays(edit, command=("validate",)):
    def build(d):
        write_store(d / "s.zarr")
        edit(d / "s.zarr" / "runs" / "r0" / "params")
        return [command[0], "s.zarr", *command[1:]]

    return build


def _set_committed(n):
    def edit(params):
        edit_json(
            params.parent / "zarr.json",
            lambda m: m["attributes"]["committed_steps"].update(params=n),
        )

    return edit


def _shorter_step_array(params):
    zarr.open_array(params / "step", mode="r+").resize((STEPS - 4,))


def _steps(values):
    def edit(params):
        zarr.open_array(params / "step", mode="r+")[: len(values)] = values

    return edit


def _wider_tensors_table(params):
    edit_json(params / "zarr.json", lambda m: m["attributes"]["tensors"][0].update(shape=[5]))


def _truncated_chunk(params):
    chunk = params / "value" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])


def _value_dtype(params):
    edit_json(
        params / "value" / "zarr.json", lambda m: m.update(data_type="bool", fill_value=False)
    )


def _bad_analysis(d):
    write_store(d / "s.zarr")
    zarr.open_group(d / "s.zarr", mode="r+").create_group(
        "analyses/x", attributes={"koopkit": {"node": "analysis", "version": "1.0"}, "kind": 7}
    )
    return ["validate", "s.zarr"]


def _data(rows, command):
    def build(d):
        write_store(d / "s.zarr", rows=rows)
        return [command[0], "s.zarr", *command[1:]]

    return build


def _with_nan():
    rows = trajectory()
    rows[5, 1] = np.nan
    return rows


def _with_inf():
    rows = trajectory()
    rows[7, 0] = -np.inf
    return rows


def _run_dir_named(name):
    def build(d):
        write_store(d / "s.zarr")
        os.rename(d / "s.zarr" / "runs" / "r0", d / "s.zarr" / "runs" / name)
        return ["spectrum", "s.zarr", "--no-save", "--json"]

    return build


def _zip_traversal_only(d):
    root = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    with zipfile.ZipFile(d / "x.zip", "w") as zf:
        zf.writestr("../evil/zarr.json", root)
        zf.writestr(f"/tmp/{ESCAPE}/zarr.json", root)
        zf.writestr("..\\evil2\\zarr.json", root)
        assert "../evil/zarr.json" in zf.namelist()  # zipfile keeps hostile names as given
        assert f"/tmp/{ESCAPE}/zarr.json" in zf.namelist()
    return ["info", "x.zip"]


def _zip_store_with_traversal(command):
    def build(d):
        write_store(d / "s.zarr")
        zip_directory(
            d / "s.zarr",
            d / "x.zip",
            extra=[
                ("../evil/zarr.json", "{}"),
                (f"/tmp/{ESCAPE}/zarr.json", "{}"),
                ("runs/r0/../../../evil3", "x"),
            ],
        )
        shutil.rmtree(d / "s.zarr")
        return [command, "x.zip"]

    return build


def _zip_dotdot_group(d):
    write_store(d / "s.zarr")
    root = (d / "s.zarr" / "zarr.json").read_text()
    zip_directory(d / "s.zarr", d / "x.zip", extra=[("runs/../zarr.json", root)])
    shutil.rmtree(d / "s.zarr")
    return ["info", "x.zip"]


def _npy(array, run="a", command="npy", **save):
    def build(d):
        np.save(d / "x.npy", array, **save)
        return ["import", command, "x.npy", "s.zarr", "--run", run]

    return build


def _import_run_id(run_id, kind="npy"):
    def build(d):
        if kind == "npy":
            np.save(d / "x.npy", trajectory())
            source = "x.npy"
        else:
            (d / "ckpts").mkdir()
            for step in (0, 1):
                torch.save({"w": torch.zeros(2)}, d / "ckpts" / f"step_{step}.pt")
            source = "ckpts"
        return ["import", kind, source, "s.zarr", "--run", run_id]

    return build


def _npy_payload(d):
    array = np.empty((2, 2), dtype=object)
    array[...] = Payload(d / MARKER)
    np.save(d / "x.npy", array, allow_pickle=True)
    return ["import", "npy", "x.npy", "s.zarr", "--run", "a"]


def _npy_that_is_a_pickle(d):
    """A file named .npy holding a bare pickle: numpy would unpickle it if allowed to."""
    (d / "x.npy").write_bytes(pickle.dumps(Payload(d / MARKER)))
    return ["import", "npy", "x.npy", "s.zarr", "--run", "a"]


def _npy_huge_header(d):
    """A valid .npy header declaring 10^12 x 10^6 float32 values, followed by 16 bytes."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 1000000), }"
    header = header.ljust(118) + "\n"
    (d / "x.npy").write_bytes(
        b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(16)
    )
    return ["import", "npy", "x.npy", "s.zarr", "--run", "a"]


def _npy_random_bytes(d):
    (d / "x.npy").write_bytes(np.random.default_rng(1).bytes(1000))
    return ["import", "npy", "x.npy", "s.zarr", "--run", "a"]


def _checkpoints(how):
    def build(d):
        folder = d / "ckpts"
        folder.mkdir()
        torch.save({"w": torch.zeros(2)}, folder / "step_0.pt")
        evil = {"w": torch.zeros(2), "extra": Payload(d / MARKER)}
        if how == "torch.save":
            torch.save(evil, folder / "step_1.pt")
        else:
            with open(folder / "step_1.pt", "wb") as f:
                pickle.dump(evil, f)
        return ["import", "torch", "ckpts", "s.zarr", "--run", "a"]

    return build


def _into_foreign_directory(d):
    np.save(d / "x.npy", trajectory())
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("not a store")
    return ["import", "npy", "x.npy", "mine", "--run", "a"]


def _into_zip(d):
    np.save(d / "x.npy", trajectory())
    write_store(d / "s.zarr")
    zip_directory(d / "s.zarr", d / "x.zip")
    return ["import", "npy", "x.npy", "x.zip", "--run", "a"]


def _plugin(source, command=("spectrum", "s.zarr", "--estimator", "hostile", "--json")):
    def build(d):
        write_store(d / "s.zarr")
        return list(command), fake_plugin(d, source)

    return build


PLUGIN_RAISES_AT_IMPORT = 'raise RuntimeError("boom at import of the hostile plugin")\n'
PLUGIN_RAISES_AT_REGISTRATION = """\
    import koopkit

    @koopkit.hookimpl
    def koopkit_register_estimators(register):
        raise RuntimeError("boom while registering")
    """
PLUGIN_RAISES_IN_FIT = """\
    import koopkit

    class Hostile:
        def fit(self, trajectories):
            raise RuntimeError("boom inside fit")

    @koopkit.hookimpl
    def koopkit_register_estimators(register):
        register("hostile", Hostile)
    """
PLUGIN_RETURNS_GARBAGE = """\
    import koopkit

    class Hostile:
        def fit(self, trajectories):
            return {"eigenvalues": [0.5]}

    @koopkit.hookimpl
    def koopkit_register_estimators(register):
        register("hostile", Hostile)
    """
PLUGIN_DUPLICATE_NAME = """\
    import koopkit

    @koopkit.hookimpl
    def koopkit_register_estimators(register):
        register("dmd", object)
    """

SPECTRUM = ("spectrum", "--json")  # saves by default; --json keeps progress off stderr
SPECTRUM_JSON = ("spectrum", "--no-save", "--json")

CASES = [
    # ---- not a store at all
    Case("random-bytes-named-zarr", _random_bytes("x.zarr"), ("x.zarr",), debug=True),
    Case("random-bytes-named-zip", _random_bytes("x.zip"), ("x.zip",)),
    Case("missing-path", lambda d: ["info", "nowhere.zarr"], ("nowhere.zarr",)),
    Case("root-metadata-not-json", _root_json("{not json"), ("s.zarr",)),
    Case("root-metadata-json-list", _root_json("[1, 2, 3]"), ("s.zarr",)),
    Case(
        "root-metadata-is-an-array",
        _root_json(json.dumps({"zarr_format": 3, "node_type": "array", "shape": [2]})),
        ("s.zarr",),
    ),
    Case("root-metadata-nested-200000-deep", _deeply_nested_root, ("s.zarr",)),
    Case("zarr-group-without-koopkit-attrs", _plain_group, ("not a koopkit trajectory store",)),
    Case(
        "koopkit-attr-not-an-object",
        _root_attrs(lambda a: a.update(koopkit="trajectory-store")),
        ("not a koopkit trajectory store",),
    ),
    Case(
        "other-format-name",
        _root_attrs(lambda a: a["koopkit"].update(format="checkpoint-store")),
        ("not a koopkit trajectory store",),
    ),
    Case(
        "future-format-version",
        _root_attrs(lambda a: a["koopkit"].update(version="2.0")),
        ("2.0", "Upgrade koopkit"),
    ),
    Case(
        "format-version-not-a-string",
        _root_attrs(lambda a: a["koopkit"].update(version=1.0), command="validate"),
        ("version",),
    ),
    # ---- run attributes that violate the schema
    Case("run-attrs-wrong-types", _run_attrs(_wrong_types), ("status", "tags", "committed_steps")),
    Case("run-attrs-missing-keys", _run_attrs(_missing_keys), ("run_id", "committed_steps")),
    Case("run-attrs-huge-strings", _run_attrs(_huge_strings), ("tags", "device")),
    Case(
        "run-id-attr-with-dotdot",
        _run_attrs(lambda a: a.update(run_id="../../etc")),
        ("run_id",),
    ),
    Case("run-id-attr-absolute", _run_attrs(lambda a: a.update(run_id="/etc/passwd")), ("run_id",)),
    Case("run-id-attr-with-nul", _run_attrs(lambda a: a.update(run_id="r0\x00x")), ("run_id",)),
    Case(
        "committed-steps-not-a-mapping-spectrum",
        _run_attrs(lambda a: a.update(committed_steps="all"), command=SPECTRUM_JSON),
        ("committed_steps",),
    ),
    Case(
        "tags-not-a-mapping-spectrum",
        _run_attrs(lambda a: a.update(tags=["width", 40]), command=SPECTRUM_JSON),
        ("tags",),
    ),
    # ---- arrays that disagree with the metadata
    Case(
        "committed-steps-past-the-rows",
        _arrays(_set_committed(STEPS + 5)),
        (f"committed_steps is {STEPS + 5} but only {STEPS} rows",),
    ),
    Case("step-shorter-than-value", _arrays(_shorter_step_array), (f"only {STEPS - 4} rows",)),
    Case("steps-not-increasing", _arrays(_steps([0, 1, 2, 2, 1])), ("strictly increasing",)),
    Case("steps-negative", _arrays(_steps([-5])), ("strictly increasing",)),
    Case("tensors-table-wider-than-value", _arrays(_wider_tensors_table), ("tensors cover 5",)),
    Case(
        "truncated-chunk",
        _arrays(_truncated_chunk, command=SPECTRUM_JSON),
        ("runs/r0/params",),
    ),
    Case("value-of-booleans", _arrays(_value_dtype, command=SPECTRUM_JSON), ()),
    Case("analysis-attrs-invalid", _bad_analysis, ("analyses/x",)),
    Case("run-directory-with-illegal-name", _run_dir_named("bad name!"), ("bad name!",)),
    # ---- data that cannot be analysed (spectrum saves by default: nothing may be written)
    Case("nan-in-data", _data(_with_nan(), SPECTRUM), ("NaN or Inf",)),
    Case("inf-in-data", _data(_with_inf(), SPECTRUM), ("NaN or Inf",)),
    Case("zero-length-run", _data(np.zeros((0, WIDTH)), SPECTRUM), ("at least 2 steps", "Got 0")),
    Case("one-row-run", _data(trajectory()[:1], SPECTRUM), ("at least 2 steps", "Got 1")),
    # ---- zip stores with path traversal: nothing is ever extracted
    Case("zip-with-only-traversal-members", _zip_traversal_only, ("x.zip",)),
    Case("zip-with-dotdot-group", _zip_dotdot_group, ("runs/..",)),
    Case(
        "zip-store-with-traversal-members-validates",
        _zip_store_with_traversal("validate"),
        ("../evil/zarr.json", f"/tmp/{ESCAPE}/zarr.json"),
    ),
    # ---- run ids that would escape the store (NUL cannot be passed in argv: see run-id-attr)
    Case("import-run-id-dotdot", _import_run_id("../../../evil"), ("Invalid run id",), "s.zarr"),
    Case("import-run-id-absolute", _import_run_id(f"/tmp/{ESCAPE}"), ("Invalid run id",), "s.zarr"),
    Case(
        "import-run-id-backslash", _import_run_id("a\\..\\..\\evil"), ("Invalid run id",), "s.zarr"
    ),
    Case(
        "import-torch-run-id-inner-dotdot",
        _import_run_id("a/../../../evil", kind="torch"),
        ("Invalid run id",),
        "s.zarr",
    ),
    Case("import-into-a-foreign-directory", _into_foreign_directory, ("mine", "refusing")),
    Case("import-into-a-zip", _into_zip, ("zip",)),
    # ---- files that would run code, or claim absurd sizes
    Case(
        "torch-checkpoint-with-code",
        _checkpoints("torch.save"),
        ("step_1.pt", "weights_only"),
        "s.zarr",
    ),
    Case(
        "plain-pickle-checkpoint-with-code",
        _checkpoints("pickle.dump"),
        ("step_1.pt", "weights_only"),
        "s.zarr",
    ),
    Case("npy-object-array-with-code", _npy_payload, ("x.npy",), "s.zarr"),
    Case("npy-file-that-is-a-pickle-with-code", _npy_that_is_a_pickle, ("x.npy",), "s.zarr"),
    Case("npy-header-claims-a-petabyte", _npy_huge_header, ("x.npy",), "s.zarr"),
    Case("npy-random-bytes", _npy_random_bytes, ("x.npy",), "s.zarr"),
    Case("npy-of-strings", _npy(np.array([["a", "b"], ["c", "d"]])), ("numeric",), "s.zarr"),
    # ---- third-party plugins
    Case(
        "plugin-raises-at-import",
        _plugin(PLUGIN_RAISES_AT_IMPORT),
        ("hostile", "boom at import"),
        warnings_ok=True,
    ),
    Case(
        "plugin-raises-at-registration",
        _plugin(PLUGIN_RAISES_AT_REGISTRATION),
        ("hostile", "boom while registering"),
        warnings_ok=True,
    ),
    Case("plugin-raises-inside-fit", _plugin(PLUGIN_RAISES_IN_FIT), ("hostile", "boom inside fit")),
    Case(
        "plugin-fit-returns-no-spectrum",
        _plugin(PLUGIN_RETURNS_GARBAGE),
        ("hostile", "Spectrum"),
    ),
    Case(
        "plugin-registers-an-existing-name",
        _plugin(PLUGIN_DUPLICATE_NAME, command=("spectrum", "s.zarr", "--estimator", "dmd")),
        ("'dmd'", "'hostile'"),
    ),
]


# --------------------------------------------------------------------------------------------
# running the cases

# A preloaded interpreter that forks one child per command: each child is a real process
# running the real entry point (koopkit.cli.main) with its own cwd, stdout, stderr and exit
# status, without paying ~1 s of imports each. Plugin cases need plugin discovery to see their
# PYTHONPATH, so they run in fresh interpreters instead.
FORKSERVER = """\
import json, os, sys, traceback
import dask.array, numpy, torch, zarr, zarr.storage
import koopkit.cli, koopkit.pipeline, koopkit.store.analyses, koopkit.store.importers
import koopkit.store.reader, koopkit.store.validate
from koopkit.cli import main

def child(request):
    os.chdir(request["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["koopkit", *request["args"]]
    try:
        main()
        code = 0
    except SystemExit as exc:  # what the interpreter does with it at exit
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        code = code or 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

requests, workers, running, status = json.load(sys.stdin), int(sys.argv[1]), {}, {}
def reap():
    pid, wait = os.wait()
    status[running.pop(pid)] = os.waitstatus_to_exitcode(wait)
for request in requests:
    while len(running) >= workers:
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            child(request)
        finally:
            os._exit(70)
    running[pid] = request["id"]
while running:
    reap()
json.dump(status, sys.stdout)
"""


def snapshot(root: Path, skip: str | None = None) -> dict:
    """relative path -> (size, mtime_ns, sha256) of every file, "dir" for every directory."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if skip and (rel == skip or rel.startswith(skip + "/")):
            continue
        if path.is_symlink():
            out[rel] = ("symlink", os.readlink(path))
        elif path.is_dir():
            out[rel] = "dir"
        else:
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = (stat.st_size, stat.st_mtime_ns, digest)
    return out


@dataclasses.dataclass
class Outcome:
    """What one case's command did: exit status, stderr, and the snapshots around it."""

    directory: Path
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    debug_returncode: int | None = None
    debug_stderr: str = ""
    before: dict | None = None
    after: dict | None = None
    error: BaseException | None = None


def _environment(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOOPKIT_", "PYTHON"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a plugin's __pycache__ would show in the snapshot
    env.update(extra or {})
    return env


def _fresh_interpreter(args, cwd, env):
    proc = subprocess.run(
        [sys.executable, "-P", "-c", LAUNCHER, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _forked(requests, logs: Path, workers: int) -> dict:
    """Run ``{id: (args, cwd)}`` through the fork server; ``{id: (code, stdout, stderr)}``."""
    if not requests:
        return {}
    payload = []
    for key, (args, cwd) in requests.items():
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        payload.append(
            {
                "id": key,
                "args": [str(a) for a in args],
                "cwd": str(cwd),
                "stdout": str(logs / f"{name}.out"),
                "stderr": str(logs / f"{name}.err"),
            }
        )
    proc = subprocess.run(
        [sys.executable, "-P", "-c", FORKSERVER, str(workers)],
        input=json.dumps(payload),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"importing the CLI printed something:\n{proc.stderr}"
    status = json.loads(proc.stdout)
    return {
        r["id"]: (status[r["id"]], Path(r["stdout"]).read_text(), Path(r["stderr"]).read_text())
        for r in payload
    }


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected case, run concurrently the first time one of them is checked."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    ]
    base = tmp_path_factory.mktemp("hostile")
    logs = tmp_path_factory.mktemp("hostile-logs")
    results, forked, fresh = {}, {}, {}
    for case in selected:  # build every input first, then snapshot it
        outcome = results[case.id] = Outcome(base / case.id)
        try:
            outcome.directory.mkdir()
            built = case.build(outcome.directory)
            args, extra = built if isinstance(built, tuple) else (built, None)
            outcome.before = snapshot(outcome.directory, case.output)
        except Exception as exc:  # reported by the case's own test
            outcome.error = exc
            continue
        if extra:
            fresh[case.id] = (args, outcome.directory, _environment(extra))
        else:
            forked[case.id] = (args, outcome.directory)
        if case.debug:
            forked[f"{case.id} --debug"] = (["--debug", *args], outcome.directory)
    workers = max(2, min(8, 2 * (os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        started = {key: pool.submit(_fresh_interpreter, *job) for key, job in fresh.items()}
        done = _forked(forked, logs, workers)
        done.update({key: future.result() for key, future in started.items()})
    for case in selected:
        outcome = results[case.id]
        if outcome.error is None:
            outcome.returncode, outcome.stdout, outcome.stderr = done[case.id]
            if case.debug:
                outcome.debug_returncode, _, outcome.debug_stderr = done[f"{case.id} --debug"]
            outcome.after = snapshot(outcome.directory, case.output)
    return results


def _check_stderr(case: Case, stderr: str):
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("invalid: "):  # koopkit validate: one line per reason
        assert all(line.startswith("invalid: ") for line in lines), stderr
        assert all(len(line) < 1000 for line in lines), "a reason echoes a huge value"
        message = "\n".join(lines)
    else:
        if case.warnings_ok:  # one line per warning, then the error
            lines = [line for line in lines[:-1] if not line.startswith("Warning: ")] + lines[-1:]
        assert len(lines) == 1, stderr
        assert lines[0].startswith("Error: "), stderr
        assert len(lines[0]) < 2000, "the error echoes a huge value"
        message = lines[0]
    for fragment in case.fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_hostile_input_fails_cleanly(case, outcomes):
    outcome = outcomes[case.id]
    if outcome.error is not None:
        raise outcome.error
    assert outcome.returncode != 0, (outcome.stdout, outcome.stderr)
    assert outcome.returncode == 1, outcome.stderr  # an error, not a signal or a crash
    _check_stderr(case, outcome.stderr)
    assert outcome.after == outcome.before, "the command changed files it was not asked to"
    assert not (outcome.directory / MARKER).exists(), "code from the data ran"
    assert not (outcome.directory / "evil").exists()
    assert not Path("/tmp", ESCAPE).exists()
    if case.output and (outcome.directory / case.output).exists():
        try:  # a store the command created holds no run
            assert koopkit.open_store(outcome.directory / case.output).runs == {}
        except KoopkitError:
            pass
    if case.debug:
        assert outcome.debug_returncode != 0
        assert "Traceback (most recent call last)" in outcome.debug_stderr


def test_the_table_is_large_and_unique():
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)
