"""The built-in exact DMD estimators: dmd, hankel-dmd, pca-hankel."""

import pickle

import dask.array as da
import koopkit_dmd
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from koopkit_dmd.estimators import DMD, HankelDMD, PCAHankelDMD
from scipy.optimize import linear_sum_assignment

import koopkit
import koopkit.plugins
from koopkit.errors import EstimationError, InsufficientDataError, NonFiniteDataError
from koopkit.results import Spectrum

# Eigenvalues of Redman et al.'s OMD iterates, 4 delays, full rank (research/redman.md, 4a).
PAPER_OMD_EIGENVALUES = [
    0.55814, 0.56513, 0.79254, 0.80117, 0.92458, 0.93197, 0.97988, 0.98379, 0.99644, 0.99790,
]  # fmt: skip


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# -- references and data -------------------------------------------------------------------


def direct_exact_dmd(trajectories, rank=None):
    """Exact DMD by a thin SVD of the explicit data, as in Redman et al.'s ``dmd``."""
    x = np.vstack([t[:-1] for t in trajectories]).T
    y = np.vstack([t[1:] for t in trajectories]).T
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    if rank is None:
        rank = int(np.count_nonzero(s > max(x.shape) * np.finfo(float).eps * s[0]))
    u, s, v = u[:, :rank], s[:rank], vt[:rank].T
    return np.linalg.eigvals((u.T @ y @ v) / s)


def assert_same_eigenvalues(actual, expected, atol):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    distance = np.abs(actual[:, None] - expected[None, :])
    rows, columns = linear_sum_assignment(distance)
    assert distance[rows, columns].max() <= atol, distance[rows, columns].max()


def rotation(modulus, angle):
    c, s = np.cos(angle), np.sin(angle)
    return modulus * np.array([[c, -s], [s, c]])


def latent_system(rng):
    """A real 6 x 6 system with eigenvalues 0.95, 0.9 e^{+-0.3i}, 0.85, 0.8 e^{+-1.1i}."""
    blocks = np.zeros((6, 6))
    blocks[0, 0], blocks[3, 3] = 0.95, 0.85
    blocks[1:3, 1:3], blocks[4:6, 4:6] = rotation(0.9, 0.3), rotation(0.8, 1.1)
    basis = rng.standard_normal((6, 6))
    eigenvalues = [0.95, 0.85, *(0.9 * np.exp([0.3j, -0.3j])), *(0.8 * np.exp([1.1j, -1.1j]))]
    return basis @ blocks @ np.linalg.inv(basis), np.array(eigenvalues)


def simulate(matrix, x0, steps, noise=0.0, rng=None):
    states = [x0]
    for _ in range(steps - 1):
        states.append(matrix @ states[-1])
    states = np.array(states)
    return states if not noise else states + noise * rng.standard_normal(states.shape)


def lifted_linear_trajectories(rng, features, count=4, steps=30):
    matrix, eigenvalues = latent_system(rng)
    lift = np.linalg.qr(rng.standard_normal((features, 6)))[0]
    trajectories = [simulate(matrix, rng.standard_normal(6), steps) @ lift.T for _ in range(count)]
    return trajectories, eigenvalues, matrix, lift


def random_walks(rng, features, lengths):
    out = []
    for steps in lengths:
        drift = 0.05 * rng.standard_normal(features)
        increments = drift + 0.1 * rng.standard_normal((steps, features))
        out.append(rng.standard_normal(features) + np.cumsum(increments, axis=0))
    return out


def omd_iterates():
    """Online mirror descent on f = sum tan x_i from a 5 x 5 grid (Redman et al., 4a)."""
    grid = np.linspace(0.1, 0.9, 5)
    trajectories = []
    for a, b in np.array(np.meshgrid(grid, grid)).reshape(2, -1).T:
        x = np.array([a, b])
        iterates = [x]
        for _ in range(99):
            x = np.clip(1 / (1 / x + 0.01 / np.cos(x) ** 2), 0.01, 1.0)
            iterates.append(x)
        trajectories.append(np.array(iterates))
    return trajectories


def explicit_hankel(trajectory, delays):
    steps = trajectory.shape[0]
    return np.hstack([trajectory[d : steps - delays + d] for d in range(delays + 1)])


def pydmd_exact(trajectories, svd_rank):
    from pydmd import DMD as PyDMD

    model = PyDMD(svd_rank=svd_rank, exact=True)
    if len(trajectories) == 1:
        return model.fit(trajectories[0].T)
    x = np.vstack([t[:-1] for t in trajectories]).T
    y = np.vstack([t[1:] for t in trajectories]).T
    return model.fit(x, y)


def parallel(a, b):
    """|cos| of the angle between complex vectors."""
    return abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))


