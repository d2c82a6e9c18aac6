"""Conformance checks for third-party estimators and metrics.

A plugin author runs every check on their factory, one pytest case per check::

    import pytest
    from koopkit.testing import estimator_checks

    @pytest.mark.parametrize("name, check", estimator_checks())
    def test_conformance(name, check):
        check(MyEstimator, rank=4)

or all of them at once with ``check_estimator(MyEstimator, rank=4)``. Metrics have
``metric_checks()`` and ``check_metric(factory, **params)``, significance tests
``significance_checks()`` and ``check_significance(factory, **params)``. A factory may also be
given by its registered name (``check_estimator("dmd", rank=4)``).

Every check builds its own small data, calls ``factory(**params)`` and raises
``AssertionError`` whose message starts with the check's name. The estimator checks use a
4-dimensional linear system ``x_{t+1} = A x_t`` with the chosen eigenvalues
:data:`EIGENVALUES`, so ``params`` must make the estimator keep 4 eigenvalues (``rank=4``)
and must not add any (no centering, which adds an eigenvalue 1); when they set ``rank``, the
``honours_rank`` check also fits with ``rank=2``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from .errors import KoopkitError
from .results import Spectrum, TestResult

__all__ = [
    "EIGENVALUES",
    "TOLERANCE",
    "estimator_checks",
    "metric_checks",
    "significance_checks",
    "check_estimator",
    "check_metric",
    "check_significance",
    "linear_trajectories",
    "random_spectra",
    "spectrum_groups",
    "matching_distance",
    "assert_eigenvalues_close",
]

EIGENVALUES = np.array([0.95 * np.exp(0.6j), 0.95 * np.exp(-0.6j), 0.85, -0.75])
"""Eigenvalues of the linear system the estimator checks record (closed under conjugation)."""

TOLERANCE = 1e-6
"""How close recovered or transformed eigenvalues must be, in absolute value."""

STEPS = 30
"""Snapshots of the single trajectory the estimator checks fit."""

SEVERAL_LENGTHS = (12, 9, 15)
"""Snapshots of each trajectory in the several-trajectories check."""

_ESTIMATOR_CHECKS: list[tuple[str, Callable]] = []
_METRIC_CHECKS: list[tuple[str, Callable]] = []
_TEST_CHECKS: list[tuple[str, Callable]] = []


# --------------------------------------------------------------------------- data


@functools.cache
def _system_matrix(eigenvalues: tuple[complex, ...], seed: int) -> np.ndarray:
    """A real matrix with these eigenvalues, in a random well-conditioned basis."""
    values = np.asarray(eigenvalues, dtype=complex)
    n = values.size
    block = np.zeros((n, n))
    i = 0
    used = np.zeros(n, dtype=bool)
    for k, z in enumerate(values):
        if used[k]:
            continue
        used[k] = True
        if abs(z.imag) < 1e-15:
            block[i, i] = z.real
            i += 1
            continue
        partner = [j for j in range(n) if not used[j] and abs(values[j] - np.conj(z)) < 1e-12]
        if not partner:
            raise ValueError(
                f"Invalid eigenvalues {values.tolist()!r}; expected a set closed under "
                f"conjugation (no partner for {z!r})."
            )
        used[partner[0]] = True
        r, theta = abs(z), np.angle(z)
        block[i : i + 2, i : i + 2] = r * np.array(
            [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
        )
        i += 2
    basis = _well_conditioned(n, np.random.default_rng(seed), condition=5.0)
    return basis @ block @ np.linalg.inv(basis)


def _well_conditioned(n: int, rng, condition: float) -> np.ndarray:
    """A random ``n x n`` matrix with singular values spread evenly in ``[1, condition]``."""
    q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q1 @ np.diag(np.linspace(1.0, condition, n)) @ q2


def linear_trajectories(
    lengths=(STEPS,), eigenvalues=EIGENVALUES, seed: int = 0
) -> list[np.ndarray]:
    """Trajectories ``(steps, features)`` of ``x_{t+1} = A x_t``, one per length.

    ``A`` is real with the given eigenvalues (closed under conjugation); each trajectory starts
    from its own random initial state. Fresh arrays on every call.
    """
    a = _system_matrix(tuple(complex(z) for z in eigenvalues), seed)
    rng = np.random.default_rng(seed + 1)
    out = []
    for length in lengths:
        x = np.empty((length, a.shape[0]))
        x[0] = rng.standard_normal(a.shape[0])
        for t in range(1, length):
            x[t] = a @ x[t - 1]
        out.append(x)
    return out


def random_spectra(count: int, size: int = 6, seed: int = 0) -> list[Spectrum]:
    """``count`` random spectra of ``size`` eigenvalues (closed under conjugation, nonzero),
    with positive amplitudes, as estimators of real systems produce them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pairs, reals = size // 3, size - 2 * (size // 3)
        z = rng.uniform(0.3, 1.1, pairs) * np.exp(1j * rng.uniform(0.1, 2.8, pairs))
        real = rng.uniform(0.3, 1.1, reals) * rng.choice([-1.0, 1.0], reals)
        values = np.concatenate([z, np.conj(z), real])
        out.append(Spectrum(values, amplitudes=rng.uniform(0.1, 2.0, size)))
    return out


