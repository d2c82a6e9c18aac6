"""Significance tests on groups of spectra, and Holm's correction."""

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from koopkit_significance.bootstrap import BootstrapTest
from koopkit_significance.eigen_swap import EigenSwapControl
from koopkit_significance.permutation import PermutationTest
from koopkit_spectral_metrics.matching import MatchedMean
from koopkit_spectral_metrics.wasserstein import Wasserstein
from scipy.stats import binom

import koopkit.plugins
from koopkit.errors import EstimationError, InsufficientDataError
from koopkit.multiple_testing import holm, holm_matrix
from koopkit.results import Spectrum

W = Wasserstein()


def random_spectrum(rng, center=0.9, k=6, spread=0.05):
    return Spectrum(center + spread * (rng.normal(size=k) + 1j * rng.normal(size=k)))


def line_distances(positions):
    x = np.asarray(positions, dtype=float)
    return np.abs(x[:, None] - x[None, :])


class CountingMetric:
    def __init__(self, metric):
        self.metric, self.calls = metric, 0

    def __call__(self, a, b):
        self.calls += 1
        return self.metric(a, b)


def test_registered_through_entry_points():
    koopkit.plugins.refresh()
    for name, cls in [
        ("permutation", PermutationTest),
        ("eigen-swap", EigenSwapControl),
        ("bootstrap", BootstrapTest),
    ]:
        entry = koopkit.plugins.lookup("test", name)
        assert entry.plugin == "significance"
        assert isinstance(koopkit.plugins.create("test", name, seed=1), cls)


# --- permutation --------------------------------------------------------------------------


def test_permutation_detects_different_conditions():
    rng = np.random.default_rng(0)
    groups = {
        "narrow": [random_spectrum(rng, 0.5) for _ in range(5)],
        "wide": [random_spectrum(rng, 0.9) for _ in range(5)],
    }
    result = PermutationTest().run(groups, W)
    # C(10, 5) = 252 <= n_perm: enumerated; the observed labelling and its swap are the
    # only two arrangements that reach the observed statistic.
    assert result.exact and result.n_perm == 252
    assert result.p_value == pytest.approx(2 / 252)
    assert result.p_value < 0.01


def test_permutation_exact_p_values_by_hand():
    # Equal sizes: the statistic is symmetric in the labels, so the perfectly separated
    # labelling and its swap both reach the maximum among C(6, 3) = 20 arrangements.
    d = line_distances([0, 0.1, 0.2, 10, 10.1, 10.2])
    result = PermutationTest().run_on_distances(d, list("aaabbb"))
    assert result.exact and result.n_perm == 20
    assert result.p_value == 2 / 20
    # Unequal sizes 3 + 4: the swapped labelling has other sizes, so the maximum is unique.
    d = line_distances([0, 0.1, 0.2, 10, 10.1, 10.2, 10.3])
    result = PermutationTest().run_on_distances(d, list("aaabbbb"))
    assert result.n_perm == math.comb(7, 3)
    assert result.p_value == 1 / 35


@pytest.mark.parametrize("positions", [np.arange(10.0), [0, 0, 0, 1, 1, 1, 1, 2, 2, 5]])
def test_exact_permutation_p_value_has_its_size_under_every_labelling(positions):
    # Exchangeable spectra make each of the C(10, 3) labellings equally likely, so the
    # share of labellings with p <= alpha is the test's size: at most alpha, ties included.
    d = line_distances(positions)
    p = []
    for chosen in itertools.combinations(range(10), 3):
        labels = ["a" if i in chosen else "b" for i in range(10)]
        p.append(PermutationTest().run_on_distances(d, labels).p_value)
    for alpha in (0.01, 0.05, 0.1, 0.5):
        assert np.mean(np.array(p) <= alpha) <= alpha


