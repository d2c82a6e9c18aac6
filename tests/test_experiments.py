"""Experiments 1 and 2 of Redman et al. (2024) through koopkit: the qualitative results hold."""

from __future__ import annotations

import numpy as np
import pytest

import koopkit
from koopkit.experiments import fcn, optimizers
from koopkit.store.validate import validate_store


@pytest.fixture(scope="module")
def optimizer_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("optimizers") / "runs.zarr"
    optimizers.record(store)
    return store


def _pair(comparison, a, b):
    i, j = comparison.conditions.index(a), comparison.conditions.index(b)
    return comparison.distance_mean[i, j], comparison.p_value[i, j]


def test_omd_and_ogd_are_far_closer_than_ogd_and_bisection(optimizer_store):
    assert validate_store(optimizer_store)[0] == []
    comparison, pooled = optimizers.analyse(optimizer_store, n_perm=999, save=False)
    w_conjugate, p_conjugate = _pair(comparison, "ogd", "omd")
    w_bisection, p_bisection = _pair(comparison, "bisection", "ogd")
    assert 10 * w_conjugate < w_bisection
    assert p_bisection < 0.01  # 5 + 5 replicates: exact p = 2/252
    assert p_conjugate > 0.05
    assert _pair(pooled, "ogd", "omd")[0] < 0.05 < 0.3 < _pair(pooled, "bisection", "ogd")[0]
    pairs = {tuple(p["pair"]): p for p in comparison.pairs()}
    assert pairs[("ogd", "omd")]["distance"] == w_conjugate
    assert pairs[("bisection", "ogd")]["p_value"] == p_bisection


def test_each_loss_is_stored_at_the_step_of_its_iterate(optimizer_store):
    """Recorder.step's convention: the loss at step s is the loss of params[s]."""
    store = koopkit.open_store(optimizer_store)
    for method in optimizers.METHODS:
        for info in store.select({"method": method}):
            run = koopkit.open_run(optimizer_store, info.run_id)
            observed = run["params"]["value"].values
            x = np.exp(observed) if method == "ogd" else observed  # OGD observes u = log x
            loss = run["scalars"]["loss"]
            assert list(loss["step"].values) == list(range(optimizers.STEPS))
            expected = np.tan(x[: optimizers.STEPS]).sum(axis=1)
            np.testing.assert_allclose(loss["value"].values, expected, rtol=1e-6)


def test_spectra_are_deterministic(optimizer_store):
    store = koopkit.open_store(optimizer_store)
    runs = [info.run_id for info in store.select({"method": "omd"})]
    trajectories = [store.trajectory(run) for run in runs]
    first = koopkit.estimate(trajectories, "hankel-dmd", delays=4)
    second = koopkit.estimate(trajectories, "hankel-dmd", delays=4)
    assert np.array_equal(first.eigenvalues, second.eigenvalues)
    assert first.rank == 10  # 2 coordinates x (4 delays + 1), full rank


def test_original_grid_is_not_the_conjugate_image(tmp_path):
    conjugate, original = optimizers.starting_grids(True), optimizers.starting_grids(False)
    np.testing.assert_allclose(np.exp(conjugate["ogd"]), conjugate["omd"])
    assert not np.allclose(np.exp(original["ogd"]), original["omd"])


def test_reduced_width_experiment_runs_end_to_end(tmp_path):
    store = tmp_path / "runs.zarr"
    fcn.record(store, widths=(5, 40), seeds=(0, 1), inits=2, steps=60)
    assert validate_store(store)[0] == []
    comparison = fcn.analyse(store, delays=2, rank=6, n_perm=99, save=True)
    assert comparison.conditions == ["5", "40"]
    assert comparison.distance_mean.shape == (2, 2) and np.isfinite(comparison.distance_mean).all()
    assert [len(r.group.runs) for r in comparison.spectra] == [2, 2, 2, 2]  # inits fit jointly
    assert koopkit.open_store(store).root["analyses"]  # saved with provenance


def test_nearby_initialisations_are_close_but_distinct():
    import torch

    torch.manual_seed(0)
    base = fcn.FCN(64, 5)
    nets = fcn.nearby_initialisations(base, 3, seed=0)
    w0, w1 = nets[0].fc2.weight.detach(), nets[1].fc2.weight.detach()
    assert not torch.equal(w0, w1)
    assert torch.all((w1 / w0 - 1).abs() <= 0.001 + 1e-7)


@pytest.mark.slow
def test_full_experiment_one_matches_the_paper(optimizer_store):
    _, pooled = optimizers.analyse(optimizer_store, n_perm=10_000, save=False)
    assert _pair(pooled, "ogd", "omd")[0] < 0.05
    assert _pair(pooled, "bisection", "ogd")[0] > 0.3


def test_demo_summary_gives_a_verdict_per_pair(optimizer_store):
    from koopkit.experiments import demo

    comparison, pooled = optimizers.analyse(optimizer_store, n_perm=999, save=False)
    pairs = demo._pairs(comparison)
    verdicts = {tuple(p["pair"]): p["verdict"] for p in pairs}
    assert verdicts[("bisection", "ogd")] == "not conjugate"
    assert verdicts[("ogd", "omd")] == "not separated"  # no evidence either way
    summary = {
        "store": "s",
        "optimizers": {
            "pairs": pairs,
            "pooled_distance": demo._pooled(pooled),
            "paper_pooled_distance": {},
        },
        "fcn": {"seeds": [0], "inits": 1, "steps": 1, "pairs": pairs},
        "seconds": 1.0,
    }
    text = demo.format_summary(summary)
    assert "ogd vs omd" in text and "-> not conjugate" in text and "W(ogd-omd)" in text


