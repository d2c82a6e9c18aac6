"""Significance tests between two conditions' Koopman spectra, registered as koopkit tests.

Every test object has ``run(groups, metric) -> TestResult``, the plugin contract. The
tests whose statistic depends on the spectra only through their pairwise distances
(``"permutation"``, ``"bootstrap"``) also have ``run_on_distances(distances, labels)``:
``distances`` is the ``(n, n)`` symmetric distance matrix among the n spectra of the two
conditions and ``labels`` the condition of each. A pipeline comparing many conditions
computes the distance matrix among all spectra once and, for each pair of conditions,
passes the sub-matrix of that pair (``D[np.ix_(idx, idx)]``) and its labels, so no
distance is computed twice. ``"eigen-swap"`` works on single eigenvalues, not on
distances between spectra, and has only ``run``.

Two optional class attributes describe a test to the pipeline: ``calibrated`` (True when
``p_value`` is a valid p-value, the default for tests without it; ``"bootstrap"`` and
``"eigen-swap"`` give uncalibrated scores, which are reported as such and not
Holm-corrected) and ``null_label`` (what the ``null`` draws are, for figures).
"""

import koopkit


@koopkit.hookimpl
def koopkit_register_tests(register):
    register(
        "permutation",
        "koopkit_significance.permutation:PermutationTest",
        description="Two-sample permutation test on runs: mean between minus mean within "
        "distance (exact enumeration when small).",
    )
    register(
        "eigen-swap",
        "koopkit_significance.eigen_swap:EigenSwapControl",
        description="Randomized swap control of Redman et al. (2024), one-sided by "
        "construction; for reproducing published figures.",
    )
    register(
        "bootstrap",
        "koopkit_significance.bootstrap:BootstrapTest",
        description="Percentile bootstrap interval of the mean between-condition distance, "
        "resampling runs.",
    )
