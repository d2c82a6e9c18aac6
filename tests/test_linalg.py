"""Shared numerics: streamed Gram and factors, delays, rank rules, input checks."""

import itertools
import threading

import dask.array as da
import numpy as np
import pytest
import scipy.sparse
import torch
import zarr

from koopkit.errors import EstimationError, InsufficientDataError, NonFiniteDataError
from koopkit.linalg import (
    BAND_BLOCKS,
    GRAM_RELATIVE_ACCURACY,
    Trajectories,
    center_factor,
    center_gram,
    check_rank_rule,
    cholesky_qr,
    gram_factor,
    hankel_factor,
    hankel_gram,
    rounding_noise,
    select_rank,
    streamed_gram,
    streamed_product,
    tsqr,
)
from koopkit.linalg import factor as factor_module


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def stacked(trajectories):
    return np.vstack([np.asarray(t, dtype=np.float64) for t in trajectories])


def random_trajectories(rng, lengths=(9, 7, 11), features=23, dtype=np.float64):
    return [rng.standard_normal((n, features)).astype(dtype) for n in lengths]


def explicit_hankel(trajectory, delays):
    steps = trajectory.shape[0]
    return np.hstack([trajectory[d : steps - delays + d] for d in range(delays + 1)])


# -- input checks --------------------------------------------------------------------------


def test_single_array_is_one_trajectory():
    trajectories = Trajectories.from_input(np.zeros((5, 3)))
    assert trajectories.lengths == (5,)
    assert trajectories.features == 3


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([], InsufficientDataError, r"Expected at least 1 trajectory\. Got 0 instead\."),
        ([np.zeros(4)], EstimationError, r"Expected trajectory 0 to be 2-D .* Got shape \(4,\)"),
        (
            [np.zeros((4, 3)), np.zeros((4, 5))],
            EstimationError,
            r"Expected 3 features in trajectory 1, as in trajectory 0\. Got 5 instead\.",
        ),
        (
            [np.zeros((4, 3), dtype=complex)],
            EstimationError,
            r"Expected real numbers in trajectory 0\. Got dtype complex128 instead\.",
        ),
        (
            [[[1.0, 2.0], [3.0, 4.0]]],
            EstimationError,
            r"Expected trajectory 0 to be an array .* Got list instead\.",
        ),
        (
            [scipy.sparse.csr_array(np.eye(4, 3))],
            EstimationError,
            r"Expected trajectory 0 to be a dense array\. Got a sparse csr_array instead\.",
        ),
        (
            [torch.eye(4, 3).to_sparse()],
            EstimationError,
            r"Expected trajectory 0 to be a dense array\. Got a torch\.sparse_coo tensor instead\.",
        ),
        (
            [torch.empty((4, 3), device="meta")],
            EstimationError,
            r"Expected trajectory 0 to be a dense array\. Got a tensor on the meta device instead\.",
        ),
    ],
)
def test_invalid_trajectories(data, error, match):
    with pytest.raises(error, match=match):
        Trajectories.from_input(data)


def test_a_dask_array_of_unknown_shape_is_refused_clearly():
    data = da.from_array(np.ones((6, 3)), chunks=(2, 3))
    unknown = data[da.from_array(np.ones(6, dtype=bool), chunks=2)]
    with pytest.raises(EstimationError, match=r"known shape.*Got shape \(nan, 3\)"):
        Trajectories.from_input([unknown])


@pytest.mark.parametrize(
    ("arrays", "unit"),
    [
        ([np.zeros((3, 2))], np.finfo(np.float64).eps),
        ([np.zeros((3, 2)), np.zeros((3, 2), np.float32)], np.finfo(np.float32).eps),
        ([np.zeros((3, 2), np.int64)], np.finfo(np.float64).eps),
        ([torch.zeros((3, 2), dtype=torch.float16)], np.finfo(np.float16).eps),
    ],
)
def test_rounding_unit_is_the_coarsest_input_precision(arrays, unit):
    assert Trajectories.from_input(arrays).rounding_unit == pytest.approx(unit)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_names_the_trajectory(rng, bad):
    data = random_trajectories(rng)
    data[2][3, 17] = bad
    trajectories = Trajectories.from_input(data)
    with pytest.raises(NonFiniteDataError, match=r"Expected finite values in trajectory 2\."):
        streamed_gram(trajectories, block_bytes=27 * 8 * 5)


