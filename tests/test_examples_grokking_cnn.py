"""The grokking-transformer and CNN early-phase examples run end to end and give sane science.

Each script is imported by path and its ``main`` called in-process with ``--quick``; the
full-size runs are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import koopkit
from koopkit.store.validate import validate_store

pytestmark = pytest.mark.filterwarnings("error")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"koopkit_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grokking():
    return load_example("grokking_transformer")


@pytest.fixture(scope="module")
def cnn():
    return load_example("cnn_early_phase")


def eigenvalues(pairs) -> np.ndarray:
    array = np.asarray(pairs, dtype=float)
    return array[:, 0] + 1j * array[:, 1]


def assert_written(out: Path, summary: dict, figures: list[str], runs: int) -> None:
    """The store validates and holds ``runs`` runs; summary.json and the figures exist."""
    reasons, checked = validate_store(str(out / "runs.zarr"))
    assert reasons == []
    assert checked == runs
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in figures:
        assert (out / name).stat().st_size > 0


# -- grokking transformer ----------------------------------------------------------------------


def test_grokking_quick_separates_conditions(grokking, tmp_path):
    """Grokking and constrained spectra lie farther apart than replicates of either.

    Quick mode (the paper's model on p = 31, 3 seeds x 2 inits, 8 delays): between ~0.016,
    within ~0.002-0.003. Over the seed triples 0-2, 3-5, 6-8 and 9-11 the ratio of between
    to the larger within distance is 5.6, 3.9, 2.8 and 2.8. Smaller widths (d_model 32) or
    60 steps instead of 100 do not separate reliably, so quick mode does not use them.
    """
    summary = grokking.main(["--quick", "--out", str(tmp_path)])
    assert_written(tmp_path, summary, ["comparison.png", "curves.png", "eigenvalues.png"], 12)

    assert summary["conditions"] == ["constrained", "grokking"]
    spectra = summary["comparison"]["spectra"]
    assert len(spectra) == 2 * 3  # one per (condition, seed)
    for spectrum in spectra:
        z = eigenvalues(spectrum["eigenvalues"])
        assert z.shape == (10,) and np.all(np.isfinite(z))
        assert len(spectrum["runs"]) == 2  # the nearby inits, fit jointly
    between = summary["W_between"]["mean"]
    within = [w["mean"] for w in summary["W_within"].values()]
    assert np.all(np.isfinite([between, *within]))
    assert between > 2 * max(within)
    assert summary["p_value"] == pytest.approx(0.1)  # the smallest exact p for 3 + 3

    store = koopkit.open_store(tmp_path / "runs.zarr")
    info = store.run("grokking/seed0/init0")
    assert info.tags == {"condition": "grokking", "seed": 0, "init": 0}
    assert store.trajectory(info.run_id, "params").shape == (101, 512 * 128)


def test_grokking_nearby_inits_and_norm(grokking, tmp_path):
    """Inits are 0.1 % perturbations; the constrained runs keep their initial total norm."""
    args = grokking.parse_args(["--quick", "--steps", "5"])
    data = grokking.make_data(args.p, args.train_fraction, seed=0)
    for condition in grokking.CONDITIONS:
        for init in range(2):
            grokking.train_run(tmp_path / "s.zarr", condition, 0, init, args, data)
    store = koopkit.open_store(tmp_path / "s.zarr")
    first = {run: np.asarray(store.trajectory(run)[0]) for run in store.runs}
    base = first["grokking/seed0/init0"]
    change = first["grokking/seed0/init1"] / base - 1
    assert 1e-4 < np.max(np.abs(change)) <= 1e-3 + 1e-6
    np.testing.assert_allclose(first["constrained/seed0/init0"], 0.8 * base, rtol=1e-6)
    for run in store.runs:
        norms = np.asarray(store.trajectory(run, "scalars/norm"))
        assert norms.shape == (6,)
        if run.startswith("constrained"):
            np.testing.assert_allclose(norms, norms[0], rtol=1e-5)
        else:
            assert np.all(np.diff(norms) < 0)  # early on, weight decay 1.0 shrinks them


def test_grokking_is_deterministic(grokking, tmp_path):
    """A tiny grokking experiment twice gives bit-identical spectra."""
    argv = ["--quick", "--seeds", "2", "--inits", "1", "--steps", "30"]
    argv += ["--components", "4", "--delays", "4", "--rank", "4", "--n-perm", "10"]
    first = grokking.main([*argv, "--out", str(tmp_path / "a")])
    second = grokking.main([*argv, "--out", str(tmp_path / "b")])
    spectra = [[s["eigenvalues"] for s in run["comparison"]["spectra"]] for run in (first, second)]
    assert spectra[0] == spectra[1]
    assert all(len(s) == 4 for s in spectra[0])


def test_grokking_rejects_a_single_seed_before_training(grokking, tmp_path, capsys):
    with pytest.raises(SystemExit):
        grokking.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    assert "--seeds of at least 2" in capsys.readouterr().err
    assert not (tmp_path / "runs.zarr").exists()


# -- CNN early phase ---------------------------------------------------------------------------


def test_cnn_quick_sees_the_end_of_the_plateau(cnn, tmp_path):
    """The loss plateau's windows resemble each other; the escape from it is far from them.

    Quick mode (300 SGD steps, 60-step windows every 30): the first two windows differ by
    W ~ 0.03-0.08 over seeds 0-5, the first and the last by 0.5-0.7.
    """
    summary = cnn.main(["--quick", "--out", str(tmp_path)])
    assert_written(tmp_path, summary, ["window_distances.png", "window_eigenvalues.png"], runs=1)

    windows = summary["windows"]
    assert len(windows) == (301 - 60) // 30 + 1
    assert windows[0] == [0, 59] and windows[1] == [30, 89]
    for pairs in summary["eigenvalues"]:
        z = eigenvalues(pairs)
        assert z.shape == (8,) and np.all(np.isfinite(z))
    distances = np.asarray(summary["distance"])
    assert distances.shape == (len(windows), len(windows))
    assert np.all(np.isfinite(distances)) and np.all(np.diag(distances) == 0)
    np.testing.assert_array_equal(distances, distances.T)
    log_w = summary["log10_distance"]
    assert log_w[0][0] is None
    assert log_w[0][1] == pytest.approx(np.log10(distances[0, 1]))
    assert distances[0, -1] > 3 * distances[0, 1]
    assert summary["window_loss"][-1] < summary["window_loss"][0]

    store = koopkit.open_store(tmp_path / "runs.zarr")
    weights = sum(p.numel() for n, p in cnn.LeNet().named_parameters() if n.endswith("weight"))
    assert store.trajectory(summary["run"], "params").shape == (301, weights)


def test_cnn_windows_are_deterministic(cnn, tmp_path):
    """Training and windowed estimation twice with one seed give bit-identical eigenvalues."""
    argv = ["--steps", "90", "--window", "40", "--stride", "25", "--seed", "3"]
    first = cnn.main([*argv, "--out", str(tmp_path / "a")])
    second = cnn.main([*argv, "--out", str(tmp_path / "b")])
    assert first["eigenvalues"] == second["eigenvalues"]
    assert first["distance"] == second["distance"]
    assert len(first["eigenvalues"]) == 3


def test_cnn_rejects_windows_that_do_not_fit_before_training(cnn, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cnn.main(["--steps", "20", "--window", "40", "--out", str(tmp_path)])
    assert "at least 2 windows" in capsys.readouterr().err
    assert not (tmp_path / "runs.zarr").exists()


# -- full size ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_grokking_full(grokking, tmp_path):
    """The paper's model (p = 113, d_model 128, d_mlp 512, 32 delays), 5 seeds x 5 inits."""
    summary = grokking.main(["--out", str(tmp_path)])
    within = [w["mean"] for w in summary["W_within"].values()]
    assert summary["W_between"]["mean"] > 2 * max(within)
    assert summary["p_value"] < 0.05


@pytest.mark.slow
def test_cnn_full(cnn, tmp_path):
    """600 steps, 100-step windows every 25: the plateau's escape stands out."""
    summary = cnn.main(["--out", str(tmp_path)])
    distances = np.asarray(summary["distance"])
    assert distances.shape == (21, 21)
    assert distances[0].max() > 3 * distances[0, 1]