class RecordingArray:
    """A (steps, features) array-like that records the column slices asked of it.

    It refuses ``np.asarray`` and a read of all columns at once, so a fit that succeeds on
    it read the data block by block only.
    """

    def __init__(self, data):
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.requests = 0

    def __getitem__(self, key):
        rows, columns = key
        assert rows == slice(None)
        assert len(range(*columns.indices(self.shape[1]))) < self.shape[1], "read all columns"
        self.requests += 1
        return self._data[rows, columns]

    def __array__(self, *args, **kwargs):
        raise AssertionError("converted the whole array")


# -- plugin --------------------------------------------------------------------------------


def test_registers_the_three_estimators():
    registered = {}
    koopkit_dmd.koopkit_register_estimators(
        register=lambda name, factory, **info: registered.update({name: (factory, info)})
    )
    assert {name: factory for name, (factory, _) in registered.items()} == {
        "dmd": "koopkit_dmd.estimators:DMD",  # imported on first use, so listing stays light
        "hankel-dmd": "koopkit_dmd.estimators:HankelDMD",
        "pca-hankel": "koopkit_dmd.estimators:PCAHankelDMD",
    }
    assert koopkit.plugins.lookup("estimator", "hankel-dmd").factory is HankelDMD
    assert all(info["description"] for _, info in registered.values())


# -- known systems ---------------------------------------------------------------------------


def test_recovers_a_linear_system_lifted_into_100000_dimensions(rng):
    trajectories, eigenvalues, matrix, lift = lifted_linear_trajectories(rng, 100_000)
    spectrum = DMD(rank=6, modes=True).fit(trajectories)
    assert spectrum.meta["method"] == "gram"
    assert_same_eigenvalues(spectrum.eigenvalues, eigenvalues, atol=1e-8)
    assert spectrum.residuals.max() < 1e-8
    latent_values, latent_vectors = np.linalg.eig(matrix)
    modes = spectrum.get_modes()
    assert modes.shape == (100_000, 6)
    for value, mode in zip(spectrum.eigenvalues, modes.T, strict=True):
        vector = latent_vectors[:, np.argmin(np.abs(latent_values - value))]
        assert parallel(mode, lift @ vector) == pytest.approx(1, abs=1e-10)


def test_full_rank_of_rank_deficient_tall_data_uses_qr(rng):
    trajectories, eigenvalues, _, _ = lifted_linear_trajectories(rng, 5_000)
    spectrum = DMD().fit(trajectories)
    assert spectrum.meta["method"] == "qr"
    assert spectrum.rank == 6
    assert_same_eigenvalues(spectrum.eigenvalues, eigenvalues, atol=1e-8)


def test_full_rank_ignores_float32_rounding_noise(rng):
    trajectories, eigenvalues, _, _ = lifted_linear_trajectories(rng, 300)
    spectrum = DMD().fit([t.astype(np.float32) for t in trajectories])
    assert spectrum.rank == 6
    assert_same_eigenvalues(spectrum.eigenvalues, eigenvalues, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    features=st.integers(2, 6),
    count=st.integers(1, 3),
    steps=st.integers(15, 40),
)
def test_invertible_change_of_coordinates_keeps_the_eigenvalues(seed, features, count, steps):
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((features, features))
    matrix *= 0.9 / np.abs(np.linalg.eigvals(matrix)).max()
    trajectories = [
        simulate(matrix, rng.standard_normal(features), steps, noise=0.1, rng=rng)
        for _ in range(count)
    ]
    change = np.eye(features) + 0.3 * rng.standard_normal((features, features))
    change /= np.linalg.norm(change, 2)
    if np.linalg.cond(change) > 1e3:
        change = np.eye(features)[::-1]
    original = DMD().fit(trajectories).eigenvalues
    transformed = DMD().fit([t @ change.T for t in trajectories]).eigenvalues
    assert_same_eigenvalues(transformed, original, atol=1e-7)


# -- agreement with PyDMD and a direct SVD -------------------------------------------------


@pytest.mark.parametrize(("rank", "svd_rank"), [(10, 10), (0.99, 0.99), ("gd", 0), (None, -1)])
def test_agrees_with_pydmd_on_one_random_walk(rng, rank, svd_rank):
    trajectory = random_walks(rng, 300, [50])[0]
    spectrum = DMD(rank=rank, amplitudes=True, modes=True).fit(trajectory)
    reference = pydmd_exact([trajectory], svd_rank)
    assert_same_eigenvalues(spectrum.eigenvalues, reference.eigs, atol=1e-8)
    for value, amplitude, mode in zip(
        spectrum.eigenvalues, spectrum.amplitudes, spectrum.get_modes().T, strict=True
    ):
        match = np.argmin(np.abs(reference.eigs - value))
        assert amplitude == pytest.approx(abs(reference.amplitudes[match]), rel=1e-6)
        assert parallel(mode, reference.modes[:, match]) == pytest.approx(1, abs=1e-8)