def _hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a[:, None] - b[None, :])
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def assert_eigenvalues_close(actual, expected, atol: float = TOLERANCE, what: str = "") -> None:
    """Assert two eigenvalue sets are equal as sets, each point within ``atol`` of the other."""
    actual = np.asarray(getattr(actual, "eigenvalues", actual), dtype=complex).ravel()
    expected = np.asarray(getattr(expected, "eigenvalues", expected), dtype=complex).ravel()
    prefix = f"{what}: " if what else ""
    shown = f"got {np.round(actual, 8).tolist()}, expected {np.round(expected, 8).tolist()}"
    assert actual.size == expected.size, (
        f"{prefix}expected {expected.size} eigenvalues, got {actual.size} ({shown})"
    )
    if actual.size:
        distance = _hausdorff(actual, expected)
        assert distance <= atol, (
            f"{prefix}eigenvalues differ by {distance:.3g} > {atol:g} ({shown})"
        )


# ------------------------------------------------------------------ check machinery


def _label(factory) -> str:
    if isinstance(factory, str):
        return repr(factory)
    return getattr(factory, "__qualname__", None) or repr(factory)


def _resolve(kind: str, factory):
    if isinstance(factory, str):
        from .plugins import lookup

        return lookup(kind, factory).factory
    return factory


def _check(kind: str, name: str):
    """Register a check under ``name``; its failures become AssertionErrors naming it."""
    checks = {"estimator": _ESTIMATOR_CHECKS, "metric": _METRIC_CHECKS, "test": _TEST_CHECKS}[kind]

    def decorate(func):
        @functools.wraps(func)
        def check(factory, **params):
            label = _label(factory)
            try:
                func(_resolve(kind, factory), params)
            except AssertionError as exc:
                raise AssertionError(f"check {name!r} failed for {label}: {exc}") from exc
            except Exception as exc:
                raise AssertionError(
                    f"check {name!r} failed for {label}: {type(exc).__name__}: {exc}"
                ) from exc

        check.check_name = name
        checks.append((name, check))
        return check

    return decorate


def _make(factory, params):
    try:
        return factory(**params)
    except Exception as exc:
        raise AssertionError(f"factory(**{params!r}) raised {type(exc).__name__}: {exc}") from exc


def _fit(factory, params, trajectories) -> Spectrum:
    spectrum = _make(factory, params).fit(trajectories)
    assert isinstance(spectrum, Spectrum), (
        f"fit returned {type(spectrum).__name__}; expected a koopkit.Spectrum"
    )
    return spectrum


def _selected(checks, skip) -> list[tuple[str, Callable]]:
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = {name for name, _ in checks}
    unknown = sorted(set(skip) - names)
    if unknown:
        raise ValueError(f"Invalid check names {unknown}; known: {', '.join(sorted(names))}.")
    return [(name, check) for name, check in checks if name not in skip]  # parametrize needs a list


def _run_all(what: str, checks, factory, skip, params) -> None:
    failures = []
    for _, check in _selected(checks, skip):
        try:
            check(factory, **params)
        except AssertionError as exc:
            failures.append(exc)
    if failures:
        lines = "\n".join(f"  {exc}" for exc in failures)
        raise AssertionError(
            f"{len(failures)} {what} check(s) failed for {_label(factory)}:\n{lines}"
        ) from failures[0]


def estimator_checks(skip=()) -> list[tuple[str, Callable]]:
    """``(name, check)`` of every estimator check; ``check(factory, **params)``."""
    return _selected(_ESTIMATOR_CHECKS, skip)