def test_permutation_statistic_by_hand():
    # a = {0, 1}, b = {3, 7}: between mean (3 + 7 + 2 + 6) / 4 = 4.5, within (1 + 4) / 2.
    result = PermutationTest().run_on_distances(line_distances([0, 1, 3, 7]), list("aabb"))
    assert result.statistic == pytest.approx(4.5 - 2.5)


def test_permutation_controls_false_positives():
    n_seeds, n_perm, alpha = 200, 199, 0.05
    p_values = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        groups = {c: [random_spectrum(rng) for _ in range(6)] for c in ("a", "b")}
        p_values.append(PermutationTest(n_perm=n_perm, seed=seed).run(groups, W).p_value)
    p_values = np.array(p_values)
    assert p_values.min() >= 1 / (n_perm + 1)
    rejections = np.count_nonzero(p_values <= alpha)
    low, high = binom.ppf(0.0005, n_seeds, alpha), binom.isf(0.0005, n_seeds, alpha)
    assert low <= rejections <= high


@settings(deadline=None, max_examples=50)
@given(
    arrays(np.float64, (9, 9), elements=st.floats(0, 10)),
    st.integers(1, 200),
    st.integers(0, 2**32),
)
def test_permutation_p_value_is_never_below_its_resolution(raw, n_perm, seed):
    d = raw + raw.T
    result = PermutationTest(n_perm=n_perm, seed=seed).run_on_distances(d, list("aaaabbbbb"))
    assert 1 / (n_perm + 1) <= result.p_value <= 1
    assert result.null.size == result.n_perm


def test_permutation_computes_each_distance_once():
    rng = np.random.default_rng(1)
    groups = {c: [random_spectrum(rng) for _ in range(4)] for c in ("a", "b", "c")}
    spectra = groups["a"] + groups["b"]
    metric = CountingMetric(W)
    result = PermutationTest().run({"a": groups["a"], "b": groups["b"]}, metric)
    n = len(spectra)
    assert metric.calls == n * (n - 1) // 2
    # The same test from a precomputed matrix over all conditions, by index only.
    everything = groups["a"] + groups["b"] + groups["c"]
    labels = np.repeat(["a", "b", "c"], 4)
    d = np.array([[W(x, y) for y in everything] for x in everything])
    idx = np.flatnonzero(labels != "c")
    again = PermutationTest().run_on_distances(d[np.ix_(idx, idx)], labels[idx])
    assert again.p_value == result.p_value
    assert again.statistic == pytest.approx(result.statistic, rel=1e-12)


def test_permutation_of_ten_plus_ten_is_fast():
    rng = np.random.default_rng(2)
    raw = rng.random((20, 20))
    labels = ["a"] * 10 + ["b"] * 10
    start = time.perf_counter()
    result = PermutationTest(n_perm=10_000).run_on_distances(raw + raw.T, labels)
    elapsed = time.perf_counter() - start
    print(f"10 000 permutations of 10 + 10: {elapsed * 1e3:.1f} ms")
    assert not result.exact and result.null.size == 10_000
    assert elapsed < 5.0  # a sanity bound only; it takes milliseconds


def test_permutation_is_seeded():
    rng = np.random.default_rng(3)
    raw = rng.random((16, 16))
    labels = ["a"] * 8 + ["b"] * 8  # C(16, 8) = 12870 > 999: sampled
    first = PermutationTest(n_perm=999, seed=5).run_on_distances(raw + raw.T, labels)
    second = PermutationTest(n_perm=999, seed=5).run_on_distances(raw + raw.T, labels)
    assert not first.exact
    np.testing.assert_array_equal(first.null, second.null)


def test_permutation_needs_two_spectra_per_condition():
    rng = np.random.default_rng(4)
    metric = CountingMetric(W)
    groups = {"a": [random_spectrum(rng)], "b": [random_spectrum(rng) for _ in range(3)]}
    with pytest.raises(InsufficientDataError, match="condition 'a' with 1 spectrum"):
        PermutationTest().run(groups, metric)
    assert metric.calls == 0


