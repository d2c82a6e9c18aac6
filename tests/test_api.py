"""The Python entry points: koopkit.estimate, koopkit.distance and koopkit.compare."""

import re

import numpy as np
import pytest

import koopkit
import koopkit.plugins
from koopkit.errors import (
    EstimationError,
    InsufficientDataError,
    KoopkitError,
    NonFiniteDataError,
    PluginError,
    UnknownNameError,
)
from koopkit.results import Spectrum
from koopkit.testing import EIGENVALUES, assert_eigenvalues_close, linear_trajectories

OTHER_EIGENVALUES = np.array([0.9 * np.exp(0.3j), 0.9 * np.exp(-0.3j), 0.6, -0.5])


def known(kind):
    return ", ".join(sorted(koopkit.plugins.registry(kind)))


# ----------------------------------------------------------------- estimate


@pytest.mark.parametrize(
    "estimator, params",
    [
        ("dmd", {"rank": 4}),
        ("dmd", {}),
        ("hankel-dmd", {"delays": 3, "rank": 4}),
        ("pca-hankel", {"components": 4, "delays": 2, "center": False, "rank": 4}),
    ],
)
def test_estimate_recovers_a_linear_systems_eigenvalues(estimator, params):
    spectrum = koopkit.estimate(linear_trajectories(), estimator=estimator, **params)
    assert isinstance(spectrum, Spectrum)
    assert_eigenvalues_close(spectrum, EIGENVALUES, 1e-8)
    assert spectrum.meta["estimator"] == estimator


def test_estimate_takes_one_array_a_list_or_a_tuple():
    trajectories = linear_trajectories((20, 25))
    one = koopkit.estimate(trajectories[0], rank=4)
    assert_eigenvalues_close(one, koopkit.estimate([trajectories[0]], rank=4), 1e-12)
    joint = koopkit.estimate(tuple(trajectories), rank=4)
    assert_eigenvalues_close(joint, EIGENVALUES, 1e-8)
    assert joint.meta["trajectories"] == 2


def test_default_rank_ignores_float32_rounding_noise():
    (x,) = linear_trajectories()
    lift = np.random.default_rng(0).standard_normal((50, 4))  # 4-dim dynamics, 50 features
    assert koopkit.estimate(x @ lift.T).rank == 4
    assert koopkit.estimate((x @ lift.T).astype(np.float32)).rank == 4


def test_estimate_default_is_dmd():
    spectrum = koopkit.estimate(linear_trajectories())
    assert spectrum.meta["estimator"] == "dmd"


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as info:
        koopkit.estimate(linear_trajectories(), estimator="dmdd")
    assert str(info.value) == f"Invalid estimator 'dmdd'; known: {known('estimator')}."
    listed = str(info.value).removesuffix(".").split("; known: ")[1].split(", ")
    assert {"dmd", "hankel-dmd", "pca-hankel"} <= set(listed) and listed == sorted(listed)
    assert isinstance(info.value, KeyError) and isinstance(info.value, PluginError)


def test_unknown_parameter_is_a_plugin_error():
    with pytest.raises(PluginError, match="^Invalid parameters for estimator 'dmd': .*'rnak'"):
        koopkit.estimate(linear_trajectories(), estimator="dmd", rnak=4)


@pytest.mark.parametrize(
    "params, message",
    [
        (
            {"rank": -1},
            "Expected rank to be a positive int, a float in (0, 1), 'gd' or None. Got -1 instead.",
        ),
        ({"rank": "all"}, "Got 'all' instead."),
        ({"delays": -2}, "delays"),
    ],
)
def test_invalid_parameter_values_are_refused_clearly(params, message):
    estimator = "hankel-dmd" if "delays" in params else "dmd"
    with pytest.raises(KoopkitError) as info:
        koopkit.estimate(linear_trajectories(), estimator=estimator, **params)
    assert isinstance(info.value, ValueError)
    assert message in str(info.value)