@pytest.mark.parametrize("features", [300, 5])
def test_agrees_with_pydmd_on_several_random_walks(rng, features):
    trajectories = random_walks(rng, features, [30, 25, 40])
    spectrum = DMD(rank=5).fit(trajectories)
    assert spectrum.meta["method"] == ("gram" if features == 300 else "svd")
    assert_same_eigenvalues(spectrum.eigenvalues, pydmd_exact(trajectories, 5).eigs, atol=1e-8)


def test_full_rank_agrees_with_a_direct_svd(rng):
    trajectories = random_walks(rng, 400, [30, 35])
    spectrum = DMD().fit(trajectories)
    assert spectrum.meta["method"] == "gram"
    assert spectrum.rank == 63
    assert_same_eigenvalues(spectrum.eigenvalues, direct_exact_dmd(trajectories), atol=1e-8)


# -- delays ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gram", "qr", "svd"])
@pytest.mark.parametrize("center", [False, True])
def test_hankel_from_the_gram_equals_the_explicit_embedding(rng, method, center):
    trajectories = [rng.standard_normal((n, 200)) + 2.0 for n in (25, 30, 28)]
    spectrum = HankelDMD(3, rank=12, center=center, amplitudes=True, method=method).fit(
        trajectories
    )
    if center:
        mean = np.vstack(trajectories).mean(axis=0)
        trajectories = [t - mean for t in trajectories]
    embedded = [explicit_hankel(t, 3) for t in trajectories]
    expected = DMD(rank=12, amplitudes=True, method="svd").fit(embedded)
    assert spectrum.meta["method"] == method
    np.testing.assert_allclose(spectrum.eigenvalues, expected.eigenvalues, atol=1e-10)
    np.testing.assert_allclose(spectrum.residuals, expected.residuals, atol=1e-10)
    np.testing.assert_allclose(spectrum.amplitudes, expected.amplitudes, rtol=1e-8)


def test_hankel_modes_stack_the_delays_oldest_first(rng):
    trajectories = [rng.standard_normal((n, 40)) for n in (20, 24)]
    spectrum = HankelDMD(2, rank=6, modes=True, method="gram").fit(trajectories)
    expected = DMD(rank=6, modes=True).fit([explicit_hankel(t, 2) for t in trajectories])
    for mode, reference in zip(spectrum.get_modes().T, expected.get_modes().T, strict=True):
        assert parallel(mode, reference) == pytest.approx(1, abs=1e-9)


def test_reproduces_the_papers_mirror_descent_spectrum():
    trajectories = omd_iterates()
    spectrum = HankelDMD(4).fit(trajectories)
    assert spectrum.meta["method"] == "svd"
    assert min(spectrum.meta["singular_values"]) / max(spectrum.meta["singular_values"]) < 1e-7
    embedded = [explicit_hankel(t, 4) for t in trajectories]
    assert_same_eigenvalues(spectrum.eigenvalues, direct_exact_dmd(embedded), atol=1e-6)
    assert_same_eigenvalues(spectrum.eigenvalues, PAPER_OMD_EIGENVALUES, atol=1e-5)
    qr = HankelDMD(4, method="qr").fit(trajectories)
    assert_same_eigenvalues(qr.eigenvalues, direct_exact_dmd(embedded), atol=1e-6)


def test_badly_conditioned_tall_data_switches_to_qr(rng):
    left = np.linalg.qr(rng.standard_normal((2000, 80)))[0]
    right = np.linalg.qr(rng.standard_normal((80, 80)))[0]
    trajectory = (left * np.logspace(0, -8, 80) @ right.T).T  # (80 steps, 2000 features)
    spectrum = DMD().fit(trajectory)
    assert spectrum.meta["method"] == "qr"
    direct = direct_exact_dmd([trajectory])
    assert_same_eigenvalues(spectrum.eigenvalues, direct, atol=1e-6)
    gram_only = DMD(method="gram").fit(trajectory)
    distance = np.abs(gram_only.eigenvalues[:, None] - direct[None, :])
    assert distance[linear_sum_assignment(distance)].max() > 1e-4  # why the switch exists


# -- containers and precision --------------------------------------------------------------


def as_zarr(array):
    stored = zarr.create_array(
        zarr.storage.MemoryStore(), shape=array.shape, chunks=(7, 13), dtype=array.dtype
    )
    stored[:] = array
    return stored