def metric_checks(skip=()) -> list[tuple[str, Callable]]:
    """``(name, check)`` of every metric check; ``check(factory, **params)``."""
    return _selected(_METRIC_CHECKS, skip)


def significance_checks(skip=()) -> list[tuple[str, Callable]]:
    """``(name, check)`` of every significance-test check; ``check(factory, **params)``."""
    return _selected(_TEST_CHECKS, skip)


def check_estimator(factory, *, skip=(), **params) -> None:
    """Run every estimator check (but those named in ``skip``) on ``factory(**params)``.

    Raises one ``AssertionError`` listing every failing check.
    """
    _run_all("estimator", _ESTIMATOR_CHECKS, factory, skip, params)


def check_metric(factory, *, skip=(), **params) -> None:
    """Run every metric check (but those named in ``skip``) on ``factory(**params)``."""
    _run_all("metric", _METRIC_CHECKS, factory, skip, params)


def check_significance(factory, *, skip=(), **params) -> None:
    """Run every significance-test check (but those named in ``skip``) on ``factory(**params)``."""
    _run_all("significance", _TEST_CHECKS, factory, skip, params)


# ----------------------------------------------------------------- estimator checks


@_check("estimator", "returns_spectrum")
def check_returns_spectrum(factory, params):
    """``fit([x])`` returns a koopkit.Spectrum."""
    _fit(factory, params, linear_trajectories())


@_check("estimator", "eigenvalues_complex_finite")
def check_eigenvalues_complex_finite(factory, params):
    """The eigenvalues are a non-empty, finite, complex 1-D array."""
    values = _fit(factory, params, linear_trajectories()).eigenvalues
    assert isinstance(values, np.ndarray), f"eigenvalues is a {type(values).__name__}"
    assert values.ndim == 1, f"eigenvalues has shape {values.shape}; expected 1-D"
    assert np.iscomplexobj(values), f"eigenvalues has dtype {values.dtype}; expected complex"
    assert values.size > 0, "no eigenvalues"
    assert np.all(np.isfinite(values)), f"non-finite eigenvalues {values.tolist()}"


@_check("estimator", "single_array")
def check_single_array(factory, params):
    """A bare ``(steps, features)`` array is one trajectory, as ``[array]`` is."""
    (x,) = linear_trajectories()
    listed = _fit(factory, params, [x])
    bare = _fit(factory, params, x)
    assert_eigenvalues_close(bare, listed, 1e-12, "fit(x) differs from fit([x])")


@_check("estimator", "several_trajectories")
def check_several_trajectories(factory, params):
    """Trajectories of different lengths are fit jointly, with no pair across a boundary."""
    spectrum = _fit(factory, params, linear_trajectories(SEVERAL_LENGTHS))
    assert_eigenvalues_close(
        spectrum,
        EIGENVALUES,
        TOLERANCE,
        f"{len(SEVERAL_LENGTHS)} trajectories of one linear system (pairs across "
        "trajectory boundaries?)",
    )


@_check("estimator", "does_not_mutate_input")
def check_does_not_mutate_input(factory, params):
    """``fit`` reads its input only: read-only arrays work, writable ones are unchanged."""
    trajectories = linear_trajectories(SEVERAL_LENGTHS)
    copies = [x.copy() for x in trajectories]
    _fit(factory, params, trajectories)
    for i, (x, original) in enumerate(zip(trajectories, copies, strict=True)):
        assert np.array_equal(x, original), f"fit changed trajectory {i} of its input"
    for x in trajectories:
        x.setflags(write=False)
    try:
        _fit(factory, params, trajectories)
    except ValueError as exc:
        if "read-only" in str(exc):
            raise AssertionError(f"fit tried to write into its read-only input: {exc}") from exc
        raise


class _ArrayLike:
    """The least a stored series offers (like ``koopkit.store.reader.CommittedRows``): shape,
    dtype, ndim, len, slicing and ``__array__``; not an ndarray, not writable."""

    def __init__(self, data: np.ndarray):
        self._data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        out = np.array(self._data[key])
        out.setflags(write=False)
        return out

    def __array__(self, dtype=None, copy=None):
        return np.array(self._data, dtype=dtype)


@_check("estimator", "array_like_input")
def check_array_like_input(factory, params):
    """Array-likes that are not ndarrays (zarr, dask, stored series) give the same spectrum."""
    trajectories = linear_trajectories(SEVERAL_LENGTHS)
    expected = _fit(factory, params, trajectories)
    got = _fit(factory, params, [_ArrayLike(x) for x in trajectories])
    assert_eigenvalues_close(got, expected, 1e-10, "array-like input")