def test_bad_data_is_refused_clearly():
    (x,) = linear_trajectories()
    with pytest.raises(
        EstimationError,
        match=r"Expected trajectory 0 to be 2-D \(steps, features\). Got shape \(30,\) instead.",
    ):
        koopkit.estimate(x[:, 0])
    with pytest.raises(InsufficientDataError, match="Expected at least 6 snapshots for rank 5"):
        koopkit.estimate(x[:5], rank=5)
    x[3, 1] = np.nan
    with pytest.raises(NonFiniteDataError):
        koopkit.estimate(x)


class ReturnsArray:
    def fit(self, trajectories):
        return np.array([0.5 + 0j])


class ArrayPlugin:
    @koopkit.hookimpl
    def koopkit_register_estimators(self, register):
        register("returns-array", ReturnsArray)


def test_estimator_returning_something_else_is_a_plugin_error():
    pm = koopkit.plugins.get_plugin_manager()
    pm.register(ArrayPlugin(), name="returns-array-plugin")
    koopkit.plugins.registry.cache_clear()
    try:
        with pytest.raises(
            PluginError, match="'returns-array' returned ndarray; expected a koopkit.Spectrum"
        ):
            koopkit.estimate(linear_trajectories(), estimator="returns-array")
    finally:
        pm.unregister(name="returns-array-plugin")
        koopkit.plugins.registry.cache_clear()


# ----------------------------------------------------------------- distance


def test_distance_between_known_spectra():
    a, b = Spectrum([0.5 + 0.5j]), Spectrum([0.5 - 0.25j])
    assert koopkit.distance(a, b) == pytest.approx(0.75)
    assert koopkit.distance(a, b, metric="matched-mean") == pytest.approx(0.75)
    assert isinstance(koopkit.distance(a, b), float)


def test_distance_between_estimated_spectra():
    same = [koopkit.estimate(linear_trajectories(seed=s), rank=4) for s in (0, 1)]
    other = koopkit.estimate(linear_trajectories(eigenvalues=OTHER_EIGENVALUES), rank=4)
    assert koopkit.distance(*same) == pytest.approx(0.0, abs=1e-8)
    assert koopkit.distance(same[0], other) > 0.05
    with_amplitudes = [
        koopkit.estimate(linear_trajectories(eigenvalues=e), rank=4, amplitudes=True)
        for e in (EIGENVALUES, OTHER_EIGENVALUES)
    ]
    assert koopkit.distance(*with_amplitudes, metric="wasserstein", weights="amplitude") > 0.05


def test_distance_names_and_parameters_are_checked():
    a = Spectrum([0.5])
    with pytest.raises(UnknownNameError) as info:
        koopkit.distance(a, a, metric="wasserstien")
    assert str(info.value) == f"Invalid metric 'wasserstien'; known: {known('metric')}."
    with pytest.raises(PluginError, match="^Invalid parameters for metric 'wasserstein'"):
        koopkit.distance(a, a, weighting="amplitude")
    with pytest.raises(
        KoopkitError, match="Invalid weights 'mass'; expected one of uniform, amplitude"
    ):
        koopkit.distance(a, a, weights="mass")


def test_distance_of_something_other_than_a_spectrum_is_refused_clearly():
    with pytest.raises(EstimationError, match=r"^Invalid spectrum 'a': got ndarray; expected a k"):
        koopkit.distance(np.array([0.5 + 0j]), Spectrum([0.5]))
    with pytest.raises(EstimationError, match=r"^Invalid spectrum 'b': got list; expected a k"):
        koopkit.distance(Spectrum([0.5]), [0.5])


class OddMetricPlugin:
    """A metric returning ``value`` (or raising it, if it is an exception)."""

    def __init__(self, value):
        self.value = value

    @koopkit.hookimpl
    def koopkit_register_metrics(self, register):
        def metric(a, b):
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

        register("odd", lambda: metric)