@pytest.mark.parametrize(
    "container",
    [as_zarr, lambda a: da.from_array(a, chunks=(7, 13)), torch.from_numpy, RecordingArray],
    ids=["zarr", "dask", "torch", "array-like"],
)
@pytest.mark.parametrize(
    "estimator",
    [
        DMD(rank=8, amplitudes=True, modes=True, block_bytes=45 * 8 * 10),
        HankelDMD(2, rank=8, center=True, block_bytes=45 * 8 * 10),
        PCAHankelDMD(4, 3, modes=True, block_bytes=45 * 8 * 10),
    ],
    ids=["dmd", "hankel-dmd", "pca-hankel"],
)
def test_streamed_containers_give_the_in_memory_spectrum(rng, container, estimator):
    trajectories = random_walks(rng, 150, [20, 25])
    spectrum = estimator.fit([container(t) for t in trajectories])
    expected = estimator.fit(trajectories)
    np.testing.assert_allclose(spectrum.eigenvalues, expected.eigenvalues, atol=1e-10)
    np.testing.assert_allclose(spectrum.residuals, expected.residuals, atol=1e-10)
    if expected.amplitudes is not None:
        np.testing.assert_allclose(spectrum.amplitudes, expected.amplitudes, rtol=1e-8)
    if expected.modes is not None:
        np.testing.assert_allclose(spectrum.get_modes(), expected.get_modes(), atol=1e-10)


def test_a_data_array_is_read_by_its_step_dimension_not_its_position(rng):
    xr = pytest.importorskip("xarray")
    (trajectory,) = random_walks(rng, 40, [30])
    view = xr.DataArray(trajectory, dims=("step", "param")).T  # (param, step)
    expected = DMD(rank=6).fit([trajectory]).eigenvalues
    np.testing.assert_allclose(DMD(rank=6).fit([view]).eigenvalues, expected, atol=1e-12)


def test_mode_phases_are_fixed_block_by_block_as_in_one_piece(rng):
    from koopkit_dmd.exact import _largest_entries, fix_mode_phases

    modes = rng.standard_normal((50, 4)) + 1j * rng.standard_normal((50, 4))
    modes[[7, 31], 2] = 10.0  # a tie across blocks: the first one wins, as np.argmax picks it
    modes[31, 2] = 10.0j
    whole = modes[np.argmax(np.abs(modes), axis=0), np.arange(4)]
    for rows in (1, 3, 7, 50, 100):
        np.testing.assert_array_equal(_largest_entries(modes, rows=rows), whole)
    fixed = fix_mode_phases(modes)
    peaks = fixed[np.argmax(np.abs(fixed), axis=0), np.arange(4)]
    np.testing.assert_allclose(peaks.imag, 0, atol=1e-12)
    assert np.all(peaks.real > 0)


