"""Property-based tests: the store keeps every bit it was given, a killed writer leaves exactly
its committed prefix, DMD spectra are invariant where the theory says so, and the Wasserstein
distance between spectra behaves like a metric on the complex plane.

Schema validation on random JSON is property-tested in tests/test_schemas.py, the plain DMD
change of coordinates in tests/test_dmd.py and the unweighted metric axioms in
tests/test_metrics.py; this file covers the rest.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import linear_sum_assignment

import koopkit
from koopkit.record.schedule import make_schedule
from koopkit.results import Spectrum
from koopkit.store.validate import validate_store
from koopkit.store.writer import RunWriter, SeriesSpec

RUN = "prop/run"
SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def store_dir():
    """A fresh directory store path (tempfile, not tmp_path: one per hypothesis example)."""
    with tempfile.TemporaryDirectory(prefix="koopkit-prop-") as directory:
        yield Path(directory) / "s.zarr"


def bits(array):
    """The raw bytes of an array, so NaN payloads, -0.0 and subnormals compare exactly."""
    array = np.ascontiguousarray(array)
    return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "f" else array


def assert_bitwise_equal(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(bits(actual), bits(expected))


def partition(total, cuts):
    """Split range(total) at the given cut points: block sizes, all positive."""
    edges = sorted({0, total, *(c for c in cuts if 0 < c < total)})
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def params_spec(width, dtype, chunk_steps, compressor=None):
    table = [{"name": "w", "offset": 0, "shape": [width], "dtype": dtype}]
    return SeriesSpec(
        "params",
        (width,),
        dtype=dtype,
        attrs={"kind": "full", "tensors": table},
        chunk_steps=chunk_steps,
        row_dims=("param",),
        compressor=compressor,
    )


def scalar_spec(dtype, chunk_steps):
    return SeriesSpec(
        "scalars/loss", (), dtype=dtype, attrs={"kind": "scalar"}, chunk_steps=chunk_steps
    )


# --------------------------------------------------------------------------------------------
# (a) writer -> reader round trip


@st.composite
def recordings(draw):
    """Rows of random floats (NaN, Inf, -0.0 and subnormals included) at increasing steps."""
    dtype = draw(st.sampled_from(["float32", "float64"]))
    width = draw(st.integers(1, 9))
    count = draw(st.integers(0, 30))
    floats = st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=False) | st.sampled_from(
        [np.nan, np.inf, -np.inf, -0.0]
    )
    rows = draw(hnp.arrays(dtype, (count, width), elements=floats))
    losses = draw(hnp.arrays(dtype, (count,), elements=floats))
    every = draw(st.lists(st.integers(1, 5), min_size=count, max_size=count))
    steps = np.cumsum([0, *every])[:count] + draw(st.integers(0, 3))
    cuts = draw(st.lists(st.integers(1, max(1, count - 1)), max_size=6))
    return {
        "dtype": dtype,
        "rows": rows,
        "losses": losses,
        "steps": steps.astype(np.int64),
        "blocks": partition(count, cuts),
        "chunk_steps": draw(st.integers(1, 7)),
        "compressor": draw(st.sampled_from([None, "zstd", "blosc"])),
        "flush_after": draw(st.sets(st.integers(0, 6), max_size=3)),
    }


@SETTINGS
@given(recordings())
def test_writer_reader_round_trip_is_bit_for_bit(rec):
    rows, steps, losses = rec["rows"], rec["steps"], rec["losses"]
    width = rows.shape[1]
    with store_dir() as url:
        writer = RunWriter(url, RUN, {"tags": {"width": width}}, resume=False)
        writer.add_series(params_spec(width, rec["dtype"], rec["chunk_steps"], rec["compressor"]))
        writer.add_series(scalar_spec(rec["dtype"], rec["chunk_steps"]))
        start = 0
        for i, size in enumerate(rec["blocks"]):
            block = slice(start, start + size)
            writer.append("params", steps[block], rows[block])
            writer.append("scalars/loss", steps[block], losses[block])
            if i in rec["flush_after"]:
                writer.flush()
            start += size
        writer.close()

        store = koopkit.open_store(url)
        info = store.run(RUN)
        assert info.status == "complete"
        assert info.committed("params") == info.committed("scalars/loss") == len(rows)
        assert_bitwise_equal(store.trajectory(RUN, "params")[:], rows)
        assert_bitwise_equal(np.asarray(store.array(RUN, "scalars/loss")), losses)
        np.testing.assert_array_equal(store.steps(RUN), steps)
        np.testing.assert_array_equal(store.steps(RUN, "scalars/loss"), steps)
        if len(rows):
            assert_bitwise_equal(store.dataset(RUN)["value"].values, rows)
        flagged = sorted(set(steps[~np.isfinite(rows).all(axis=1)].tolist()))
        assert info.attrs["nonfinite"].get("params", []) == flagged
        assert validate_store(url) == ([], 1)


@SETTINGS
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5)),
    steps=st.integers(0, 12),
    every=st.integers(1, 3) | st.lists(st.integers(0, 12), min_size=1, max_size=6, unique=True),
    buffer_rows=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_recorder_stores_any_parameter_dtype_as_float32_exactly(
    dtype, shape, steps, every, buffer_rows, seed
):
    torch.manual_seed(seed)
    model = torch.nn.Linear(*shape).to(dtype)
    size = sum(p.numel() for p in model.parameters())
    expected = {}

    def flat():
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in model.parameters()])

    with store_dir() as url:
        # max_inflight_bytes sets the chunk depth: about buffer_rows rows per buffer
        budget = 2 * buffer_rows * size * 4
        with koopkit.Recorder(url, RUN, model, every=every, max_inflight_bytes=budget) as rec:
            expected[0] = flat().numpy().copy()
            for k in range(1, steps + 1):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape).to(dtype) * 0.1)
                rec.step()
                expected[k] = flat().numpy().copy()
        schedule = make_schedule(every)
        recorded = [0] + [k for k in range(1, steps + 1) if k in schedule]
        store = koopkit.open_store(url)
        assert store.steps(RUN).tolist() == recorded
        values = np.asarray(store.array(RUN))
        assert values.dtype == np.float32
        assert_bitwise_equal(values, np.stack([expected[k] for k in recorded]))
        assert validate_store(url) == ([], 1)


# --------------------------------------------------------------------------------------------
# (b) a writer that dies anywhere leaves exactly its committed prefix


def committed_after(blocks, chunk_steps, flush_after, killed_after):
    """Rows committed when a single-series writer dies after block ``killed_after``.

    The writer commits whenever a block reaches a chunk boundary (a multiple of chunk_steps,
    counted from the first row) or on flush(), and a commit writes every buffered row.
    """
    total = committed = 0
    for i, size in enumerate(blocks[: killed_after + 1]):
        before, total = total, total + size
        if total // chunk_steps > before // chunk_steps or i in flush_after:
            committed = total
    return committed


def die(writer):
    """What SIGKILL does to a writer: its buffers vanish and the kernel drops its lock."""
    writer.lock.release()


@SETTINGS
@given(
    count=st.integers(1, 40),
    width=st.integers(1, 6),
    chunk_steps=st.integers(1, 6),
    data=st.data(),
)
def test_a_killed_writer_leaves_exactly_the_committed_prefix(count, width, chunk_steps, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    rows = rng.standard_normal((count, width)).astype(np.float32)
    steps = np.arange(count, dtype=np.int64) * data.draw(st.integers(1, 3), label="every")
    blocks = partition(count, data.draw(st.lists(st.integers(1, count), max_size=8), label="cuts"))
    flush_after = data.draw(st.sets(st.integers(0, len(blocks) - 1), max_size=2), label="flush")
    killed_after = data.draw(st.integers(0, len(blocks) - 1), label="killed_after")
    expected = committed_after(blocks, chunk_steps, flush_after, killed_after)

    with store_dir() as url:
        writer = RunWriter(url, RUN, {"tags": {"k": 1}}, resume=False)
        writer.add_series(params_spec(width, "float32", chunk_steps))
        start = 0
        for i, size in enumerate(blocks[: killed_after + 1]):
            writer.append("params", steps[start : start + size], rows[start : start + size])
            if i in flush_after:
                writer.flush()
            start += size
        die(writer)
        del writer

        store = koopkit.open_store(url)
        info = store.run(RUN)
        assert info.status == "recording"
        assert info.committed("params") == expected
        assert_bitwise_equal(store.trajectory(RUN)[:], rows[:expected])
        np.testing.assert_array_equal(store.steps(RUN), steps[:expected])
        assert validate_store(url) == ([], 1)

        resumed = RunWriter(url, RUN, resume=True)
        series = resumed.add_series(params_spec(width, "float32", chunk_steps))
        assert series.written == expected
        if expected < count:  # appending no rows at all is a bug: see below
            resumed.append("params", steps[expected:], rows[expected:])
        resumed.close()
        store = koopkit.open_store(url)
        assert_bitwise_equal(store.trajectory(RUN)[:], rows)
        np.testing.assert_array_equal(store.steps(RUN), steps)
        assert store.root[f"runs/{RUN}/params/value"].shape == (count, width)
        assert validate_store(url) == ([], 1)


def test_appending_no_rows_is_a_no_op():
    with store_dir() as url:
        writer = RunWriter(url, RUN, resume=False)
        writer.add_series(params_spec(3, "float32", 2))
        writer.append("params", np.arange(2), np.ones((2, 3), np.float32))
        try:
            writer.append("params", np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
        finally:
            writer.close()
        assert koopkit.open_store(url).steps(RUN).tolist() == [0, 1]


# --------------------------------------------------------------------------------------------
# (c) DMD invariances


def assert_same_eigenvalues(actual, expected, atol):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual, expected)
    distance = np.abs(actual[:, None] - expected[None, :])
    rows, columns = linear_sum_assignment(distance)
    assert distance[rows, columns].max() <= atol, (actual, expected)


@st.composite
def linear_systems(draw):
    """Trajectories of x_{t+1} = A x_t with chosen eigenvalues, in well-conditioned coordinates.

    Moduli in [0.75, 1] keep every direction visible for the whole trajectory; eigenvalues are
    at least 0.05 apart, and the basis has condition number at most 9.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    real = draw(st.integers(0, 3))
    pairs = draw(st.integers(0 if real else 1, 2))
    eigenvalues = list(rng.uniform(0.75, 1.0, real))
    for _ in range(pairs):
        modulus, angle = rng.uniform(0.8, 1.0), rng.uniform(0.2, 2.8)
        eigenvalues += [modulus * np.exp(1j * angle), modulus * np.exp(-1j * angle)]
    eigenvalues = np.array(eigenvalues, dtype=complex)
    gaps = np.abs(eigenvalues[:, None] - eigenvalues[None, :]) + np.eye(len(eigenvalues))
    assume(gaps.min() > 0.05)
    n = len(eigenvalues)
    block = np.zeros((n, n))
    i = 0
    for value in eigenvalues:
        if value.imag == 0:
            block[i, i] = value.real
            i += 1
        elif value.imag > 0:
            c, s = value.real, value.imag
            block[i : i + 2, i : i + 2] = [[c, -s], [s, c]]
            i += 2
    q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    basis = q1 @ np.diag(rng.uniform(1 / 3, 3, n)) @ q2
    matrix = basis @ block @ np.linalg.inv(basis)
    count = draw(st.integers(1, 3))
    steps = draw(st.integers(2 * n + 4, 30))
    trajectories = []
    for _ in range(count):
        x = [rng.standard_normal(n)]
        for _ in range(steps - 1):
            x.append(matrix @ x[-1])
        trajectories.append(np.array(x))
    return trajectories, eigenvalues, rng