def test_blocks_align_to_storage_chunks(rng):
    array = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(20, 100), chunks=(7, 13), dtype="f8"
    )
    trajectories = Trajectories.from_input([array])
    assert trajectories.block_width(20 * 8 * 30) == 26  # two whole chunks
    assert trajectories.block_width(20 * 8 * 5) == 5
    assert Trajectories.from_input([np.zeros((20, 100))]).block_width(20 * 8 * 30) == 30


# -- Gram, products, factors ---------------------------------------------------------------


def as_zarr(array, chunks=(7, 13)):
    stored = zarr.create_array(
        zarr.storage.MemoryStore(), shape=array.shape, chunks=chunks, dtype=array.dtype
    )
    stored[:] = array
    return stored


@pytest.mark.parametrize(
    "container",
    [
        np.asarray,
        as_zarr,
        lambda a: da.from_array(a, chunks=(7, 13)),
        torch.from_numpy,
    ],
    ids=["numpy", "zarr", "dask", "torch"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streamed_gram_of_every_container(rng, container, dtype):
    data = random_trajectories(rng, dtype=dtype)
    expected = stacked(data) @ stacked(data).T
    trajectories = Trajectories.from_input([container(t) for t in data])
    gram = streamed_gram(trajectories, block_bytes=27 * 8 * 6)
    np.testing.assert_allclose(gram, expected, rtol=1e-13, atol=1e-12)


def test_streamed_gram_of_a_memmap(rng, tmp_path):
    data = random_trajectories(rng, lengths=(12,), dtype=np.float32)[0]
    mapped = np.lib.format.open_memmap(
        tmp_path / "z.npy", mode="w+", dtype=np.float32, shape=data.shape
    )
    mapped[:] = data
    gram = streamed_gram(Trajectories.from_input(mapped), block_bytes=12 * 8 * 5)
    np.testing.assert_allclose(gram, stacked([data]) @ stacked([data]).T, rtol=1e-13)


def test_streamed_gram_on_torch_cpu_matches_numpy(rng):
    trajectories = Trajectories.from_input(random_trajectories(rng))
    np.testing.assert_allclose(
        streamed_gram(trajectories, device="cpu", block_bytes=27 * 8 * 5),
        streamed_gram(trajectories),
        rtol=1e-13,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_gram_on_cuda_matches_numpy(rng):
    trajectories = Trajectories.from_input(random_trajectories(rng, dtype=np.float32))
    np.testing.assert_allclose(
        streamed_gram(trajectories, device="cuda", block_bytes=27 * 8 * 5),
        streamed_gram(trajectories),
        rtol=1e-12,
    )


@pytest.mark.parametrize(
    "container",
    [
        np.asarray,
        np.asfortranarray,
        lambda a: np.repeat(a, 2, axis=1)[:, ::2],  # a strided view, neither C nor F ordered
        as_zarr,
        torch.from_numpy,
    ],
    ids=["numpy", "fortran", "strided", "zarr", "torch"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streamed_gram_of_a_cholesky_qr_pass(rng, container, dtype):
    data = random_trajectories(rng, dtype=dtype)
    z = stacked(data)
    triangular = np.linalg.cholesky(z @ z.T + np.eye(z.shape[0])).T
    q = np.linalg.solve(triangular.T, z).T  # Z^T R^{-1}
    trajectories = Trajectories.from_input([container(t) for t in data])
    gram = streamed_gram(trajectories, triangular=triangular, block_bytes=500)
    np.testing.assert_allclose(gram, q.T @ q, atol=1e-12)
    assert np.array_equal(gram, gram.T)


def test_streamed_product(rng):
    data = random_trajectories(rng)
    right = rng.standard_normal((27, 4))
    trajectories = Trajectories.from_input(data)
    expected = stacked(data).T @ right
    np.testing.assert_allclose(streamed_product(trajectories, right, block_bytes=500), expected)
    np.testing.assert_allclose(
        streamed_product(trajectories, right, device="cpu", block_bytes=500), expected
    )


def test_gram_factor_squares_to_the_gram(rng):
    z = rng.standard_normal((12, 40))
    factor = gram_factor(z @ z.T)
    np.testing.assert_allclose(factor.T @ factor, z @ z.T, atol=1e-12)
    assert np.linalg.norm(factor[0]) ** 2 == pytest.approx(np.linalg.eigvalsh(z @ z.T)[-1])


def test_centering_without_the_data_equals_centering_the_data(rng):
    z = rng.standard_normal((15, 30)) + 5.0
    centered = z - z.mean(axis=0)
    np.testing.assert_allclose(center_gram(z @ z.T), centered @ centered.T, atol=1e-10)
    np.testing.assert_allclose(center_factor(z.T), centered.T, atol=1e-14)


def ill_conditioned(rng, features=600, steps=50, smallest=1e-12):
    left = np.linalg.qr(rng.standard_normal((features, steps)))[0]
    right = np.linalg.qr(rng.standard_normal((steps, steps)))[0]
    return (left * np.logspace(0, np.log10(smallest), steps) @ right.T).T  # (steps, features)


def test_cholesky_qr_keeps_the_singular_values_the_gram_loses(rng):
    z = ill_conditioned(rng)
    trajectories = Trajectories.from_input(z)
    gram = streamed_gram(trajectories)
    exact = np.linalg.svd(z, compute_uv=False)
    from_gram = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None))
    from_qr = np.linalg.svd(
        cholesky_qr(trajectories, gram, block_bytes=50 * 8 * 64), compute_uv=False
    )
    assert np.abs(from_gram - exact).max() > 1e-9  # rounding noise at sqrt(eps)
    np.testing.assert_allclose(from_qr, exact, rtol=0, atol=1e-15)
    assert exact[-1] ** 2 < GRAM_RELATIVE_ACCURACY * np.linalg.norm(gram)


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("condition", [1e3, 1e6, 1e8, 1e10, 1e13])
def test_cholesky_qr_takes_one_pass_when_it_is_enough(rng, monkeypatch, condition, device):
    """Up to a condition number of about 1e8, CholeskyQR2: one pass over the data after the
    Gram. Beyond, the shifted CholeskyQR3 (two passes), or TSQR after its first pass where
    rounding makes its second Cholesky fail. Each as accurate as a direct SVD."""
    z = ill_conditioned(rng, features=4000, steps=60, smallest=1 / condition)
    trajectories = Trajectories.from_input(z)
    gram = streamed_gram(trajectories)
    calls = []

    def counted(name, function):
        return lambda *a, **k: calls.append(name) or function(*a, **k)

    monkeypatch.setattr(factor_module, "streamed_gram", counted("pass", streamed_gram))
    monkeypatch.setattr(factor_module, "tsqr", counted("tsqr", tsqr))
    factor = cholesky_qr(trajectories, gram, device=device, block_bytes=60 * 8 * 500)
    exact = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(factor, compute_uv=False), exact, atol=4e-15)
    if condition <= 1e8:
        assert calls == ["pass"]
    else:
        assert calls in (["pass", "pass"], ["pass", "tsqr"])


def test_rank_deficient_data_falls_back_to_tsqr(rng, monkeypatch):
    z = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 300))  # rank 5 < 40 snapshots
    trajectories = Trajectories.from_input(z)
    calls = []
    monkeypatch.setattr(factor_module, "tsqr", lambda *a, **k: calls.append(1) or tsqr(*a, **k))
    factor = cholesky_qr(trajectories, streamed_gram(trajectories), block_bytes=40 * 8 * 64)
    assert calls
    np.testing.assert_allclose(
        np.linalg.svd(factor, compute_uv=False),
        np.linalg.svd(z, compute_uv=False),
        rtol=0,
        atol=1e-12 * np.linalg.norm(z, 2),
    )