def test_fixing_mode_phases_in_place_takes_little_memory(rng):
    import tracemalloc

    from koopkit_dmd.exact import fix_mode_phases

    modes = rng.standard_normal((400_000, 8)) * (1 + 1j)  # 51 MB
    tracemalloc.start()
    fix_mode_phases(modes, overwrite=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < modes.nbytes / 4  # np.abs and argmax of all of it: as much as the modes


def test_float32_is_streamed_without_a_whole_upcast(rng):
    trajectories = random_walks(rng, 150, [20, 25])
    recorded = [RecordingArray(t.astype(np.float32)) for t in trajectories]
    estimator = DMD(rank=8, modes=True, block_bytes=45 * 8 * 16)
    spectrum = estimator.fit(recorded)
    assert [r.requests for r in recorded] == [10, 10]  # 150 features, 16 per block
    spectrum.get_modes()
    spectrum.get_modes()  # computed once
    assert [r.requests for r in recorded] == [20, 20]
    from_zarr = estimator.fit([as_zarr(t.astype(np.float32)) for t in trajectories])
    expected = estimator.fit(trajectories)
    np.testing.assert_allclose(from_zarr.eigenvalues, expected.eigenvalues, atol=1e-5)
    np.testing.assert_allclose(spectrum.eigenvalues, from_zarr.eigenvalues, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gram", "qr"])
def test_cuda_gives_the_cpu_spectrum(rng, method):
    trajectories = random_walks(rng, 3000, [40, 40])
    on_gpu = DMD(rank=10, modes=True, device="cuda", method=method).fit(
        [torch.from_numpy(t.astype(np.float32)).cuda() for t in trajectories]
    )
    on_cpu = DMD(rank=10, modes=True, method=method).fit(
        [t.astype(np.float32) for t in trajectories]
    )
    np.testing.assert_allclose(on_gpu.eigenvalues, on_cpu.eigenvalues, atol=1e-9)
    np.testing.assert_allclose(on_gpu.get_modes(), on_cpu.get_modes(), atol=1e-8)


# -- centering, rank rules, PCA ------------------------------------------------------------


@pytest.mark.parametrize("method", ["gram", "qr", "svd"])
def test_centering_in_one_pass_equals_centering_the_data(rng, method):
    trajectories = [t + 3.0 for t in random_walks(rng, 120, [20, 22])]
    spectrum = DMD(rank=9, center=True, modes=True, method=method).fit(trajectories)
    mean = np.vstack(trajectories).mean(axis=0)
    expected = DMD(rank=9, modes=True, method="svd").fit([t - mean for t in trajectories])
    np.testing.assert_allclose(spectrum.eigenvalues, expected.eigenvalues, atol=1e-10)
    np.testing.assert_allclose(spectrum.get_modes(), expected.get_modes(), atol=1e-9)


@pytest.mark.parametrize(("rank", "svd_rank"), [(0.9, 0.9), ("gd", 0)])
def test_rank_rules_pick_pydmds_rank_on_noisy_low_rank_data(rng, rank, svd_rank):
    signal = rng.standard_normal((60, 4)) @ rng.standard_normal((4, 200))
    trajectory = signal + 0.05 * rng.standard_normal(signal.shape)
    spectrum = DMD(rank=rank).fit(trajectory)
    reference = pydmd_exact([trajectory], svd_rank)
    assert spectrum.rank == reference.eigs.size
    assert_same_eigenvalues(spectrum.eigenvalues, reference.eigs, atol=1e-8)
    if rank == "gd":
        assert spectrum.rank == 4


@pytest.mark.parametrize("method", ["auto", "qr", "svd"])
@pytest.mark.parametrize("center", [True, False])
def test_pca_hankel_equals_sklearn_pca_then_delays(rng, method, center):
    from sklearn.decomposition import PCA

    trajectories = random_walks(rng, 120, [30, 35])
    stack = np.vstack(trajectories)
    pca = PCA(4).fit(stack)
    scores = pca.transform(stack) if center else stack @ pca.components_.T  # the paper's
    embedded = [explicit_hankel(s, 5) for s in np.split(scores, [30])]
    spectrum = PCAHankelDMD(4, 5, center=center, method=method).fit(trajectories)
    assert spectrum.meta["method"] == ("gram" if method == "auto" else method)
    expected = DMD().fit(embedded)
    np.testing.assert_allclose(spectrum.eigenvalues, expected.eigenvalues, atol=1e-9)
    np.testing.assert_allclose(spectrum.residuals, expected.residuals, atol=1e-9)


# -- residuals -----------------------------------------------------------------------------


def test_residuals_flag_the_spurious_eigenvalues_of_noisy_data(rng):
    matrix = np.zeros((4, 4))
    matrix[0, 0], matrix[3, 3] = 0.95, 0.5
    matrix[1:3, 1:3] = rotation(0.8, 0.5)
    lift = np.linalg.qr(rng.standard_normal((30, 4)))[0]
    trajectories = [
        simulate(matrix, rng.standard_normal(4), 100) @ lift.T
        + 1e-3 * rng.standard_normal((100, 30))
        for _ in range(3)
    ]
    spectrum = DMD(rank=7).fit(trajectories)
    true_values = np.linalg.eigvals(matrix)
    distance = np.abs(spectrum.eigenvalues[:, None] - true_values[None, :])
    rows, _ = linear_sum_assignment(distance)
    genuine = np.isin(np.arange(7), rows)
    assert distance[rows].min(axis=1).max() < 1e-3
    assert spectrum.residuals[genuine].max() < 0.1 < spectrum.residuals[~genuine].min()


# -- results --------------------------------------------------------------------------------


def test_spectrum_is_sorted_records_its_provenance_and_leaves_the_input_alone(rng):
    trajectories = random_walks(rng, 80, [20, 20, 20])
    copies = [t.copy() for t in trajectories]
    spectrum = HankelDMD(2, rank=6).fit(trajectories)
    assert isinstance(spectrum, Spectrum)
    for original, copy in zip(trajectories, copies, strict=True):
        np.testing.assert_array_equal(original, copy)
    moduli = np.abs(spectrum.eigenvalues)
    assert np.all(np.diff(moduli) <= 0)
    meta = spectrum.meta
    assert meta["estimator"] == "hankel-dmd"
    assert meta["params"]["delays"] == 2 and meta["params"]["rank"] == 6
    assert meta["method"] == "gram"
    assert (meta["rank"], meta["trajectories"], meta["snapshots"]) == (6, 3, 60)
    assert len(meta["singular_values"]) == 6
    estimator = HankelDMD(2, rank=6)
    assert repr(estimator).startswith("HankelDMD(delays=2, rank=6, center=False")
    assert HankelDMD(**estimator.get_params()).get_params() == estimator.get_params()


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DMD(rank=0), r"Expected rank to be a positive int, .* Got 0 instead\."),
        (lambda: DMD(rank=-3), r"Got -3 instead\."),
        (lambda: DMD(rank=1.5), r"Got 1\.5 instead\."),
        (lambda: DMD(rank="svht"), r"Got 'svht' instead\."),
        (lambda: DMD(center="yes"), r"Expected center to be True or False\. Got 'yes' instead\."),
        (
            lambda: DMD(method="fast"),
            r"Expected method to be one of 'auto', 'gram', 'qr', 'svd'\. Got 'fast' instead\.",
        ),
        (lambda: DMD(block_bytes=0), r"Expected block_bytes to be an int of at least 1\."),
        (lambda: HankelDMD(delays=-1), r"Expected delays to be an int of at least 0\. Got -1"),
        (lambda: PCAHankelDMD(components=0), r"Expected components to be an int of at least 1"),
    ],
)
def test_invalid_parameters(make, match):
    with pytest.raises(EstimationError, match=match):
        make()