def test_tests_refuse_more_than_two_conditions():
    rng = np.random.default_rng(5)
    groups = {c: [random_spectrum(rng) for _ in range(2)] for c in "abc"}
    for test in (PermutationTest(), BootstrapTest(), EigenSwapControl()):
        with pytest.raises(EstimationError, match="compare conditions pairwise"):
            test.run(groups, W)


def test_permutation_rejects_bad_distances():
    with pytest.raises(EstimationError, match="not symmetric"):
        PermutationTest().run_on_distances(np.triu(np.ones((4, 4))), list("aabb"))
    with pytest.raises(EstimationError, match=r"expected \(4, 4\)"):
        PermutationTest().run_on_distances(np.zeros((3, 3)), list("aabb"))


# --- eigen-swap ---------------------------------------------------------------------------


def test_eigen_swap_never_beats_the_true_matching():
    rng = np.random.default_rng(6)
    for _ in range(5):
        groups = {"a": [random_spectrum(rng, k=10)], "b": [random_spectrum(rng, k=10)]}
        result = EigenSwapControl().run(groups, W)
        assert result.null.size == 100
        assert np.all(result.null <= result.statistic * (1 + 1e-12))
        assert result.statistic == pytest.approx(W(groups["a"][0], groups["b"][0]))


def test_eigen_swap_identical_spectra_give_one():
    spectrum = random_spectrum(np.random.default_rng(7), k=10)
    assert EigenSwapControl().run({"a": [spectrum], "b": [spectrum]}, W).p_value == 1.0


def test_eigen_swap_separated_spectra_give_a_small_value():
    rng = np.random.default_rng(8)
    groups = {"a": [random_spectrum(rng, 0.3, k=10)], "b": [random_spectrum(rng, 0.9, k=10)]}
    # Only "swap none" and "swap all" keep the cost: probability 2 / 2**10 per shuffle.
    assert EigenSwapControl().run(groups, MatchedMean()).p_value <= 0.02


def test_eigen_swap_is_seeded_and_pools_replicates():
    rng = np.random.default_rng(9)
    groups = {c: [random_spectrum(rng, k=8, spread=0.1) for _ in range(3)] for c in "ab"}
    first = EigenSwapControl(n_shuffles=50, seed=3).run(groups, W)
    second = EigenSwapControl(n_shuffles=50, seed=3).run(groups, W)
    np.testing.assert_array_equal(first.null, second.null)
    assert first.p_value == second.p_value and first.n_perm == 150
    pairs = [W(a, b) for a, b in zip(groups["a"], groups["b"], strict=True)]
    assert first.statistic == pytest.approx(np.mean(pairs))


def test_eigen_swap_reproduces_the_papers_omd_ogd_value():
    # Committed eigenvalues (research/redman.md, section 4a); p = 0.136 there with 1000
    # unseeded shuffles, 0.08-0.14 with 100.
    omd = [0.55814, 0.56513, 0.79254, 0.80117, 0.92458, 0.93197, 0.97988, 0.98379, 0.99644, 0.9979]
    ogd = [0.55551, 0.57102, 0.79991, 0.81756, 0.93482, 0.94882, 0.98665, 0.99368, 0.99856, 1.00048]
    groups = {"omd": [Spectrum(omd)], "ogd": [Spectrum(ogd)]}
    result = EigenSwapControl(n_shuffles=1000).run(groups, W)
    assert result.statistic == pytest.approx(0.00807, abs=5e-6)
    assert 0.08 <= result.p_value <= 0.17


def test_eigen_swap_needs_paired_spectra():
    rng = np.random.default_rng(10)
    groups = {"a": [random_spectrum(rng)], "b": [random_spectrum(rng) for _ in range(2)]}
    with pytest.raises(InsufficientDataError, match="1 and 2 spectra"):
        EigenSwapControl().run(groups, W)
    groups = {"a": [random_spectrum(rng, k=4)], "b": [random_spectrum(rng, k=5)]}
    with pytest.raises(EstimationError, match="4 and 5 eigenvalues"):
        EigenSwapControl().run(groups, W)