@pytest.mark.parametrize("device", [None, "cpu"])
def test_tsqr_is_the_r_of_a_qr(rng, device):
    z = rng.standard_normal((30, 200))
    factor = tsqr(Trajectories.from_input(z), device=device, block_bytes=30 * 8 * 40)
    assert np.allclose(np.tril(factor, -1), 0)
    np.testing.assert_allclose(factor.T @ factor, z @ z.T, atol=1e-10)


# -- delays ---------------------------------------------------------------------------------


def test_hankel_gram_and_factor_equal_the_explicit_embedding(rng):
    data = random_trajectories(rng)
    lengths = [t.shape[0] for t in data]
    embedded = np.vstack([explicit_hankel(t, 3) for t in data])
    z = stacked(data)
    np.testing.assert_allclose(hankel_gram(z @ z.T, lengths, 3), embedded @ embedded.T, atol=1e-12)
    factor = hankel_factor(z.T, lengths, 3)
    np.testing.assert_allclose(factor, embedded.T)  # the data is its own factor


# -- rank rules ----------------------------------------------------------------------------


def noisy_low_rank(rng, shape=(80, 50), rank=4, noise=0.05):
    signal = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    return signal + noise * rng.standard_normal(shape)


@pytest.mark.parametrize("rule", [3, 0.5, 0.9, 0.999, "gd"])
def test_rank_rules_agree_with_pydmd(rng, rule):
    from pydmd.utils import compute_rank

    data = noisy_low_rank(rng)
    s = np.linalg.svd(data, compute_uv=False)
    assert select_rank(s, rule, data.shape) == compute_rank(data, 0 if rule == "gd" else rule)