@pytest.mark.parametrize(
    ("estimator", "data", "error", "match"),
    [
        (
            DMD(rank=5),
            [np.ones((4, 10))],
            InsufficientDataError,
            r"Expected at least 6 snapshots for rank 5\. Got 4 instead\.",
        ),
        (
            DMD(rank=6),
            [np.ones((4, 10)), np.ones((3, 10))],
            InsufficientDataError,
            r"Expected at least 8 snapshots for rank 6\. Got 7 instead\.",
        ),
        (
            HankelDMD(2, rank=5),
            [np.ones((6, 10))],
            InsufficientDataError,
            r"Expected at least 8 snapshots for rank 5 with 2 delays\. Got 6 instead\.",
        ),
        (
            DMD(rank=4),
            [np.ones((20, 3))],
            InsufficientDataError,
            r"Expected rank at most 3, the dimension of the snapshots\. Got 4 instead\.",
        ),
        (
            DMD(),
            [np.ones((5, 3)), np.ones((1, 3))],
            InsufficientDataError,
            r"Expected at least 2 steps in trajectory 1\. Got 1 instead\.",
        ),
        (
            HankelDMD(4),
            [np.ones((5, 3))],
            InsufficientDataError,
            r"Expected at least 6 steps in trajectory 0 with 4 delays\. Got 5 instead\.",
        ),
        (
            DMD(),
            [np.ones((5, 3)), np.ones((5, 4))],
            EstimationError,
            r"Expected 3 features in trajectory 1, as in trajectory 0\. Got 4 instead\.",
        ),
        (
            PCAHankelDMD(5, 2),
            [np.ones((40, 3))],
            InsufficientDataError,
            r"Expected at most 3 components for 3 features and 40 snapshots\. Got 5 instead\.",
        ),
        (
            DMD(),
            [np.zeros((6, 3))],
            EstimationError,
            r"Expected snapshots with at least one singular value above rounding noise\.",
        ),
        (
            DMD(rank=0.9, method="gram"),
            [np.zeros((6, 3))],
            EstimationError,
            r"Expected snapshots with at least one singular value above rounding noise\.",
        ),
    ],
)
def test_invalid_data(estimator, data, error, match):
    with pytest.raises(error, match=match):
        estimator.fit(data)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("features", [3, 300])
def test_non_finite_data(rng, bad, features):
    trajectories = [rng.standard_normal((10, features)) for _ in range(2)]
    trajectories[1][4, 2] = bad
    with pytest.raises(NonFiniteDataError, match=r"Expected finite values in trajectory 1\."):
        DMD().fit(trajectories)


def test_a_rank_into_the_rounding_noise_is_refused(rng):
    trajectory = np.c_[rng.standard_normal(30), np.zeros(30)]  # a zero singular value
    with pytest.raises(EstimationError, match=r"Expected rank at most 1: the data have 1 singular"):
        DMD(rank=2).fit(trajectory)


# -- the noise floors: the data's rounding, and what the Gram resolves -----------------------


def decaying_modes(rng, eigenvalues, weights, features, steps=40):
    """Snapshots ``sum_i w_i lambda_i^t q_i`` for orthonormal ``q_i``: singular values ~ w."""
    basis = np.linalg.qr(rng.standard_normal((features, len(eigenvalues))))[0]
    powers = np.asarray(eigenvalues) ** np.arange(steps)[:, None]
    return (np.asarray(weights) * powers) @ basis.T


