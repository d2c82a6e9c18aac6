"""``koopkit spectrum`` and ``koopkit compare``: bad input fails early, output says what it is."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest

import koopkit
import koopkit.plugins
from koopkit.errors import EstimationError, SelectionError, StoreError
from koopkit.results import TestResult
from koopkit.store.importers import import_npy


def _trajectory(rho: float, seed: int) -> np.ndarray:
    """A noisy 4-D linear system with slow modes ``rho``, ``0.8 rho``, 0.3 and 0.95."""
    rng = np.random.default_rng(seed)
    a = np.diag([rho, 0.8 * rho, 0.3, 0.95]) + 0.01 * rng.normal(size=(4, 4))
    x = [rng.normal(size=4)]
    for _ in range(60):
        x.append(a @ x[-1] + 1e-3 * rng.normal(size=4))
    return np.array(x, dtype=np.float32)


def _import(url, tmp, run, x, tags):
    path = tmp / f"{run.replace('/', '-')}.npy"
    np.save(path, x)
    import_npy(path, url, run, tags=tags)


@pytest.fixture(scope="module")
def two_conditions(tmp_path_factory):
    """Conditions ``cond=a|b`` (different dynamics), three seeds each."""
    tmp = tmp_path_factory.mktemp("analyse")
    url = tmp / "runs.zarr"
    for cond, rho in (("a", 0.9), ("b", 0.5)):
        for seed in range(3):
            x = _trajectory(rho, 10 * seed + (cond == "b"))
            _import(url, tmp, f"r/{cond}{seed}", x, {"cond": cond, "seed": seed})
    return url


@pytest.fixture
def store(two_conditions, tmp_path):
    url = tmp_path / "copy.zarr"
    shutil.copytree(two_conditions, url)
    return url


def _one_error_line(result) -> str:
    """The only stderr line that is not progress, checked to be an error without traceback."""
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[")]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------------------------
# D1: bad option values fail at once; a failing command writes nothing


@pytest.mark.parametrize(
    "args, option",
    [
        (["--n-perm", "0"], "--n-perm"),
        (["--seed", "-1"], "--seed"),
        (["-o", "{tmp}/no/such/folder/fig.png"], "--output"),
        (["-o", "{tmp}/fig.xyz"], "--output"),
    ],
    ids=["n-perm-0", "seed-negative", "figure-folder-missing", "figure-format-unknown"],
)
def test_compare_bad_options_fail_before_any_estimation(cli_runner, store, tmp_path, args, option):
    args = [a.format(tmp=tmp_path) for a in args]
    result = cli_runner("compare", store, "--by", "cond", "--replicate", "seed", *args)
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert option in line, line
    assert "[1/" not in result.stderr  # no group was estimated
    assert not (store / "analyses").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--by", "cond", "--replicate", "cond"], "Invalid replicate tag 'cond'"),
        (["--by", "cond", "--where", "cond=a"], "Expected at least 2 conditions"),
    ],
    ids=["replicate-is-by", "one-condition"],
)
def test_compare_bad_groupings_fail_before_any_estimation(cli_runner, store, args, named):
    result = cli_runner("compare", store, *args)
    assert result.exit_code == 1, result.output
    assert named in _one_error_line(result)
    assert "[1/" not in result.stderr
    assert not (store / "analyses").exists()


def test_spectrum_bad_figure_fails_before_any_estimation(cli_runner, store, tmp_path):
    result = cli_runner("spectrum", store, "-o", tmp_path / "fig.notaformat")
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert "--output" in line and ".notaformat" in line and ".png" in line
    assert "[1/" not in result.stderr
    assert not (store / "analyses").exists()


@pytest.mark.parametrize("command", ["compare", "spectrum"])
def test_a_store_that_cannot_be_saved_into_fails_before_any_estimation(
    cli_runner, store, tmp_path, command, zip_directory
):
    zipped = zip_directory(store, tmp_path / "runs.zip")
    extra = ["--by", "cond", "--replicate", "seed"] if command == "compare" else []
    result = cli_runner(command, zipped, *extra, "-o", tmp_path / "fig.png")
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "zip file" in line and "--no-save" in line
    assert "[1/" not in result.stderr and not (tmp_path / "fig.png").exists()
    result = cli_runner(command, zipped, *extra, "--no-save", "--json")
    assert result.exit_code == 0, result.output


def test_a_store_without_write_permission_fails_before_any_estimation(
    cli_runner, store, monkeypatch
):
    """os.access is asked (chmod cannot take the permission from root, who runs CI)."""
    from koopkit.store import location

    monkeypatch.setattr(location.os, "access", lambda path, mode: os.fspath(path) != str(store))
    result = cli_runner("spectrum", store)
    assert result.exit_code == 1, result.output
    assert "is not writable (permission denied); pass --no-save" in _one_error_line(result)
    assert "[1/" not in result.stderr
    assert cli_runner("spectrum", store, "--no-save").exit_code == 0


def test_compare_refuses_to_save_into_a_zip_before_any_estimation(
    store, tmp_path, monkeypatch, zip_directory
):
    from koopkit import pipeline

    zipped = zip_directory(store, tmp_path / "runs.zip")
    monkeypatch.setattr(pipeline, "estimate_groups", lambda *a, **k: pytest.fail("estimated"))
    with pytest.raises(StoreError, match="save=False"):
        koopkit.compare(zipped, "cond", replicate="seed")


@pytest.mark.parametrize("command", ["compare", "spectrum"])
def test_a_figure_that_cannot_be_written_leaves_no_analysis(
    cli_runner, store, tmp_path, monkeypatch, command
):
    from koopkit import plots

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "fig.png"))

    monkeypatch.setattr(plots, "plot_comparison", disk_full)
    monkeypatch.setattr(plots, "plot_spectra", disk_full)
    extra = ["--by", "cond", "--replicate", "seed"] if command == "compare" else []
    result = cli_runner(command, store, *extra, "-o", tmp_path / "fig.png")
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert line == f"Error: No space left on device: {str(tmp_path / 'fig.png')!r}"
    assert not (store / "analyses").exists()
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, named",
    [
        (["--rank", "2", "--param", "rank=3"], "'rank' is given as --rank too"),
        (["--delays", "2", "--param", "delays=3"], "'delays' is given as --delays too"),
    ],
)
def test_an_estimator_parameter_given_twice_is_refused(cli_runner, store, args, named):
    result = cli_runner("spectrum", store, *args, "--no-save")
    assert result.exit_code == 2, result.output
    assert named in _one_error_line(result)
    assert "[1/" not in result.stderr


def test_compare_saves_after_the_figure(cli_runner, store, tmp_path):
    figure = tmp_path / "fig.png"
    result = cli_runner("compare", store, "--by", "cond", "--replicate", "seed", "-o", figure)
    assert result.exit_code == 0, result.output
    assert figure.read_bytes().startswith(b"\x89PNG")
    (analysis,) = [p.name for p in (store / "analyses").iterdir() if p.is_dir()]
    assert f"saved analyses/{analysis}" in result.stderr


def test_metric_and_test_are_created_before_estimating(store, monkeypatch):
    from koopkit import pipeline

    def estimated(*args, **kwargs):
        raise AssertionError("estimated before the test and metric were created")

    monkeypatch.setattr(pipeline, "estimate_groups", estimated)
    with pytest.raises(EstimationError, match="Invalid n_perm 0"):
        koopkit.compare(store, "cond", replicate="seed", test_params={"n_perm": 0}, save=False)
    with pytest.raises(EstimationError, match="Invalid seed -1"):
        koopkit.compare(store, "cond", replicate="seed", test_params={"seed": -1}, save=False)
    with pytest.raises(EstimationError, match="Invalid weights 'mass'"):
        koopkit.compare(store, "cond", metric_params={"weights": "mass"}, save=False)


# --------------------------------------------------------------------------------------------
# D3: a corrupt node document is one line naming it


def _corrupt_run(url):
    (url / "runs" / "r" / "a1" / "zarr.json").write_text("{bad")
    return "runs/r/a1/zarr.json"


def _corrupt_array(url):
    (url / "runs" / "r" / "b2" / "params" / "value" / "zarr.json").write_text("{bad")
    return "runs/r/b2/params/value/zarr.json"


@pytest.mark.parametrize("corrupt", [_corrupt_run, _corrupt_array], ids=["run", "array"])
@pytest.mark.parametrize(
    "args",
    [
        ("info",),
        ("info", "--json"),
        ("spectrum", "--no-save"),
        ("compare", "--by", "cond", "--replicate", "seed", "--no-save"),
    ],
    ids=["info", "info-json", "spectrum", "compare"],
)
def test_a_corrupt_node_document_is_named(cli_runner, store, corrupt, args):
    document = corrupt(store)
    result = cli_runner(args[0], store, *args[1:])
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert line == (
        f"Error: {str(store / document)!r} is not valid JSON (line 1 column 2); "
        "repair or remove that node."
    )
    assert result.stdout == ""


@pytest.mark.parametrize("corrupt", [_corrupt_run, _corrupt_array], ids=["run", "array"])
def test_validate_names_a_corrupt_node_document(cli_runner, store, corrupt):
    document = corrupt(store)
    result = cli_runner("validate", store)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"invalid: {str(store / document)!r} is not valid JSON (line 1 column 2); "
        "repair or remove that node."
    ]


def test_a_corrupt_document_among_many_runs_prints_one_line(run_koopkit, tmp_path):
    """zarr reads the children of a group concurrently; none is left pending to print noise."""
    url = tmp_path / "many.zarr"
    x = _trajectory(0.9, 0)
    for i in range(30):
        _import(url, tmp_path, f"r/x{i:02d}", x, {"i": i})
    (url / "runs" / "r" / "x05" / "zarr.json").write_text("{bad")
    expected = f"{str(url / 'runs/r/x05/zarr.json')!r} is not valid JSON (line 1 column 2)"
    for command, prefix in (("info", "Error: "), ("validate", "invalid: ")):
        proc = run_koopkit(command, url)
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [f"{prefix}{expected}; repair or remove that node."]


# --------------------------------------------------------------------------------------------
# D4: uncalibrated scores are labelled, and not Holm-corrected


def test_bootstrap_is_reported_as_an_uncalibrated_score(cli_runner, store):
    args = ("compare", store, "--by", "cond", "--replicate", "seed", "--no-save")
    result = cli_runner(*args, "--test", "bootstrap")
    assert result.exit_code == 0, result.output
    assert "uncalibrated p" in result.stdout and "not Holm-corrected" in result.stdout
    assert "p-values (Holm-corrected)" not in result.stdout
    out = _strict_json(cli_runner(*args, "--test", "bootstrap", "--json").stdout)
    assert out["test"]["calibrated"] is False
    assert out["test"]["p_value_holm"] == [[None, None], [None, None]]
    score = out["test"]["p_value"][0][1]
    assert 0 < score < 0.05  # (hits + 1) / (n + 1), never exactly 0
    saved = cli_runner(*args[:-1], "--test", "bootstrap")
    assert saved.exit_code == 0, saved.output
    (analysis,) = koopkit.open_store(store).root["analyses"].groups()
    assert analysis[1].attrs["test"]["calibrated"] is False
    assert np.isnan(analysis[1]["p_value_holm"][...]).all()
    assert cli_runner("validate", store).exit_code == 0
    calibrated = _strict_json(cli_runner(*args, "--json").stdout)
    assert calibrated["test"]["calibrated"] is True
    assert calibrated["test"]["p_value_holm"][0][1] == calibrated["test"]["p_value"][0][1]


class _Registers:
    """A throwaway plugin registering one estimator or test, the way a third party does."""

    def __init__(self, kind, name, factory):
        self.kind, self.name, self.factory = kind, name, factory

    def _register(self, kind, register):
        if kind == self.kind:
            register(self.name, self.factory, description=f"throwaway {kind}")

    @koopkit.hookimpl
    def koopkit_register_estimators(self, register):
        self._register("estimator", register)

    @koopkit.hookimpl
    def koopkit_register_tests(self, register):
        self._register("test", register)


class _HalfTest:
    """A third-party test written before ``calibrated`` existed: its value is a p-value."""

    def run(self, groups, metric):
        from koopkit.results import TestResult

        return TestResult(1.0, 0.02)


class _NaNResiduals:
    """A third-party estimator whose residuals overflowed."""

    def fit(self, trajectories):
        return koopkit.Spectrum([0.5, 0.9], residuals=[np.nan, np.inf])


@pytest.fixture
def register():
    """``register(kind, name, factory)``: a throwaway plugin until the test ends."""
    pm = koopkit.plugins.get_plugin_manager()
    names = []

    def add(kind, name, factory):
        pm.register(_Registers(kind, name, factory), name=f"throwaway-{name}")
        names.append(name)
        koopkit.plugins.registry.cache_clear()

    try:
        yield add
    finally:
        for name in names:
            pm.unregister(name=f"throwaway-{name}")
        koopkit.plugins.registry.cache_clear()


def test_a_third_party_test_without_the_attribute_is_a_p_value(store, register):
    register("test", "half", _HalfTest)
    result = koopkit.compare(store, "cond", replicate="seed", test="half", save=False)
    assert result.calibrated is True
    assert result.p_value[0, 1] == result.p_value_holm[0, 1] == 0.02  # one pair: Holm is p


def test_saved_analyses_record_the_package_and_version_of_each_plugin(cli_runner, store, register):
    register("test", "half", _HalfTest)  # registered in-process: no distribution provides it
    spectrum = cli_runner("spectrum", store, "--where", "cond=a", "--rank", "2")
    assert spectrum.exit_code == 0, spectrum.output
    args = ("compare", store, "--by", "cond", "--replicate", "seed", "--test", "half")
    compare = cli_runner(*args)
    assert compare.exit_code == 0, compare.output
    attrs = {
        group.attrs["kind"]: group.attrs.asdict()
        for _, group in koopkit.open_store(store).root["analyses"].groups()
    }
    assert attrs["comparison"]["plugin_packages"] == {
        "estimator:dmd": "koopkit",
        "metric:wasserstein": "koopkit",
        "test:half": None,
    }
    listed = {f"{e['kind']}:{e['name']}": e for e in koopkit.plugins.list_plugins()}
    for analysis in attrs.values():  # what ``koopkit plugins --json`` says of each
        used = analysis["plugin_packages"]
        assert used == {key: listed[key]["package"] for key in used}
        assert analysis["plugins"] == {key: listed[key]["version"] for key in used}
    assert set(attrs["spectrum"]["plugins"]) == {"estimator:dmd"}
    assert cli_runner("validate", store).exit_code == 0


class _OddTest:
    """Returns ``value`` (or raises it, if it is an exception) for every pair."""

    calibrated = False  # the range is checked for scores too, not only before Holm

    def __init__(self, value):
        self.value = value

    def run(self, groups, metric):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


@pytest.mark.parametrize(
    "value, message",
    [
        (TestResult(0.0, 1.7, np.array([])), "returned p-value 1.7 for conditions 'a' and 'b'"),
        (TestResult(0.0, -0.2, np.array([])), "returned p-value -0.2"),
        ({"p_value": 0.5}, "returned dict for conditions 'a' and 'b'"),
        (TestResult(0.0, None, np.array([])), "returned p-value None"),
        (TestResult(0.0, True, np.array([])), "returned p-value True"),
        (KeyError("lost"), "failed on conditions 'a' and 'b': KeyError: 'lost'"),
    ],
)
def test_a_test_that_fails_or_returns_no_p_value_is_named_with_its_plugin(
    cli_runner, store, register, value, message
):
    register("test", "odd", lambda: _OddTest(value))
    result = cli_runner("compare", store, "--by", "cond", "--replicate", "seed", "--test", "odd")
    assert result.exit_code == 1, result.output
    assert f"Test 'odd' (plugin 'throwaway-odd') {message}" in _one_error_line(result)
    assert not (store / "analyses").exists()


def test_a_test_may_return_nan_where_it_has_no_p_value(cli_runner, store, register):
    register("test", "odd", lambda: _OddTest(TestResult(0.0, float("nan"), np.array([]))))
    result = cli_runner("compare", store, "--by", "cond", "--replicate", "seed", "--test", "odd")
    assert result.exit_code == 0, result.output


def test_compare_with_three_conditions_holm_corrects_only_calibrated(tmp_path):
    url = tmp_path / "three.zarr"
    for cond, rho in (("a", 0.9), ("b", 0.5), ("c", 0.2)):
        for seed in range(3):
            _import(url, tmp_path, f"{cond}{seed}", _trajectory(rho, seed), {"c": cond, "s": seed})
    options = {"replicate": "s", "save": False, "estimator_params": {"rank": 4}}
    permutation = koopkit.compare(url, "c", **options)
    assert np.isfinite(permutation.p_value_holm[np.triu_indices(3, 1)]).all()
    assert (permutation.p_value_holm >= permutation.p_value)[np.triu_indices(3, 1)].all()
    swap = koopkit.compare(url, "c", test="eigen-swap", **options)
    assert swap.calibrated is False and np.isnan(swap.p_value_holm).all()
    assert {p["p_value_holm"] for p in swap.pairs()} != {0.0}
    assert all(np.isnan(p["p_value_holm"]) for p in swap.pairs())


# --------------------------------------------------------------------------------------------
# D7-D9: strict JSON, condition labels, no made-up within distance


def test_spectrum_json_never_holds_nan(cli_runner, store, register):
    register("estimator", "nan-residuals", _NaNResiduals)
    result = cli_runner("spectrum", store, "--estimator", "nan-residuals", "--no-save", "--json")
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    spectra = _strict_json(result.stdout)["spectra"]
    assert len(spectra) == 6 and all(s["residuals"] == [None, None] for s in spectra)


def test_print_json_maps_non_finite_numbers_to_null(capsys):
    from koopkit.cli.options import print_json

    print_json({"a": float("nan"), "b": [np.float32(1.5), -np.inf], "c": np.array([np.nan, 2.0])})
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [1.5, None], "c": [None, 2.0]}


def test_spectrum_json_maps_nan_residuals_to_null():
    spectrum = koopkit.Spectrum([0.5, 0.9], residuals=[np.nan, 0.1], amplitudes=[np.inf, 1])
    out = spectrum.to_json()
    assert out["residuals"] == [None, 0.1]
    assert out["amplitudes"] == [[None, 0.0], [1.0, 0.0]]
    json.dumps(out, allow_nan=False)


def test_condition_labels_are_strings_everywhere(cli_runner, store):
    result = cli_runner(
        "compare", store, "--by", "seed", "--replicate", "cond", "--no-save", "--json"
    )
    assert result.exit_code == 0, result.output
    out = _strict_json(result.stdout)
    assert out["conditions"] == ["0", "1", "2"]
    assert [s["condition"] for s in out["spectra"]] == ["0", "0", "1", "1", "2", "2"]
    assert [s["replicate"] for s in out["spectra"]] == ["a", "b"] * 3


def test_tag_values_that_print_alike_are_refused(cli_runner, tmp_path):
    url = tmp_path / "alike.zarr"
    for i, w in enumerate((1, "1", 2, 2)):
        _import(url, tmp_path, f"r{i}", _trajectory(0.5 + 0.1 * i, i), {"w": w, "seed": i})
    result = cli_runner("compare", url, "--by", "w", "--no-save")
    line = _one_error_line(result)
    assert "Tag 'w' has distinct values 1 (int) and '1' (str) that print alike as '1'" in line
    assert "[1/" not in result.stderr  # refused before estimating
    with pytest.raises(SelectionError, match="print alike"):
        koopkit.compare(url, "seed", replicate="w", save=False)


def test_booleans_and_integers_are_distinct_conditions(tmp_path):
    url = tmp_path / "flags.zarr"
    for i, flag in enumerate((True, True, 1, 1)):
        _import(url, tmp_path, f"r{i}", _trajectory(0.5 + 0.1 * i, i), {"f": flag, "seed": i})
    result = koopkit.compare(url, "f", test=None, save=False, estimator_params={"rank": 4})
    assert result.conditions == ["1", "True"]


def test_a_single_spectrum_has_no_within_distance(cli_runner, store):
    result = cli_runner("compare", store, "--by", "cond", "--no-save", "--json")
    out = _strict_json(result.stdout)
    mean, std = out["distance"]["mean"], out["distance"]["std"]
    assert mean[0][0] is None and mean[1][1] is None and std[0][0] is None
    assert mean[0][1] > 0
    text = cli_runner("compare", store, "--by", "cond", "--no-save").stdout
    assert "0 (0)" not in text and "- (-)" in text


# --------------------------------------------------------------------------------------------
# D10-D11: messages


def test_missing_tag_names_only_the_missing_tag_and_counts_the_rest(cli_runner, store):
    result = cli_runner("compare", store, "--by", "cond", "--replicate", "nosuch", "--no-save")
    line = _one_error_line(result)
    assert line.startswith(
        "Error: No tag 'nosuch' on 6 runs: 'r/a0', 'r/a1', 'r/a2', 'r/b0', 'r/b1' (and 1 more); "
    )
    assert "'cond'" not in line


def test_debug_is_accepted_after_the_subcommand(cli_runner, tmp_path):
    missing = tmp_path / "nope.zarr"
    for args in (
        ("info", missing, "--debug"),
        ("import", "npy", "--debug", missing, "s", "--run", "a"),
    ):
        result = cli_runner(*args)
        assert result.exit_code == 1
        assert not isinstance(result.exception, SystemExit), result.output  # the traceback
    result = cli_runner("info", missing)
    assert isinstance(result.exception, SystemExit) and "--debug" not in result.stderr


def test_writing_into_a_store_that_refuses_is_one_plain_line(cli_runner, store):
    (store / "analyses").write_text("{}")  # a file where the analyses group should be
    result = cli_runner("compare", store, "--by", "cond", "--replicate", "seed")
    line = _one_error_line(result)
    assert line.startswith("Error: Cannot write 'analyses/comparison-")
    assert line.endswith(f"into store {str(store)!r}: Not a directory.")
    assert "unexpected" not in line


def test_the_same_analysis_saved_twice_keeps_both(cli_runner, store, monkeypatch):
    """Saved twice in one second, an analysis gets the same id: the first must survive."""
    monkeypatch.setattr("koopkit.store.analyses._analysis_id", lambda kind, attrs: f"{kind}-x")
    args = ("spectrum", store, "--where", "cond=a", "--estimator", "dmd", "--rank", "2", "--json")
    outputs = [cli_runner(*args) for _ in range(2)]
    assert [r.exit_code for r in outputs] == [0, 0], outputs[-1].output
    root = koopkit.open_store(store).root
    assert sorted(name for name, _ in root["analyses"].groups()) == ["spectrum-x", "spectrum-x-2"]
    for analysis, result in zip(("spectrum-x", "spectrum-x-2"), outputs, strict=True):
        expected = json.loads(result.stdout)["spectra"][0]["eigenvalues"]
        stored = root[f"analyses/{analysis}/spectra/0/eigenvalues"][...]
        assert [[z.real, z.imag] for z in stored] == expected  # stored exactly
    assert cli_runner("validate", store).exit_code == 0


def test_demo_out_that_cannot_be_created_is_one_plain_line(cli_runner, tmp_path):
    (tmp_path / "afile").write_text("")
    result = cli_runner("demo", "--out", tmp_path / "afile" / "sub")
    line = _one_error_line(result)
    assert (
        line == f"Error: Cannot write {str(tmp_path / 'afile' / 'sub')!r} (--out): Not a directory."
    )


# --------------------------------------------------------------------------------------------
# --series probes/NAME: a (step, sample, feature) series is analysed with samples x features
# as its features


def test_a_probe_series_is_analysed_with_samples_and_features_flattened(cli_runner, tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    url = tmp_path / "runs.zarr"
    probe = koopkit.Probe(torch.randn(4, 3), ["a", "b", "c", "d"])
    with koopkit.Recorder(url, run="r", model=model, probes={"p": probe}) as rec:
        for _ in range(30):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    result = cli_runner(
        "spectrum", url, "--series", "probes/p", "--rank", "3", "--no-save", "--json"
    )
    assert result.exit_code == 0, result.output
    (spectrum,) = _strict_json(result.stdout)["spectra"]
    outputs = np.asarray(koopkit.open_run(url, "r")["probes/p"]["value"])
    assert outputs.shape == (31, 4, 2)
    expected = koopkit.estimate(outputs.reshape(31, 8), rank=3).eigenvalues
    got = np.array([complex(re, im) for re, im in spectrum["eigenvalues"]])
    np.testing.assert_allclose(np.sort_complex(got), np.sort_complex(expected), atol=1e-10)