def test_gavish_donoho_finds_the_signal_rank(rng):
    data = noisy_low_rank(rng)
    assert select_rank(np.linalg.svd(data, compute_uv=False), "gd", data.shape) == 4


def test_full_rank_rule_is_the_numerical_rank(rng):
    data = rng.standard_normal((60, 7)) @ rng.standard_normal((7, 40))
    s = np.linalg.svd(data, compute_uv=False)
    assert select_rank(s, None, data.shape) == np.linalg.matrix_rank(data) == 7


def test_full_rank_rule_follows_the_datas_precision(rng):
    data = (rng.standard_normal((60, 7)) @ rng.standard_normal((7, 40))).astype(np.float32)
    s = np.linalg.svd(data.astype(np.float64), compute_uv=False)
    assert select_rank(s, None, data.shape) > 7  # float32 rounding read as signal
    noise = rounding_noise(float(np.finfo(np.float32).eps), float(np.linalg.norm(data)), data.shape)
    assert select_rank(s, None, data.shape, noise=noise) == 7


def test_rounding_noise_does_not_grow_with_the_features():
    """float32 data of 10 million features: a mode at 1.3e-3 of the largest is signal.

    A ``max(shape) * u * s_max`` cut (numpy's matrix_rank) would be 1.2 s_max here and keep
    nothing.
    """
    s = np.array([1.0, 8.6e-2, 1.3e-2, 1.3e-3, 5.4e-9, 5.3e-9])
    shape = (10_000_000, 30)
    noise = rounding_noise(float(np.finfo(np.float32).eps), float(np.linalg.norm(s)), shape)
    assert select_rank(s, None, shape, noise=noise) == 4
    assert select_rank(s, 0.999999999, shape, noise=noise) == 4
    assert select_rank(s, "gd", shape, noise=noise) <= 4


def test_a_fixed_rank_into_the_rounding_noise_is_refused():
    s = np.array([1.0, 0.5, 1e-9, 1e-10])
    noise = rounding_noise(float(np.finfo(np.float32).eps), float(np.linalg.norm(s)), (1000, 4))
    assert select_rank(s, 2, (1000, 4), noise=noise) == 2
    with pytest.raises(EstimationError, match=r"Expected rank at most 2: the data have 2 singular"):
        select_rank(s, 3, (1000, 4), noise=noise)


def test_fixed_rank_is_capped_by_the_singular_values():
    assert select_rank(np.array([3.0, 2.0, 1.0]), 10, (3, 8)) == 3


@pytest.mark.parametrize("rule", [0, -2, 1.0, 1.5, 0.0, True, "svht", [3]])
def test_invalid_rank_rules(rule):
    with pytest.raises(EstimationError, match=r"Expected rank to be a positive int, a float"):
        check_rank_rule(rule)


# -- reading: bands of whole chunks, reused blocks, read-ahead ------------------------------


class ChunkedArray:
    """A (steps, features) array-like with storage chunks that records the column slices read.

    ``fail_from``: reading any column at or after it raises ``OSError``, as a lost disk would.
    """

    def __init__(self, data, chunk, fail_from=None):
        self._data = data
        self.shape, self.dtype = data.shape, data.dtype
        self.chunks = (data.shape[0], chunk)
        self.fail_from = fail_from
        self.reads = []

    def __getitem__(self, key):
        rows, columns = key
        self.reads.append((columns.start, columns.stop))
        if self.fail_from is not None and columns.stop > self.fail_from:
            raise OSError(f"cannot read columns {columns.start}..{columns.stop - 1}")
        return self._data[rows, columns].copy()


