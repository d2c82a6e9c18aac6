"""A separate package found through its entry point, and koopkit.testing on every built-in.

The example package in ``examples/third_party_plugin`` is built and installed into a
temporary ``--target`` directory, put on the ``PYTHONPATH`` of subprocesses only, so this
environment is left as it was.
"""

import importlib.metadata
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import koopkit
from koopkit.results import Spectrum
from koopkit.testing import (
    EIGENVALUES,
    assert_eigenvalues_close,
    check_estimator,
    check_metric,
    check_significance,
    estimator_checks,
    linear_trajectories,
    metric_checks,
    significance_checks,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"
KOOPKIT = [sys.executable, "-c", "from koopkit.cli import main; main()"]


def write_store(path, runs: dict[str, np.ndarray], tags=None) -> None:
    """A trajectory store with one run per ``(steps, features)`` array, as the writer makes it."""
    from koopkit.store import layout
    from koopkit.store.writer import RunWriter, SeriesSpec

    for run_id, data in runs.items():
        writer = RunWriter(path, run_id, {"tags": dict(tags or {}, name=run_id)})
        spec = SeriesSpec(
            layout.PARAMS,
            (data.shape[1],),
            dtype="float64",
            attrs={
                "kind": "full",
                "tensors": [
                    {"name": "x", "offset": 0, "shape": [data.shape[1]], "dtype": "float64"}
                ],
            },
            row_dims=("param",),
        )
        writer.add_series(spec)
        writer.append(layout.PARAMS, np.arange(len(data)), data)
        writer.close()


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    """The example package installed (not editable) into a fresh directory."""
    source = tmp_path_factory.mktemp("source") / "third_party_plugin"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    shutil.copytree(
        EXAMPLE,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    site = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--quiet", "--target", str(site), str(source)]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return source, site


def run(command, site, cwd=None, **variables):
    """Run with the example package importable and only the given KOOPKIT_* variables set."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOOPKIT_")}
    env.update(variables, PYTHONPATH=path)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def test_installed_package_is_discovered_and_runs(example_site, tmp_path):
    source, site = example_site
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("koopkit-plugin-example")  # this process is untouched

    listed = run([*KOOPKIT, "plugins", "--json"], site)
    assert listed.returncode == 0, listed.stderr
    entries = {e["name"]: e for e in json.loads(listed.stdout)}
    assert entries["lstsq-dmd"] == {
        "name": "lstsq-dmd",
        "kind": "estimator",
        "plugin": "example",
        "package": "koopkit-plugin-example",
        "version": "0.1.0",
        "description": "Exact DMD by least squares in feature space (few features only).",
    }
    assert {"dmd", "wasserstein", "permutation"} <= set(entries)  # built-ins still there

    store = tmp_path / "runs.zarr"
    write_store(store, {"a": linear_trajectories()[0], "b": linear_trajectories(seed=5)[0]})
    command = [*KOOPKIT, "spectrum", str(store), "--estimator", "lstsq-dmd", "--rank", "4"]
    done = run([*command, "--json", "--no-save"], site)
    assert done.returncode == 0, done.stderr
    spectra = json.loads(done.stdout)["spectra"]
    assert [s["runs"] for s in spectra] == [["a"], ["b"]]
    for s in spectra:
        assert s["rank"] == 4
        eigenvalues = np.array([complex(re, im) for re, im in s["eigenvalues"]])
        if s["runs"] == ["a"]:
            assert_eigenvalues_close(eigenvalues, EIGENVALUES)
    assert not (store / "analyses").exists()

    # The package's own tests, which use koopkit.testing, pass where it is installed.
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], site, cwd=source)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_a_saved_analysis_records_the_installed_package(example_site, tmp_path):
    _, site = example_site
    store = tmp_path / "runs.zarr"
    write_store(store, {"a": linear_trajectories()[0]})
    done = run([*KOOPKIT, "spectrum", str(store), "--estimator", "lstsq-dmd", "--rank", "4"], site)
    assert done.returncode == 0, done.stderr
    ((_, analysis),) = koopkit.open_store(store).root["analyses"].groups()
    assert analysis.attrs["plugins"] == {"estimator:lstsq-dmd": "0.1.0"}
    assert analysis.attrs["plugin_packages"] == {"estimator:lstsq-dmd": "koopkit-plugin-example"}


def test_disabling_the_installed_plugin(example_site):
    _, site = example_site
    listed = run([*KOOPKIT, "plugins", "--json"], site, KOOPKIT_DISABLE_PLUGINS="example")
    assert listed.returncode == 0, listed.stderr
    names = {e["name"] for e in json.loads(listed.stdout)}
    assert "lstsq-dmd" not in names and "dmd" in names


# ------------------------------------------------------------- the built-in plugins

# Parameters that keep the 4 eigenvalues of the checks' linear system and add none.
BUILTIN_ESTIMATORS = {
    "dmd": {"rank": 4},
    "dmd-default-rank": {},
    "hankel-dmd": {"delays": 2, "rank": 4},
    "pca-hankel": {"components": 4, "delays": 2, "center": False, "rank": 4},
}
BUILTIN_METRICS = {
    "wasserstein": {},
    "wasserstein-amplitude": {"weights": "amplitude"},
    "wasserstein-log": {},
    "matched-mean": {},
}
BUILTIN_TESTS = ("permutation", "bootstrap", "eigen-swap")


@pytest.mark.parametrize("name, check", estimator_checks())
@pytest.mark.parametrize("label", BUILTIN_ESTIMATORS)
def test_builtin_estimators_conform(label, name, check):
    check(label.removesuffix("-default-rank"), **BUILTIN_ESTIMATORS[label])


@pytest.mark.parametrize("name, check", metric_checks())
@pytest.mark.parametrize("label", BUILTIN_METRICS)
def test_builtin_metrics_conform(label, name, check):
    check(label.removesuffix("-amplitude"), **BUILTIN_METRICS[label])


@pytest.mark.parametrize("name, check", significance_checks())
@pytest.mark.parametrize("label", BUILTIN_TESTS)
def test_builtin_tests_conform(label, name, check):
    check(label)


# ------------------------------------------- the suite catches what it says it checks


class _Base:
    """Least squares on all pairs; subclasses break one rule each."""

    def __init__(self, rank=None):
        self.rank = rank

    def pairs(self, trajectories):
        return [(x[:-1], x[1:]) for x in trajectories]

    def fit(self, trajectories):
        if hasattr(trajectories, "shape"):
            trajectories = [trajectories]
        arrays = [np.asarray(t, dtype=float) for t in trajectories]
        if not all(np.isfinite(x).all() for x in arrays):
            raise ValueError("non-finite input")
        x, y = (np.vstack(side) for side in zip(*self.pairs(arrays), strict=True))
        return Spectrum(np.linalg.eigvals(np.linalg.lstsq(x, y, rcond=None)[0]))


class CrossesBoundaries(_Base):
    def pairs(self, trajectories):
        stacked = np.vstack(trajectories)
        return [(stacked[:-1], stacked[1:])]


class MutatesInput(_Base):
    def fit(self, trajectories):
        spectrum = super().fit(trajectories)
        for x in trajectories:
            if isinstance(x, np.ndarray):
                x *= 1.0  # writes, changes nothing
        return spectrum


class CentersInPlace(_Base):
    def fit(self, trajectories):
        spectrum = super().fit(trajectories)
        for x in trajectories:
            if isinstance(x, np.ndarray):
                x -= 0.5
        return spectrum


class PerFeature(_Base):
    """One AR(1) coefficient per feature: depends on the coordinates."""

    def fit(self, trajectories):
        if hasattr(trajectories, "shape"):
            trajectories = [trajectories]
        x = np.vstack([np.asarray(t, dtype=float)[:-1] for t in trajectories])
        y = np.vstack([np.asarray(t, dtype=float)[1:] for t in trajectories])
        return Spectrum((x * y).sum(axis=0) / (x * x).sum(axis=0))


class Noisy(_Base):
    calls = itertools.count(1)  # every fit differs from every other by at least 1e-9

    def fit(self, trajectories):
        spectrum = super().fit(trajectories)
        return Spectrum(spectrum.eigenvalues + 1e-9 * next(self.calls))


class IgnoresNaN(_Base):
    def fit(self, trajectories):
        if hasattr(trajectories, "shape"):
            trajectories = [trajectories]
        return super().fit([np.nan_to_num(np.asarray(t, dtype=float)) for t in trajectories])


class ReturnsArray(_Base):
    def fit(self, trajectories):
        return super().fit(trajectories).eigenvalues


class ListsOnly(_Base):
    def fit(self, trajectories):
        return super().fit([np.asarray(t) for t in list(trajectories)])


def _failing_checks(checks, factory) -> set[str]:
    """Names of the checks that fail on ``factory``; each failure names its check."""
    failed = set()
    for name, check in checks:
        try:
            check(factory)
        except AssertionError as exc:
            assert str(exc).startswith(f"check {name!r} failed for "), exc
            failed.add(name)
    return failed


@pytest.mark.parametrize(
    "factory, failing",
    [
        (_Base, set()),
        (CrossesBoundaries, {"several_trajectories", "float32_input"}),
        (MutatesInput, {"does_not_mutate_input"}),
        (
            CentersInPlace,
            {"does_not_mutate_input", "deterministic", "single_array", "array_like_input"},
        ),
        (
            PerFeature,
            {
                "several_trajectories",
                "float32_input",
                "conjugacy",
                "recovers_eigenvalues",
                "rejects_non_finite",
            },
        ),
        (Noisy, {"single_array", "deterministic", "array_like_input"}),
        (IgnoresNaN, {"rejects_non_finite"}),
        (
            ReturnsArray,
            {name for name, _ in estimator_checks()} - {"rejects_non_finite", "honours_rank"},
        ),
        (ListsOnly, {"single_array"}),
    ],
)
def test_estimator_checks_catch_broken_estimators(factory, failing):
    assert _failing_checks(estimator_checks(), factory) == failing


def test_check_estimator_lists_every_failure():
    with pytest.raises(AssertionError) as info:
        check_estimator(CrossesBoundaries, rank=4)
    message = str(info.value)
    assert message.startswith("3 estimator check(s) failed for")
    assert "honours_rank" in message  # _Base ignores its rank
    assert "several_trajectories" in message and "pairs across trajectory boundaries" in message
    check_estimator(CrossesBoundaries, skip=["several_trajectories", "float32_input"])
    with pytest.raises(ValueError, match="Invalid check names \\['nope'\\]"):
        check_estimator(_Base, skip=["nope"])


def test_factory_errors_name_the_check():
    with pytest.raises(AssertionError, match="check 'returns_spectrum' failed .* TypeError"):
        dict(estimator_checks())["returns_spectrum"](_Base, bogus=1)


def _wasserstein(a, b):
    from koopkit_spectral_metrics.wasserstein import Wasserstein

    return Wasserstein()(a, b)


@pytest.mark.parametrize(
    "metric, failing",
    [
        (_wasserstein, set()),
        (lambda a, b: 1 + _wasserstein(a, b), {"identity"}),
        (lambda a, b: int(10 * _wasserstein(a, b)), {name for name, _ in metric_checks()}),
        (lambda a, b: np.abs(a.eigenvalues - b.eigenvalues).mean(), {"identity"}),
        (
            lambda a, b: _wasserstein(a, b) * (1 + abs(a.eigenvalues[0])),
            {"symmetric", "triangle_inequality"},
        ),
        (lambda a, b: _wasserstein(a, b) ** 2, {"triangle_inequality"}),
        (lambda a, b: -_wasserstein(a, b), {"nonnegative", "separates", "triangle_inequality"}),
        (lambda a, b: 0.0, {"separates"}),
    ],
)
def test_metric_checks_catch_broken_metrics(metric, failing):
    failed = set()
    for name, check in metric_checks():
        try:
            check(lambda: metric)
        except AssertionError as exc:
            assert str(exc).startswith(f"check {name!r} failed for "), exc
            failed.add(name)
    assert failed == failing
    if failing:
        with pytest.raises(AssertionError, match=sorted(failing)[0]):
            check_metric(lambda: metric)


def test_estimator_checks_catch_an_estimator_that_ignores_rank():
    failed = []
    for name, check in estimator_checks():
        try:
            check(_Base, rank=4)  # _Base keeps every eigenvalue whatever its rank
        except AssertionError as exc:
            assert "rank=2 kept 4 eigenvalues; expected 2" in str(exc)
            failed.append(name)
    assert failed == ["honours_rank"]


def _permutation(**params):
    from koopkit_significance.permutation import PermutationTest

    return PermutationTest(**params)


def _broken_test(change_result=None, change_run=None, n_perm=10_000):
    """The permutation test with its result (from either entry) or only ``run`` altered."""
    from koopkit_significance.permutation import PermutationTest

    class Broken(PermutationTest):
        def run_on_distances(self, distances, labels):
            result = super().run_on_distances(distances, labels)
            return change_result(self, result) if change_result else result

        def run(self, groups, metric):
            result = super().run(groups, metric)
            return change_run(self, result) if change_run else result

    return lambda: Broken(n_perm=n_perm)


_draws = itertools.count(1)


@pytest.mark.parametrize(
    "factory, failing",
    [
        (_permutation, set()),
        (
            _broken_test(lambda t, r: (r.statistic, r.p_value)),
            {name for name, _ in significance_checks()},
        ),
        (
            _broken_test(lambda t, r: replace(r, p_value=1.5 * r.p_value)),
            {"p_value_in_unit_interval"},
        ),
        (_broken_test(lambda t, r: replace(r, p_value=1.0)), {"separates"}),
        (
            _broken_test(lambda t, r: replace(r, p_value=int(r.p_value))),
            {"returns_test_result"},
        ),
        (
            _broken_test(lambda t, r: replace(r, null=r.null[None])),
            {"returns_test_result"},
        ),
        (  # every call differs, like relabellings drawn from an unseeded generator
            _broken_test(
                lambda t, r: replace(r, p_value=r.p_value * (1 - 1e-3 * (next(_draws) % 7)))
            ),
            {"deterministic", "distances_agree"},
        ),
        (
            _broken_test(change_run=lambda t, r: replace(r, p_value=r.p_value / 2)),
            {"distances_agree"},
        ),
    ],
)
def test_significance_checks_catch_broken_tests(factory, failing):
    assert _failing_checks(significance_checks(), factory) == failing
    if failing:
        with pytest.raises(AssertionError, match=sorted(failing)[0]):
            check_significance(factory)