ESTIMATORS = [("dmd", {}), ("hankel-dmd", {"delays": 2})]


def spectrum(trajectories, estimator, params, rank):
    return koopkit.estimate(trajectories, estimator, rank=rank, **params).eigenvalues


def well_conditioned(rng, n):
    q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q1 @ np.diag(rng.uniform(0.5, 2, n)) @ q2


@pytest.mark.parametrize("estimator, params", ESTIMATORS, ids=[e for e, _ in ESTIMATORS])
@SETTINGS
@given(system=linear_systems(), extra=st.integers(0, 3))
def test_dmd_eigenvalues_survive_an_invertible_change_of_coordinates(
    estimator, params, system, extra
):
    trajectories, eigenvalues, rng = system
    n = len(eigenvalues)
    # an injective linear map into n + extra dimensions: conjugate data, same spectrum
    change = np.vstack([well_conditioned(rng, n), rng.standard_normal((extra, n))])
    original = spectrum(trajectories, estimator, params, n)
    assert_same_eigenvalues(original, eigenvalues, atol=1e-6)
    changed = spectrum([t @ change.T for t in trajectories], estimator, params, n)
    assert_same_eigenvalues(changed, original, atol=1e-6)


@pytest.mark.parametrize("estimator, params", ESTIMATORS, ids=[e for e, _ in ESTIMATORS])
@SETTINGS
@given(
    system=linear_systems(),
    scale=st.floats(0.01, 100) | st.floats(-100, -0.01),
    rank=st.sampled_from(["n", None]),
)
def test_dmd_eigenvalues_are_unchanged_by_scaling_the_data(estimator, params, system, scale, rank):
    trajectories, eigenvalues, _ = system
    rank = len(eigenvalues) if rank == "n" else None
    original = spectrum(trajectories, estimator, params, rank)
    scaled = spectrum([scale * t for t in trajectories], estimator, params, rank)
    assert_same_eigenvalues(scaled, original, atol=1e-6)