@pytest.mark.parametrize("value", [np.float32(0.25), np.array(0.25), np.int64(0)])
def test_a_metric_may_return_a_numpy_scalar_or_0d_array(value):
    pm = koopkit.plugins.get_plugin_manager()
    pm.register(OddMetricPlugin(value), name="odd-plugin")
    koopkit.plugins.registry.cache_clear()
    try:
        distance = koopkit.distance(Spectrum([0.5]), Spectrum([0.4]), metric="odd")
        assert type(distance) is float and distance == float(value)
    finally:
        pm.unregister(name="odd-plugin")
        koopkit.plugins.registry.cache_clear()


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.5", "returned '0.5'; expected a distance, a finite number >= 0"),
        (float("nan"), "returned nan; expected a distance"),
        (-1.0, "returned -1.0; expected a distance"),
        (True, "returned True; expected a distance"),
        (ZeroDivisionError("oops"), "failed: ZeroDivisionError: oops"),
    ],
)
def test_a_metric_that_fails_or_returns_no_distance_is_named_with_its_plugin(value, message):
    pm = koopkit.plugins.get_plugin_manager()
    pm.register(OddMetricPlugin(value), name="odd-plugin")
    koopkit.plugins.registry.cache_clear()
    try:
        with pytest.raises(
            PluginError, match=re.escape(f"Metric 'odd' (plugin 'odd-plugin') {message}")
        ):
            koopkit.distance(Spectrum([0.5]), Spectrum([0.4]), metric="odd")
    finally:
        pm.unregister(name="odd-plugin")
        koopkit.plugins.registry.cache_clear()


# ------------------------------------------------------------------ compare


@pytest.fixture
def store(tmp_path):
    """Two conditions (width 10, 20) with different dynamics, three seeds each."""
    from koopkit.store.importers import import_npy

    url = tmp_path / "runs.zarr"
    for width, eigenvalues in ((10, EIGENVALUES), (20, OTHER_EIGENVALUES)):
        for seed in range(3):
            npy = tmp_path / f"w{width}-s{seed}.npy"
            (x,) = linear_trajectories(eigenvalues=eigenvalues, seed=10 * width + seed)
            np.save(npy, x)
            import_npy(npy, url, f"w{width}/s{seed}", tags={"width": width, "seed": seed})
    return url


def test_compare_tells_two_conditions_apart(store):
    result = koopkit.compare(
        store,
        "width",
        replicate="seed",
        estimator="dmd",
        estimator_params={"rank": 4},
        test="permutation",
        save=False,
    )
    assert [str(c) for c in result.conditions] == ["10", "20"]
    assert result.distance_mean.shape == (2, 2)
    assert np.allclose(np.diag(result.distance_mean), 0.0, atol=1e-8)
    assert result.distance_mean[0, 1] == result.distance_mean[1, 0] > 0.05
    assert result.p_value[0, 1] <= 0.1  # the smallest p an exact 3-vs-3 test can give
    for spectrum in result.spectra:
        expected = EIGENVALUES if spectrum.group.condition == 10 else OTHER_EIGENVALUES
        assert_eigenvalues_close(spectrum.spectrum, expected, 1e-8)
    out = result.to_json()
    assert set(out) >= {"conditions", "distance", "test", "spectra"}
    assert out["test"]["name"] == "permutation"
    assert not (store / "analyses").exists()


def test_compare_checks_names_before_any_work(tmp_path):
    missing = tmp_path / "no-such-store.zarr"
    for kind, option in (("estimator", "dmdd"), ("metric", "wasserstien"), ("test", "permutaton")):
        with pytest.raises(UnknownNameError, match=f"^Invalid {kind} '{option}'; known: "):
            koopkit.compare(missing, "width", **{kind: option})
    assert not missing.exists()


def test_compare_needs_two_conditions(store):
    with pytest.raises(InsufficientDataError, match="Expected at least 2 conditions"):
        koopkit.compare(
            store, "width", where={"width": "10"}, estimator_params={"rank": 4}, save=False
        )