def test_float32_full_rank_keeps_modes_far_above_its_rounding(rng):
    """200 000 float32 features: a mode at 1.3e-3 of the largest singular value is signal.

    A cut of ``features * eps32 * s_max`` (numpy's matrix_rank) is 2.4e-2 of the largest
    here and kept 2 of the 4 modes.
    """
    eigenvalues = [0.99, 0.9, 0.7, 0.5]
    data = decaying_modes(rng, eigenvalues, [1.0, 0.3, 0.1, 0.03], 200_000, steps=30)
    spectrum = DMD().fit(data.astype(np.float32))
    assert spectrum.rank == 4
    assert_same_eigenvalues(spectrum.eigenvalues, eigenvalues, atol=1e-4)


@pytest.mark.parametrize(
    ("smallest", "method"),
    [(1e-2, "gram"), (1e-3, "gram"), (1e-4, "qr"), (1e-5, "qr"), (6.6e-7, "qr"), (1e-7, "qr")],
)
def test_auto_full_rank_gives_the_direct_svds_eigenvalues(rng, smallest, method):
    """Whatever the conditioning, ``auto`` is within 1e-8 of a direct SVD: the Gram only
    where its eigenvalues are that accurate, the CholeskyQR factor elsewhere."""
    eigenvalues = [0.97, 0.8, 0.6, -0.4]
    data = decaying_modes(rng, eigenvalues, [1, 1, 1, smallest], 3000)
    spectrum = DMD(rank=4).fit(data)
    assert_same_eigenvalues(spectrum.eigenvalues, direct_exact_dmd([data], rank=4), atol=1e-8)
    assert spectrum.meta["method"] == method


@pytest.mark.parametrize(("dtype", "rank"), [(np.float32, 4), (np.float16, 3)])
def test_weights_with_a_large_mean_keep_modes_above_their_actual_rounding(rng, dtype, rank):
    """Weights of about 0.05 moving by less: the centered modes sit far below the worst-case
    rounding ``u ||Z||_F`` of the uncentered data, but far above its actual rounding."""
    features, steps = 20_000, 300
    eigenvalues = np.array([0.99, 0.9, 0.7, 0.5])
    weights = np.array([1, 0.5, 0.1, 3e-4])[:rank] * np.sqrt(features) * 0.01
    basis = np.linalg.qr(rng.standard_normal((features, rank)))[0]
    motion = (basis * weights) @ (eigenvalues[:rank, None] ** np.arange(steps))
    data = (motion.T + 0.05 * rng.standard_normal(features)).astype(dtype)
    for method in ("auto", "svd"):
        for rule in (rank, None):
            spectrum = DMD(rank=rule, center=True, method=method).fit(data)
            assert_same_eigenvalues(spectrum.eigenvalues, eigenvalues[:rank], atol=1e-3)


def test_the_gram_method_keeps_only_what_the_gram_resolves(rng):
    eigenvalues = [0.99, 0.9, 0.5, -0.3]
    data = decaying_modes(rng, eigenvalues, [1, 1, 1, 1], 500, steps=60)
    spectrum = DMD(method="gram").fit(data)  # rank 4 exactly: the rest is Gram rounding
    assert spectrum.rank == 4
    assert_same_eigenvalues(spectrum.eigenvalues, eigenvalues, atol=1e-8)
    assert DMD(method="gram", rank="gd").fit(data).rank == 4
    with pytest.raises(EstimationError, match=r"rank at most 4.*method='qr' resolves"):
        DMD(method="gram", rank=5).fit(data)


def test_pca_hankel_keeps_no_gram_noise_as_modes(rng):
    """Exact rank-6 dynamics plus an offset: the six eigenvalues and 1 (the offset), by
    default as with the stable factor, none made of the Gram's rounding."""
    lifted, eigenvalues, _, _ = lifted_linear_trajectories(rng, 2000, steps=60)
    offset = rng.standard_normal(2000)
    trajectories = [offset + 0.1 * t for t in lifted]
    reference = PCAHankelDMD(6, 2, center=False, method="qr").fit(trajectories)
    for method in ("auto", "gram"):
        spectrum = PCAHankelDMD(6, 2, center=False, method=method).fit(trajectories)
        assert spectrum.rank == reference.rank == 7
        assert_same_eigenvalues(spectrum.eigenvalues, [*eigenvalues, 1.0], atol=1e-7)


@pytest.mark.parametrize(
    ("data", "options"),
    [
        (np.zeros((20, 100)), {"method": "qr"}),  # no CholeskyQR shift: straight to TSQR
        (np.ones((20, 100)), {"method": "qr", "center": True}),  # centered: only rounding
        (np.ones((20, 100)), {"center": True}),
    ],
)
def test_data_of_rounding_noise_only_is_refused(data, options):
    with pytest.raises(EstimationError, match=r"at least one singular value above rounding"):
        DMD(**options).fit(data)