@pytest.mark.parametrize("estimator, params", ESTIMATORS, ids=[e for e, _ in ESTIMATORS])
@SETTINGS
@given(system=linear_systems(), data=st.data())
def test_dmd_eigenvalues_do_not_depend_on_the_order_of_trajectories(
    estimator, params, system, data
):
    trajectories, eigenvalues, _ = system
    order = data.draw(st.permutations(range(len(trajectories))), label="order")
    n = len(eigenvalues)
    original = spectrum(trajectories, estimator, params, n)
    permuted = spectrum([trajectories[i] for i in order], estimator, params, n)
    assert_same_eigenvalues(permuted, original, atol=1e-6)


# --------------------------------------------------------------------------------------------
# (d) the Wasserstein distance between spectra


point = st.complex_numbers(
    max_magnitude=2.0, allow_nan=False, allow_infinity=False, allow_subnormal=False
)


@st.composite
def weighted_spectra(draw, size=None):
    k = draw(st.integers(1, 6)) if size is None else size
    eigenvalues = draw(st.lists(point, min_size=k, max_size=k))
    amplitudes = draw(st.lists(st.floats(0.1, 5.0), min_size=k, max_size=k))
    return Spectrum(eigenvalues, amplitudes=amplitudes)


def W(a, b, **params):
    return koopkit.distance(a, b, "wasserstein", **params)