@_check("estimator", "float32_input")
def check_float32_input(factory, params):
    """float32 data (the store's default) gives the float64 eigenvalues to float32 accuracy."""
    trajectories = [x.astype(np.float32) for x in linear_trajectories(SEVERAL_LENGTHS)]
    assert_eigenvalues_close(
        _fit(factory, params, trajectories), EIGENVALUES, 1e-3, "float32 trajectories"
    )


@_check("estimator", "conjugacy")
def check_conjugacy(factory, params):
    """An invertible linear change of coordinates ``x -> M x`` leaves the eigenvalues alone."""
    trajectories = linear_trajectories()
    m = _well_conditioned(trajectories[0].shape[1], np.random.default_rng(7), condition=30.0)
    moved = [x @ m.T for x in trajectories]
    assert_eigenvalues_close(
        _fit(factory, params, moved),
        _fit(factory, params, trajectories),
        TOLERANCE,
        "after x -> M x (cond(M) = 30)",
    )


@_check("estimator", "recovers_eigenvalues")
def check_recovers_eigenvalues(factory, params):
    """One trajectory of ``x_{t+1} = A x_t`` gives the eigenvalues of ``A``."""
    assert_eigenvalues_close(
        _fit(factory, params, linear_trajectories()),
        EIGENVALUES,
        TOLERANCE,
        "linear system with known eigenvalues",
    )


@_check("estimator", "honours_rank")
def check_honours_rank(factory, params):
    """With ``rank`` in ``params``, ``rank=2`` keeps 2 eigenvalues (``koopkit spectrum --rank``
    passes ``rank`` to every estimator); estimators without a ``rank`` are not checked."""
    if params.get("rank") is None:
        return
    spectrum = _fit(factory, {**params, "rank": 2}, linear_trajectories())
    assert spectrum.rank == 2, f"rank=2 kept {spectrum.rank} eigenvalues; expected 2"


@_check("estimator", "deterministic")
def check_deterministic(factory, params):
    """Fitting again (same instance or a new one, after other data) gives the same spectrum."""
    (x,) = linear_trajectories()
    estimator = _make(factory, params)
    first = estimator.fit([x])
    estimator.fit(linear_trajectories(SEVERAL_LENGTHS, seed=3))
    again = estimator.fit([x])
    fresh = _fit(factory, params, [x])
    for other, what in ((again, "the same instance"), (fresh, "a new instance")):
        assert other.eigenvalues.shape == first.eigenvalues.shape and np.allclose(
            other.eigenvalues, first.eigenvalues, rtol=0, atol=1e-12
        ), (
            f"refitting with {what} changed the eigenvalues from "
            f"{first.eigenvalues.tolist()} to {other.eigenvalues.tolist()}"
        )


@_check("estimator", "rejects_non_finite")
def check_rejects_non_finite(factory, params):
    """NaN or Inf in the data raises a ValueError (koopkit's EstimationError is one)."""
    for bad in (np.nan, np.inf):
        trajectories = linear_trajectories(SEVERAL_LENGTHS)
        trajectories[1][4, 2] = bad
        estimator = _make(factory, params)
        try:
            spectrum = estimator.fit(trajectories)
        except (ValueError, KoopkitError):
            continue
        values = getattr(spectrum, "eigenvalues", None)
        raise AssertionError(
            f"fit accepted a trajectory holding {bad} and returned eigenvalues {values!r}; "
            "expected a ValueError (koopkit.errors.NonFiniteDataError)"
        )


# -------------------------------------------------------------------- metric checks


def _distance(metric, a, b) -> float:
    d = metric(a, b)
    assert isinstance(d, float | np.floating) and not isinstance(d, bool), (
        f"metric returned {type(d).__name__} {d!r}; expected a float"
    )
    assert np.isfinite(d), f"metric returned {d!r}; expected a finite float"
    return float(d)


@_check("metric", "returns_float")
def check_returns_float(factory, params):
    """``metric(a, b)`` is a finite float."""
    a, b = random_spectra(2)
    _distance(_make(factory, params), a, b)