@pytest.mark.parametrize("scale", [1e-160, 1e-200, 1e200])
def test_data_beyond_the_grams_float64_range_is_refused(rng, scale):
    """At 1e-200 every square underflows to zero: a Gram of zeros, yet not all-zero data."""
    data = decaying_modes(rng, [0.9, 0.5, -0.3, 0.99], [1, 1, 1, 1], 500, steps=30)
    with pytest.raises(EstimationError, match=r"rescale the data"):
        DMD(rank=4).fit(data * scale)
    spectrum = DMD(rank=4).fit(data * scale**0.5)  # 1e-80, 1e-100 and 1e100 are fine
    assert_same_eigenvalues(spectrum.eigenvalues, [0.9, 0.5, -0.3, 0.99], atol=1e-10)


def test_residuals_do_not_depend_on_the_scale_of_the_data(rng):
    """The SVD path needs no Gram; the residuals' norms must not underflow either."""
    data = decaying_modes(rng, [0.9, 0.5, -0.3, 0.99], [1, 1, 1, 1], 6, steps=30)
    data = data + 1e-3 * rng.standard_normal(data.shape)  # residuals well above rounding
    reference = DMD(rank=4, method="svd").fit(data).residuals
    assert reference.min() > 1e-6
    for scale in (1e-200, 1e200):
        residuals = DMD(rank=4, method="svd").fit(data * scale).residuals
        np.testing.assert_allclose(residuals, reference, rtol=1e-9)


@pytest.mark.parametrize("device", ["nope", 3.5])
def test_an_invalid_device_is_refused(device):
    with pytest.raises(EstimationError, match=r"Expected device to be a torch device"):
        DMD(device=device)


def test_eigenvalues_of_equal_modulus_come_in_one_order_whatever_the_method(rng):
    data = decaying_modes(rng, [0.95, -0.95, 0.5, -0.5], [1, 1, 1, 1], 200, steps=60)
    orders = {m: DMD(rank=4, method=m).fit(data).eigenvalues for m in ("gram", "qr", "svd")}
    for eigenvalues in orders.values():
        np.testing.assert_allclose(eigenvalues.real, [-0.95, 0.95, -0.5, 0.5], atol=1e-6)


def test_parameters_are_set_and_checked_as_scikit_learn_expects(rng):
    from sklearn.base import clone

    estimator = DMD(rank=np.int64(4))
    assert type(estimator.rank) is int  # plain JSON in the spectrum's meta
    assert clone(estimator).get_params(deep=True) == estimator.get_params()
    assert estimator.set_params(rank=3, method="qr") is estimator
    assert (estimator.rank, estimator.method) == (3, "qr")
    with pytest.raises(EstimationError, match="Expected rank to be"):
        estimator.set_params(rank=-3)
    with pytest.raises(EstimationError, match=r"Invalid parameters \['bogus'\]"):
        estimator.set_params(bogus=1)
    assert estimator.rank == 3
    spectrum = DMD(rank=np.int64(2)).fit(decaying_modes(rng, [0.9, 0.5], [1, 1], 50, steps=30))
    assert Spectrum.from_dataset(spectrum.to_dataset()).meta["params"]["rank"] == 2
    numbers = Spectrum([0.5], meta={"a": np.float32(0.5), "b": np.int64(3), "c": np.arange(2)})
    assert Spectrum.from_dataset(numbers.to_dataset()).meta == {"a": 0.5, "b": 3, "c": [0, 1]}


def test_modes_are_read_only(rng):
    data = decaying_modes(rng, [0.9, 0.5], [1, 1], 50, steps=30)
    spectrum = DMD(rank=2, modes=True).fit(data)
    with pytest.raises(ValueError, match="read-only"):
        spectrum.get_modes()[0, 0] = 0


@pytest.mark.parametrize("method", ["gram", "qr", "svd"])
@pytest.mark.parametrize(
    "make",
    [DMD, lambda **options: HankelDMD(2, center=True, **options)],
    ids=["dmd", "hankel-dmd"],
)
def test_a_spectrum_with_lazy_modes_pickles_with_its_modes_not_its_data(rng, make, method):
    """Pickled (a dask or multiprocessing result), lazy modes are computed where the data is
    and travel instead of it: the input is many times their size."""
    walks = random_walks(rng, 300, [250, 200])
    spectrum = make(rank=4, modes=True, method=method).fit(walks)
    blob = pickle.dumps(spectrum)
    assert len(blob) < sum(t.nbytes for t in walks) / 4
    unpickled = pickle.loads(blob)  # noqa: S301 (bytes we made, not a file)
    np.testing.assert_array_equal(unpickled.eigenvalues, spectrum.eigenvalues)
    np.testing.assert_array_equal(unpickled.get_modes(), spectrum.get_modes())
    assert unpickled.meta == spectrum.meta
    with pytest.raises(ValueError, match="read-only"):
        unpickled.eigenvalues[0] = 0