@settings(max_examples=60, deadline=None)
@given(weighted_spectra(), weighted_spectra(), weighted_spectra())
def test_amplitude_weighted_wasserstein_is_a_metric(a, b, c):
    ab = W(a, b, weights="amplitude")
    assert ab >= 0
    assert ab == pytest.approx(W(b, a, weights="amplitude"), rel=1e-9, abs=1e-12)
    assert W(a, a, weights="amplitude") == pytest.approx(0.0, abs=1e-9)
    ac, bc = W(a, c, weights="amplitude"), W(b, c, weights="amplitude")
    assert ac <= ab + bc + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    weighted_spectra(),
    weighted_spectra(),
    st.sampled_from(["uniform", "amplitude"]),
    st.data(),
)
def test_wasserstein_ignores_the_order_of_eigenvalues(a, b, weights, data):
    order = data.draw(st.permutations(range(a.rank)), label="order")
    shuffled = Spectrum(a.eigenvalues[order], amplitudes=a.amplitudes[order])
    assert W(shuffled, b, weights=weights) == pytest.approx(
        W(a, b, weights=weights), rel=1e-9, abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    weighted_spectra(),
    weighted_spectra(),
    point,
    point.filter(lambda z: 0.1 <= abs(z) <= 2),
    st.sampled_from(["uniform", "amplitude"]),
)
def test_wasserstein_follows_the_geometry_of_the_plane(a, b, shift, factor, weights):
    """Moving both spectra by z, or multiplying them by s, moves the distance as the plane does."""

    def mapped(s, f):
        return Spectrum(f(s.eigenvalues), amplitudes=s.amplitudes)

    d = W(a, b, weights=weights)
    assert W(mapped(a, lambda z: z + shift), mapped(b, lambda z: z + shift), weights=weights) == (
        pytest.approx(d, rel=1e-7, abs=1e-9)
    )
    assert W(mapped(a, lambda z: z * factor), mapped(b, lambda z: z * factor), weights=weights) == (
        pytest.approx(abs(factor) * d, rel=1e-7, abs=1e-9)
    )
    assert W(mapped(a, np.conj), mapped(b, np.conj), weights=weights) == pytest.approx(
        d, rel=1e-9, abs=1e-12
    )