def _separated(replicates: int, conditions: str = "abc"):
    """A comparison of conditions whose spectra are far apart, ``replicates`` each."""
    from koopkit.pipeline import Group, SpectrumResult, compare_spectra
    from koopkit.results import Spectrum

    rng = np.random.default_rng(replicates)
    spectra = [
        SpectrumResult(
            Group((f"{c}{i}",), {}, condition=c, replicate=i),
            Spectrum(0.2 + 0.3 * k + 0.01 * rng.normal(size=4)),
        )
        for k, c in enumerate(conditions)
        for i in range(replicates)
    ]
    return compare_spectra(spectra, test="permutation", test_params={"n_perm": 10_000})


def test_demo_says_when_its_replicates_cannot_separate_conditions():
    from koopkit.experiments import demo

    four = _separated(4)  # C(8, 4) = 70 arrangements: p >= 2/70, Holm over 3 pairs >= 0.0857
    assert demo.smallest_p_holm(four) == pytest.approx(3 * 2 / 70)
    assert all(p["p_value"] == pytest.approx(2 / 70) for p in four.pairs())  # fully separated
    for pair in demo._pairs(four):
        assert pair["verdict"] == (
            "cannot be separated with 4 replicates (smallest possible Holm p 0.0857)"
        )
    five = _separated(5)  # 3 * 2/252 = 0.024 < 0.05: the test can separate them
    assert demo.smallest_p_holm(five) == pytest.approx(3 * 2 / 252)
    assert [p["verdict"] for p in demo._pairs(five)] == ["not conjugate"] * 3
    assert demo.verdict(0.5, floor=3 * 2 / 252) == "not separated"
    assert demo.verdict(float("nan")) == "untested"
    two = _separated(5, "ab")
    assert demo.smallest_p_holm(two) == pytest.approx(2 / 252)  # one pair: Holm is p
    assert two.pairs()[0]["p_value_holm"] == pytest.approx(2 / 252)


def test_demo_runs_enough_seeds_to_separate_widths(tmp_path, monkeypatch):
    """With n seeds per width, the smallest Holm p over the 3 pairs is 3 * 2 / C(2n, n)."""
    import math

    from koopkit import plots
    from koopkit.experiments import demo

    seen = {}

    class Stop(Exception):
        pass

    def record(store, seeds, **kwargs):
        seen["seeds"] = seeds
        raise Stop

    monkeypatch.setattr(optimizers, "record", lambda *a, **k: 0)
    monkeypatch.setattr(optimizers, "analyse", lambda *a, **k: (None, None))
    monkeypatch.setattr(plots, "plot_comparison", lambda *a, **k: None)
    monkeypatch.setattr(fcn, "record", record)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "demo", progress=lambda message: None)
    n = len(seen["seeds"])
    assert 3 * 2 / math.comb(2 * n, n) < demo.ALPHA


def test_recording_restores_torchs_thread_count(tmp_path):
    import torch

    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    torch.set_num_threads(wanted)
    try:
        fcn.record(tmp_path / "runs.zarr", widths=(5,), seeds=(0,), inits=1, steps=2)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("sizes", [{"inits": 0}, {"steps": 0}, {"inits": -1}])
def test_recording_refuses_empty_sizes_before_writing(tmp_path, sizes):
    store = tmp_path / "runs.zarr"
    name = next(iter(sizes))
    with pytest.raises(ValueError, match=f"Expected {name} >= 1. Got {sizes[name]} instead."):
        fcn.record(store, **{"widths": (5,), "seeds": (0,), "inits": 1, "steps": 2, **sizes})
    assert not store.exists()


def test_demo_refuses_an_existing_output_before_any_work(tmp_path, monkeypatch):
    from koopkit.experiments import demo

    called = []
    monkeypatch.setattr(optimizers, "record", lambda *a, **k: called.append(a))
    out = tmp_path / "demo"
    (out / "optimizers.png").mkdir(parents=True)  # the figure could not be written
    with pytest.raises(FileExistsError, match="optimizers.png' already exists"):
        demo.run_demo(out, progress=lambda message: None)
    with pytest.raises(FileExistsError, match="optimizers.png' already exists"):
        demo.run_demo(tmp_path / "missing" / ".." / "demo", progress=lambda message: None)
    (out / "summary.txt").symlink_to(tmp_path / "elsewhere.txt")  # dangling: still an output
    (out / "optimizers.png").rmdir()
    with pytest.raises(FileExistsError, match="summary.txt' already exists"):
        demo.run_demo(out, progress=lambda message: None)
    assert called == []
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_demo_removes_only_what_it_created(tmp_path, monkeypatch, existing):
    """A rerun of the same command must not find a half-written store in its way."""
    from koopkit import plots
    from koopkit.experiments import demo

    def record(store, **kwargs):
        store.mkdir()
        (store / "zarr.json").write_text("{}")

    def fail(*args, **kwargs):
        raise RuntimeError("partway")

    monkeypatch.setattr(optimizers, "record", record)
    monkeypatch.setattr(optimizers, "analyse", lambda *a, **k: (None, None))
    monkeypatch.setattr(plots, "plot_comparison", lambda comparison, path: path.write_bytes(b""))
    monkeypatch.setattr(fcn, "record", fail)
    out = tmp_path / "new" / "demo"
    if existing:
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="partway"):
        demo.run_demo(out, progress=lambda message: None)
    if existing:
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert list(tmp_path.iterdir()) == []  # the folders it made are gone too