# --- bootstrap ----------------------------------------------------------------------------


def test_bootstrap_interval_covers_a_clear_difference():
    rng = np.random.default_rng(11)
    groups = {
        "a": [random_spectrum(rng, 0.5) for _ in range(6)],
        "b": [random_spectrum(rng, 0.9) for _ in range(6)],
    }
    result = BootstrapTest().run(groups, W)
    low, high = result.interval
    assert low <= result.statistic <= high
    assert 0.3 < low and high < 0.5  # the centres are 0.4 apart
    # every resample puts the conditions apart: (0 + 1) / (2000 + 1), never exactly 0
    assert result.p_value == 1 / 2001
    assert result.null.size == result.n_perm == 2000


def test_bootstrap_is_seeded_and_level_widens_the_interval():
    rng = np.random.default_rng(12)
    raw = rng.random((8, 8))
    labels = list("aaaabbbb")
    first = BootstrapTest(seed=4).run_on_distances(raw + raw.T, labels)
    second = BootstrapTest(seed=4).run_on_distances(raw + raw.T, labels)
    assert first.interval == second.interval and first.p_value == second.p_value
    wide = BootstrapTest(seed=4, level=0.99).run_on_distances(raw + raw.T, labels).interval
    assert wide[0] <= first.interval[0] and first.interval[1] <= wide[1]


def test_bootstrap_score_counts_the_draws_without_separation():
    d = line_distances([0.0, 0.1, 1.0, 1.1])
    labels = list("aabb")
    result = BootstrapTest(n_boot=500, seed=1).run_on_distances(d, labels)
    # no draw puts the conditions as close as pairs within one: (0 + 1) / (m + 1), where m
    # counts the draws with a within pair (those resampling one run twice in both have none)
    draws = 1 / result.p_value - 1
    assert draws == pytest.approx(round(draws)) and 300 <= round(draws) <= 500
    mixed = BootstrapTest(n_boot=500, seed=1).run_on_distances(
        line_distances([0, 1, 0.5, 1.5]), labels
    )
    assert mixed.p_value == 1.0  # interleaved: every draw has between <= within


@pytest.mark.parametrize("scale", [1 / 3, 1e-5, 1e5, 1e-200, 1e200])
def test_bootstrap_score_does_not_depend_on_the_unit_of_the_distances(scale):
    # interleaved: between equals within in many draws, up to rounding that depends on
    # the unit; those draws must still count as "no separation"
    d = line_distances([0, 1, 0.5, 1.5]) * scale
    assert BootstrapTest(n_boot=500, seed=1).run_on_distances(d, list("aabb")).p_value == 1.0


def test_only_the_permutation_test_is_calibrated():
    assert PermutationTest.calibrated is True
    assert BootstrapTest.calibrated is False and EigenSwapControl.calibrated is False
    for test in (PermutationTest, BootstrapTest, EigenSwapControl):
        assert isinstance(test.null_label, str) and test.null_label


@pytest.mark.parametrize("test", [PermutationTest, BootstrapTest, EigenSwapControl])
def test_tests_refuse_a_negative_seed_when_created(test):
    with pytest.raises(EstimationError, match=r"^Invalid seed -1; expected a non-negative integer"):
        test(seed=-1)
    with pytest.raises(EstimationError, match="Invalid seed True"):
        test(seed=True)


@pytest.mark.parametrize("scale", [1e-6, 1e-10, 1e-13, 1e-200, 1e6, 1e200])
def test_permutation_p_value_does_not_depend_on_the_unit_of_the_distances(scale):
    # 5 + 5 well separated spectra: the exact p is 2/252 whatever unit the distances are in
    rng = np.random.default_rng(13)
    d = line_distances(np.r_[rng.random(5), 10 + rng.random(5)])
    labels = list("aaaaabbbbb")
    reference = PermutationTest().run_on_distances(d, labels)
    assert reference.p_value == pytest.approx(2 / 252)
    scaled = PermutationTest().run_on_distances(d * scale, labels)
    assert scaled.p_value == reference.p_value
    sampled = PermutationTest(n_perm=99).run_on_distances(d * scale, labels)
    assert sampled.p_value == PermutationTest(n_perm=99).run_on_distances(d, labels).p_value


