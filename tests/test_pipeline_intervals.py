"""Spectra are estimated from equally spaced rows, and compared only at one step interval."""

import numpy as np
import pytest
from koopkit_dmd.estimators import DMD

from koopkit.errors import EstimationError, SelectionError
from koopkit.pipeline import compare_store, estimate_groups, group_runs
from koopkit.store.reader import open_store
from koopkit.store.writer import RunWriter, SeriesSpec


def decay(steps, features=40, seed=0):
    """x_{t+1} = diag(0.9, 0.5, -0.3) x_t, embedded: one row per step."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((features, 3)))[0]
    powers = np.array([0.9, 0.5, -0.3]) ** np.arange(steps)[:, None]
    return (powers * rng.uniform(0.5, 1.5, 3)) @ basis.T


def write(url, run_id, steps, rows, tags):
    run = RunWriter(url, run_id, {"tags": tags})
    run.add_series(SeriesSpec("params", (rows.shape[1],), dtype="float64", row_dims=("param",)))
    run.append("params", np.asarray(steps), rows)
    run.close()


def test_rows_at_uneven_steps_are_refused_naming_the_run(tmp_path):
    url = str(tmp_path / "s.zarr")
    data = decay(65)
    steps = [0, 1, 2, 4, 8, 16, 32, 64]  # a log-spaced schedule
    write(url, "log", steps, data[steps], {"c": 1})
    store = open_store(url)
    with pytest.raises(SelectionError, match=r"'log' at one step interval\. Got intervals 1, 2"):
        estimate_groups(store, group_runs(store), "dmd", {"rank": 3})


def test_the_step_interval_is_recorded_and_compared(tmp_path, monkeypatch):
    url = str(tmp_path / "s.zarr")
    data = decay(61)
    for seed in range(2):
        write(url, f"a{seed}", range(0, 60, 3), data[0:60:3], {"c": "a", "seed": seed})
    store = open_store(url)
    (result, _) = estimate_groups(
        store, group_runs(store, by="c", replicate="seed"), "dmd", {"rank": 3}
    )
    assert result.spectrum.meta["step_interval"] == 3
    np.testing.assert_allclose(  # eigenvalues per 3 steps
        sorted(result.spectrum.eigenvalues.real),
        sorted(np.array([0.9, 0.5, -0.3]) ** 3),
        atol=1e-10,
    )
    for seed in range(2):  # the same dynamics, recorded every step
        write(url, f"b{seed}", range(60), data[:60], {"c": "b", "seed": seed})
    with pytest.raises(
        SelectionError, match=r"one step interval to compare\. Got every 1 .*every 3"
    ):
        compare_store(url, by="c", replicate="seed", estimator_params={"rank": 3}, save=False)
    fitted = []
    monkeypatch.setattr(DMD, "fit", lambda self, data: fitted.append(data))
    with pytest.raises(SelectionError, match="one step interval to compare"):
        compare_store(url, by="c", replicate="seed", save=False)
    assert fitted == []  # refused before any group was estimated


def test_estimation_errors_name_the_runs(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "flat", range(10), np.zeros((10, 5)), {"c": 1})
    store = open_store(url)
    with pytest.raises(
        EstimationError, match=r"^Runs \['flat'\]: Expected snapshots with at least"
    ):
        estimate_groups(store, group_runs(store), "dmd")