@_check("metric", "identity")
def check_identity(factory, params):
    """``d(a, a) == 0``, also when ``a`` lists its eigenvalues in another order."""
    metric = _make(factory, params)
    for a in random_spectra(3, seed=1):
        assert abs(_distance(metric, a, a)) <= 1e-12, "d(a, a) is not 0"
        order = np.random.default_rng(2).permutation(a.rank)
        shuffled = Spectrum(a.eigenvalues[order], amplitudes=a.amplitudes[order])
        d = _distance(metric, a, shuffled)
        assert abs(d) <= 1e-12, f"d(a, a reordered) = {d!r}; expected 0 (spectra are sets)"


@_check("metric", "symmetric")
def check_symmetric(factory, params):
    """``d(a, b) == d(b, a)``."""
    metric = _make(factory, params)
    spectra = random_spectra(6, seed=3)
    for a, b in zip(spectra[::2], spectra[1::2], strict=True):
        ab, ba = _distance(metric, a, b), _distance(metric, b, a)
        assert abs(ab - ba) <= 1e-12 * max(1.0, abs(ab)), f"d(a, b) = {ab!r} but d(b, a) = {ba!r}"


@_check("metric", "nonnegative")
def check_nonnegative(factory, params):
    """``d(a, b) >= 0``, also between nearly equal spectra."""
    metric = _make(factory, params)
    spectra = random_spectra(6, seed=4)
    nudged = [Spectrum(s.eigenvalues * (1 + 1e-9), amplitudes=s.amplitudes) for s in spectra]
    for a, b in [
        *zip(spectra[::2], spectra[1::2], strict=True),
        *zip(spectra, nudged, strict=True),
    ]:
        d = _distance(metric, a, b)
        assert d >= 0, f"d(a, b) = {d!r}; expected >= 0"


@_check("metric", "separates")
def check_separates(factory, params):
    """``d(a, b) > 0`` for different spectra."""
    metric = _make(factory, params)
    spectra = random_spectra(6, seed=6)
    for a, b in zip(spectra[::2], spectra[1::2], strict=True):
        d = _distance(metric, a, b)
        assert d > 0, f"d(a, b) = {d!r} for different spectra; expected > 0"


def _segment(spectrum: Spectrum, seed: int) -> tuple[Spectrum, Spectrum]:
    """Spectra halfway and all the way along a small move of every eigenvalue (conjugate pairs
    moved alike), where a power of a metric breaks the triangle inequality."""
    rng = np.random.default_rng(seed)
    pairs = spectrum.rank // 3  # the layout of random_spectra: z, conj(z), reals
    dz = 0.05 * (rng.standard_normal(pairs) + 1j * rng.standard_normal(pairs))
    delta = np.concatenate([dz, np.conj(dz), 0.05 * rng.standard_normal(spectrum.rank - 2 * pairs)])
    return tuple(
        Spectrum(spectrum.eigenvalues + t * delta, amplitudes=spectrum.amplitudes) for t in (0.5, 1)
    )


@_check("metric", "triangle_inequality")
def check_triangle_inequality(factory, params):
    """``d(a, c) <= d(a, b) + d(b, c)``, on random triples and on ``b`` between ``a`` and ``c``."""
    metric = _make(factory, params)
    spectra = random_spectra(12, seed=5)
    triples = list(zip(spectra[::3], spectra[1::3], spectra[2::3], strict=True))
    triples += [(a, *_segment(a, seed)) for seed, a in enumerate(random_spectra(4, seed=8))]
    for a, b, c in triples:
        ac, ab, bc = (_distance(metric, *pair) for pair in ((a, c), (a, b), (b, c)))
        assert ac <= ab + bc + 1e-12 * max(1.0, ac), (
            f"d(a, c) = {ac!r} > d(a, b) + d(b, c) = {ab!r} + {bc!r}"
        )


# ---------------------------------------------------------- significance-test checks

REPLICATES = 6
"""Spectra per condition in the significance checks."""

ALPHA = 0.05
"""The level at which far-apart conditions must be told apart."""