def test_blocks_narrower_than_chunks_are_cut_from_bands_of_whole_chunks(rng):
    data = rng.standard_normal((20, 100))
    chunked = ChunkedArray(data, chunk=32)
    trajectories = Trajectories.from_input(chunked)
    block_bytes = 20 * 8 * 10  # 10 columns per block, 3.2 blocks per chunk
    assert trajectories.bands(block_bytes) == [
        (slice(0, 32), [slice(0, 8), slice(8, 16), slice(16, 24), slice(24, 32)]),
        (slice(32, 64), [slice(32, 40), slice(40, 48), slice(48, 56), slice(56, 64)]),
        (slice(64, 96), [slice(64, 72), slice(72, 80), slice(80, 88), slice(88, 96)]),
        (slice(96, 100), [slice(96, 100)]),
    ]
    gram = streamed_gram(trajectories, block_bytes=block_bytes)
    assert chunked.reads == [(0, 32), (32, 64), (64, 96), (96, 100)]  # each chunk read once
    np.testing.assert_allclose(gram, data @ data.T, rtol=1e-13)
    # a band of more than BAND_BLOCKS blocks is not held: the chunk is read in the fewest
    # equal blocks of at most BAND_BLOCKS blocks' bytes (here 320 columns: two of 200)
    wide_data = rng.standard_normal((20, 400))
    wide_chunked = ChunkedArray(wide_data, chunk=400)
    wide = Trajectories.from_input(wide_chunked)
    assert 400 // 10 > BAND_BLOCKS
    assert wide.bands(block_bytes) == [
        (slice(0, 200), [slice(0, 200)]),
        (slice(200, 400), [slice(200, 400)]),
    ]
    gram = streamed_gram(wide, block_bytes=block_bytes)
    assert sorted(wide_chunked.reads) == [(0, 200), (200, 400)]  # the chunk decoded twice
    np.testing.assert_allclose(gram, wide_data @ wide_data.T, rtol=1e-13)
    # the blocks stay inside their chunk: none reads from two chunks
    longer = rng.standard_normal((20, 1000))
    longer_chunked = ChunkedArray(longer, chunk=401)  # two shares of 201 columns at most
    longer_bands = Trajectories.from_input(longer_chunked).bands(block_bytes)
    assert [(band.start, band.stop) for band, _ in longer_bands] == [
        (0, 200),
        (200, 401),
        (401, 601),
        (601, 802),
        (802, 1000),
    ]
    gram = streamed_gram(Trajectories.from_input(longer_chunked), block_bytes=block_bytes)
    assert all(a // 401 == (b - 1) // 401 for a, b in longer_chunked.reads)
    np.testing.assert_allclose(gram, longer @ longer.T, rtol=1e-13)


@pytest.mark.parametrize("container", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reused_blocks_are_one_buffer_or_a_view_of_the_data(rng, container, dtype):
    data = rng.standard_normal((20, 100)).astype(dtype)
    trajectories = Trajectories.from_input(container(data))
    seen = []
    for columns, block in trajectories.blocks(block_bytes=20 * 8 * 30, reuse=True):
        np.testing.assert_array_equal(block, data[:, columns])
        assert block.dtype == np.float64
        seen.append(block)
    if dtype == np.float64:  # no copy at all
        assert all(np.shares_memory(block, data) for block in seen)
    else:  # one buffer, overwritten block after block
        assert all(np.shares_memory(block, seen[0]) for block in seen)
    fresh = [block for _, block in trajectories.blocks(block_bytes=20 * 8 * 30)]
    assert not any(np.shares_memory(a, b) for a, b in itertools.combinations(fresh, 2))
    assert not any(np.shares_memory(block, data) for block in fresh)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocks_of_torch_dtypes_numpy_lacks(rng, dtype):
    data = torch.from_numpy(rng.standard_normal((20, 100))).to(dtype)
    expected = data.double().numpy()
    trajectories = Trajectories.from_input(data)
    for reuse in (True, False):
        for columns, block in trajectories.blocks(block_bytes=20 * 8 * 30, reuse=reuse):
            np.testing.assert_array_equal(block, expected[:, columns])
    np.testing.assert_allclose(
        streamed_gram(trajectories, block_bytes=20 * 8 * 30), expected @ expected.T, rtol=1e-13
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reading_ahead_gives_the_same_gram_and_eigenvalues(rng, dtype):
    data = [t.astype(dtype) for t in random_trajectories(rng, features=300)]
    stored = [as_zarr(t, chunks=(8, 64)) for t in data]
    trajectories = Trajectories.from_input(stored)
    block_bytes = 27 * 8 * 20  # 20 columns per block, bands of 64
    assert len(trajectories.bands(block_bytes)) == 5
    ahead = streamed_gram(trajectories, block_bytes=block_bytes, prefetch=True)
    plain = streamed_gram(trajectories, block_bytes=block_bytes, prefetch=False)
    np.testing.assert_array_equal(ahead, plain)  # the same blocks, the same arithmetic
    np.testing.assert_allclose(ahead, stacked(data) @ stacked(data).T, rtol=1e-13, atol=1e-11)
    from koopkit_dmd.estimators import DMD

    from_store = DMD(rank=10, block_bytes=block_bytes).fit(stored)  # reads ahead by default
    in_memory = DMD(rank=10, block_bytes=block_bytes).fit(data)  # never reads ahead
    np.testing.assert_allclose(from_store.eigenvalues, in_memory.eigenvalues, atol=1e-12)
    np.testing.assert_allclose(from_store.residuals, in_memory.residuals, atol=1e-12)


def _run_with_timeout(fn, seconds=60):
    """``fn()`` in a thread: its exception or result, and a failure (not a hang) past ``seconds``."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    return outcome


def read_ahead_threads():
    return [t for t in threading.enumerate() if t.name.startswith("koopkit-read-ahead")]


@pytest.mark.parametrize("fail_from", [1, 50, 99])  # in the first band, a middle one, the last
def test_an_error_while_reading_ahead_is_raised_in_the_caller(rng, fail_from):
    data = rng.standard_normal((20, 100))
    chunked = ChunkedArray(data, chunk=16, fail_from=fail_from)
    trajectories = Trajectories.from_input(chunked)
    outcome = _run_with_timeout(
        lambda: streamed_gram(trajectories, block_bytes=20 * 8 * 8, prefetch=True)
    )
    assert isinstance(outcome.get("error"), OSError), outcome
    assert "cannot read columns" in str(outcome["error"])
    assert not read_ahead_threads()


def test_stopping_early_ends_the_read_ahead(rng):
    chunked = ChunkedArray(rng.standard_normal((20, 100)), chunk=16)
    blocks = Trajectories.from_input(chunked).blocks(block_bytes=20 * 8 * 8, prefetch=True)
    next(blocks)
    blocks.close()
    assert not read_ahead_threads()
    assert len(chunked.reads) <= 2  # the band in use and the one read ahead, no more


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_read_ahead_names_the_trajectory(rng, bad):
    data = random_trajectories(rng, features=300)
    data[1][4, 250] = bad
    trajectories = Trajectories.from_input([as_zarr(t, chunks=(8, 64)) for t in data])
    with pytest.raises(NonFiniteDataError, match=r"trajectory 1\. Got NaN or Inf in features"):
        streamed_gram(trajectories, block_bytes=27 * 8 * 20)
    assert not read_ahead_threads()


def test_finite_data_whose_gram_overflows_is_not_called_non_finite():
    data = np.full((4, 10), 1e200)
    gram = streamed_gram(Trajectories.from_input(data))
    assert np.isinf(gram).all()


def test_non_finite_data_on_a_torch_device_names_the_trajectory(rng):
    data = random_trajectories(rng)
    data[1][2, 5] = np.nan
    with pytest.raises(NonFiniteDataError, match=r"Expected finite values in trajectory 1\."):
        streamed_gram(Trajectories.from_input(data), device="cpu", block_bytes=27 * 8 * 5)
    data[1][2, 5] = 1e300  # finite: the Gram overflows, which is not the data's fault
    gram = streamed_gram(Trajectories.from_input(data), device="cpu", block_bytes=27 * 8 * 5)
    assert np.isinf(gram).any()