@pytest.mark.parametrize(
    "test",
    [PermutationTest(), PermutationTest(n_perm=99), BootstrapTest()],
    ids=["exact", "sampled", "bootstrap"],
)
def test_distances_near_the_float_limit_give_the_same_answer(test):
    # Distances of 1e307 are finite, but sums over the n^2 pairs overflow to inf and
    # inf - inf is NaN; a NaN statistic is never "at least as extreme", so p fell to 0.
    rng = np.random.default_rng(13)
    d = line_distances(np.r_[rng.random(4), 1 + rng.random(4)])
    labels = list("aaaabbbb")
    reference = test.run_on_distances(d, labels)
    huge = test.run_on_distances(d * 1e307, labels)
    assert huge.p_value == reference.p_value
    assert huge.statistic == pytest.approx(reference.statistic * 1e307)
    np.testing.assert_allclose(huge.null, reference.null * 1e307)


@pytest.mark.parametrize("scale", [1e-13, 1e-20, 1e8])
def test_eigen_swap_fraction_does_not_depend_on_the_unit_of_the_eigenvalues(scale):
    # the committed OMD / OGD eigenvalues of the paper: interleaved, a fraction near 0.1
    a = Spectrum([0.55814, 0.56513, 0.79254, 0.80117, 0.92458, 0.93197, 0.97988, 0.98379])
    b = Spectrum([0.55551, 0.57102, 0.79991, 0.81756, 0.93482, 0.94882, 0.98665, 0.99368])
    reference = EigenSwapControl(seed=2).run({"a": [a], "b": [b]}, W)
    assert 0 < reference.p_value < 1
    small = {"a": [Spectrum(a.eigenvalues * scale)], "b": [Spectrum(b.eigenvalues * scale)]}
    assert EigenSwapControl(seed=2).run(small, W).p_value == reference.p_value


# --- Holm ---------------------------------------------------------------------------------


def test_holm_by_hand():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; the running
    # maximum lifts the last to 0.06.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_reference_values():
    # statsmodels multipletests(method="holm") on these values, worked by hand:
    # sorted 0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205 times 8..1 =
    # 0.008, 0.056, 0.234, 0.205, 0.168, 0.18, 0.148, 0.205 -> running max and cap.
    p = [0.041, 0.001, 0.205, 0.008, 0.039, 0.074, 0.06, 0.042]
    expected = [0.234, 0.008, 0.234, 0.056, 0.234, 0.234, 0.234, 0.234]
    np.testing.assert_allclose(holm(p), expected)
    np.testing.assert_array_equal(holm([0.5, 0.9]), [1.0, 1.0])  # capped at one


def test_holm_leaves_nan_out_of_the_family():
    np.testing.assert_allclose(holm([0.01, np.nan, 0.02]), [0.02, np.nan, 0.02])
    with pytest.raises(EstimationError, match="1.5"):
        holm([0.1, 1.5])


def test_holm_matrix_corrects_the_upper_triangle_as_one_family():
    p = np.array(
        [
            [np.nan, 0.01, 0.04],
            [0.01, np.nan, 0.03],
            [0.04, 0.03, np.nan],
        ]
    )
    adjusted = holm_matrix(p)
    # Three tests: 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 -> 0.06 by monotonicity.
    expected = np.array([[np.nan, 0.03, 0.06], [0.03, np.nan, 0.06], [0.06, 0.06, np.nan]])
    np.testing.assert_allclose(adjusted, expected)
    with pytest.raises(EstimationError, match="not symmetric"):
        holm_matrix(np.triu(p + 0.1, 1))