def matching_distance(a: Spectrum, b: Spectrum) -> float:
    """Mean distance of the optimal one-to-one matching of two equal-size eigenvalue sets
    (the 1-Wasserstein distance of uniform weights): the metric the test checks pass."""
    from scipy.optimize import linear_sum_assignment

    cost = np.abs(a.eigenvalues[:, None] - b.eigenvalues[None, :])
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def spectrum_groups(shift: float, seed: int = 0) -> dict[str, list[Spectrum]]:
    """Two conditions ``"a"`` and ``"b"`` of :data:`REPLICATES` spectra each, scattered about
    one random spectrum; every eigenvalue of ``"b"`` is moved by ``shift``."""
    (base,) = random_spectra(1, seed=seed)
    rng = np.random.default_rng(seed + 1)
    real, imag = 0.01 * rng.standard_normal((2, 2, REPLICATES, base.rank))
    noise = real + 1j * imag
    return {
        label: [Spectrum(base.eigenvalues + move + z, amplitudes=base.amplitudes) for z in draws]
        for label, move, draws in (("a", 0.0, noise[0]), ("b", shift, noise[1]))
    }


def _run_test(test, groups, metric=matching_distance) -> TestResult:
    result = test.run(groups, metric)
    assert isinstance(result, TestResult), (
        f"run returned {type(result).__name__}; expected a koopkit.TestResult"
    )
    return result


@_check("test", "returns_test_result")
def check_returns_test_result(factory, params):
    """``run(groups, metric)`` returns a TestResult: float statistic and p-value, 1-D null."""
    result = _run_test(_make(factory, params), spectrum_groups(0.3))
    for name in ("statistic", "p_value"):
        value = getattr(result, name)
        assert isinstance(value, float | np.floating) and not isinstance(value, bool), (
            f"{name} is {type(value).__name__} {value!r}; expected a float"
        )
    assert np.isfinite(result.statistic), f"statistic is {result.statistic!r}; expected finite"
    null = result.null
    assert isinstance(null, np.ndarray) and null.ndim == 1, (
        f"null is {type(null).__name__} of shape {getattr(null, 'shape', None)}; expected 1-D"
    )


@_check("test", "p_value_in_unit_interval")
def check_p_value_in_unit_interval(factory, params):
    """The p-value lies in [0, 1]: for far-apart, close and identical conditions."""
    test = _make(factory, params)
    for shift, what in ((0.3, "far-apart"), (0.0, "close"), (None, "identical")):
        if shift is None:
            (spectrum,) = random_spectra(1)
            groups = {"a": [spectrum] * REPLICATES, "b": [spectrum] * REPLICATES}
        else:
            groups = spectrum_groups(shift)
        p = float(_run_test(test, groups).p_value)
        assert 0.0 <= p <= 1.0, f"p-value {p!r} for {what} conditions; expected within [0, 1]"


@_check("test", "separates")
def check_test_separates(factory, params):
    """Conditions far apart (6 + 6 spectra) get a p-value below 0.05."""
    p = float(_run_test(_make(factory, params), spectrum_groups(0.3)).p_value)
    assert p < ALPHA, f"p-value {p!r} for far-apart conditions; expected < {ALPHA}"


@_check("test", "deterministic")
def check_test_deterministic(factory, params):
    """The same parameters (seed included) give the same result, run again or anew."""
    groups = spectrum_groups(0.0)
    test = _make(factory, params)
    first = _run_test(test, groups)
    _run_test(test, spectrum_groups(0.1, seed=3))
    again, fresh = _run_test(test, groups), _run_test(_make(factory, params), groups)
    for other, what in ((again, "the same instance"), (fresh, "a new instance")):
        changed = [
            name
            for name in ("statistic", "p_value", "null")
            if not np.array_equal(getattr(other, name), getattr(first, name))
        ]
        assert not changed, (
            f"running again with {what} changed its {', '.join(changed)} (statistic "
            f"{first.statistic!r} -> {other.statistic!r}, p-value {first.p_value!r} -> "
            f"{other.p_value!r})"
        )


@_check("test", "distances_agree")
def check_distances_agree(factory, params):
    """``run_on_distances`` (which the pipeline prefers) gives what ``run`` gives."""
    test = _make(factory, params)
    if not hasattr(test, "run_on_distances"):
        return
    groups = spectrum_groups(0.05)
    spectra = [s for members in groups.values() for s in members]
    labels = [label for label, members in groups.items() for _ in members]
    d = np.array([[matching_distance(a, b) for b in spectra] for a in spectra])
    d = (d + d.T) / 2  # exactly symmetric
    by_distances = test.run_on_distances(d, labels)
    by_spectra = _run_test(test, groups)
    for name in ("statistic", "p_value"):
        x, y = getattr(by_distances, name), getattr(by_spectra, name)
        assert np.isclose(x, y, rtol=1e-9, atol=1e-12), (
            f"run_on_distances gives {name} {x!r}, run gives {y!r}"
        )
