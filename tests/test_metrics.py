"""Spectral metrics: known values, metric axioms, and registration through entry points."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from koopkit_spectral_metrics.matching import MatchedMean
from koopkit_spectral_metrics.wasserstein import LogWasserstein, Wasserstein

import koopkit.plugins
from koopkit.errors import EstimationError, NonFiniteDataError
from koopkit.results import Spectrum

W = Wasserstein()

eigenvalue = st.complex_numbers(
    max_magnitude=2.0, allow_nan=False, allow_infinity=False, allow_subnormal=False
)
spectra = st.lists(eigenvalue, min_size=1, max_size=7).map(Spectrum)


def S(*eigenvalues, amplitudes=None):
    return Spectrum(np.array(eigenvalues, dtype=complex), amplitudes=amplitudes)


def test_registered_through_entry_points():
    koopkit.plugins.refresh()
    for name in ("wasserstein", "wasserstein-log", "matched-mean"):
        entry = koopkit.plugins.lookup("metric", name)
        assert entry.plugin == "spectral_metrics"
        assert entry.info["description"]
    metric = koopkit.plugins.create("metric", "wasserstein", weights="amplitude")
    assert metric == Wasserstein(weights="amplitude")


def test_single_points_give_their_distance():
    assert W(S(0.5 + 0.5j), S(0.5 - 0.25j)) == pytest.approx(0.75)
    assert W(S(1.0), S(4.0j)) == pytest.approx(np.hypot(1.0, 4.0))


def test_two_point_sets_by_hand():
    # {0, 1} vs {0.1, 2}: matching 0-0.1, 1-2 costs (0.1 + 1) / 2; the crossing costs more.
    assert W(S(0, 1), S(0.1, 2)) == pytest.approx(0.55)
    # {0, 1j} vs {1j, 0} is the same set.
    assert W(S(0, 1j), S(1j, 0)) == 0.0


def test_unequal_sizes_split_mass():
    # One point at 0 against two at 1 and 3: all mass of 0 moves, half to each.
    assert W(S(0), S(1, 3)) == pytest.approx(2.0)
    # Masses 1/2 at 0 and 2 against 1/3 at 0, 1 and 2: the 1/6 surplus at 0 and the one
    # at 2 both move to 1, cost 2 * (1/6) * 1.
    assert W(S(0, 2), S(0, 1, 2)) == pytest.approx(1 / 3)


def test_amplitude_weights_change_the_answer():
    a = S(0, 1, amplitudes=[3, 1])  # masses 3/4 at 0, 1/4 at 1
    b = S(0, 1, amplitudes=[1j, 1])  # masses 1/2, 1/2 (magnitudes count)
    assert W(a, b) == 0.0
    assert Wasserstein(weights="amplitude")(a, b) == pytest.approx(0.25)


def test_amplitude_weights_depend_only_on_ratios_even_near_the_float_limit():
    # Each magnitude is finite but their sum overflows to inf: the masses came out all 0.
    a, b = S(0, 1, amplitudes=[1.5e308, 0.5e308]), S(0, 1, amplitudes=[1, 1])
    assert Wasserstein(weights="amplitude")(a, b) == pytest.approx(0.25)


def test_amplitude_weights_need_amplitudes():
    with pytest.raises(EstimationError, match="'b' without amplitudes"):
        Wasserstein(weights="amplitude")(S(0, amplitudes=[1]), S(1))


def test_invalid_inputs():
    with pytest.raises(EstimationError, match="'a' with 0 eigenvalues"):
        W(S(), S(1))
    with pytest.raises(NonFiniteDataError, match="'b'"):
        W(S(1), S(np.nan))
    with pytest.raises(EstimationError, match="Invalid weights 'mass'"):
        Wasserstein(weights="mass")


@settings(deadline=None)
@given(spectra, spectra, spectra)
def test_metric_axioms(a, b, c):
    ab, ba = W(a, b), W(b, a)
    assert ab >= 0
    assert ab == pytest.approx(ba, rel=1e-12, abs=1e-12)
    assert W(a, a) == pytest.approx(0.0, abs=1e-12)
    assert W(a, c) <= ab + W(b, c) + 1e-9


@settings(deadline=None)
@given(
    st.integers(1, 7).flatmap(
        lambda k: st.tuples(*[st.lists(eigenvalue, min_size=k, max_size=k)] * 2)
    )
)
def test_equals_matched_mean_for_equal_sizes(pair):
    a, b = Spectrum(pair[0]), Spectrum(pair[1])
    assert W(a, b) == pytest.approx(MatchedMean()(a, b), rel=1e-9, abs=1e-12)


def test_matched_mean_refuses_unequal_sizes():
    with pytest.raises(EstimationError, match="2 and 3 eigenvalues"):
        MatchedMean()(S(0, 1), S(0, 1, 2))


def test_log_distance_is_invariant_to_the_sampling_interval():
    rng = np.random.default_rng(0)
    lam = rng.uniform(0.8, 1.0, 6) * np.exp(1j * rng.uniform(-0.3, 0.3, 6))
    mu = rng.uniform(0.8, 1.0, 5) * np.exp(1j * rng.uniform(-0.3, 0.3, 5))
    per_step = LogWasserstein()(S(*lam), S(*mu))
    for k in (2, 5):
        every_k = LogWasserstein(dt=k)(S(*lam**k), S(*mu**k))
        assert every_k == pytest.approx(per_step, rel=1e-12)
    assert W(S(*lam**5), S(*mu**5)) != pytest.approx(W(S(*lam), S(*mu)))


def test_log_distance_by_hand():
    # log(e^{-0.1}) = -0.1 and log(e^{0.2j}) = 0.2j: distance |-0.1 - 0.2j| / dt.
    d = LogWasserstein(dt=0.5)(S(np.exp(-0.1)), S(np.exp(0.2j)))
    assert d == pytest.approx(np.hypot(0.1, 0.2) / 0.5)


def test_log_distance_between_equal_spectra_ignores_the_sign_of_zero():
    # conj() of a real negative eigenvalue flips its zero imaginary part to -0.0, which
    # np.log puts on the other side of the branch cut (argument -pi instead of +pi)
    a = np.array([-0.5 + 0j, 0.9 + 0j, -2.0 + 0j])
    b = np.conj(a)
    assert (a == b).all() and np.signbit(b.imag).any()
    assert LogWasserstein()(Spectrum(a), Spectrum(b)) == 0.0
    assert LogWasserstein(dt=3)(Spectrum(b), Spectrum(a)) == 0.0
    # distinct eigenvalues on either side of the cut are still 2 pi / dt apart
    near = LogWasserstein()(S(-0.5 + 1e-9j), S(-0.5 - 1e-9j))
    assert near == pytest.approx(2 * np.pi, rel=1e-6)


def test_log_distance_refuses_zero_eigenvalues_and_bad_dt():
    with pytest.raises(EstimationError, match="eigenvalue 0 at index 1 has no logarithm"):
        LogWasserstein()(S(1, 1), S(0.5, 0))
    with pytest.raises(EstimationError, match="Invalid dt -1"):
        LogWasserstein(dt=-1)


# Committed OMD and OGD eigenvalues of Redman et al. (research/redman.md, section 4a).
OMD = [0.55814, 0.56513, 0.79254, 0.80117, 0.92458, 0.93197, 0.97988, 0.98379, 0.99644, 0.99790]
OGD = [0.55551, 0.57102, 0.79991, 0.81756, 0.93482, 0.94882, 0.98665, 0.99368, 0.99856, 1.00048]


def test_reproduces_the_papers_omd_ogd_distance():
    assert W(S(*OMD), S(*OGD)) == pytest.approx(0.00807, abs=5e-6)
    assert MatchedMean()(S(*OMD), S(*OGD)) == pytest.approx(W(S(*OMD), S(*OGD)), rel=1e-12)
