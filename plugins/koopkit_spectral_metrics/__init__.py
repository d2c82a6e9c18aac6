"""Distances between Koopman spectra, registered as koopkit metrics.

Each factory takes the metric's parameters and returns a callable
``(Spectrum, Spectrum) -> float``.
"""

import koopkit


@koopkit.hookimpl
def koopkit_register_metrics(register):
    register(
        "wasserstein",
        "koopkit_spectral_metrics.wasserstein:Wasserstein",
        description="Exact 1-Wasserstein distance between eigenvalues in the complex plane "
        "(uniform or amplitude weights).",
    )
    register(
        "wasserstein-log",
        "koopkit_spectral_metrics.wasserstein:LogWasserstein",
        description="1-Wasserstein distance between continuous-time rates log(eigenvalue)/dt.",
    )
    register(
        "matched-mean",
        "koopkit_spectral_metrics.matching:MatchedMean",
        description="Optimal-matching mean of Redman et al. (equal sizes only); equals "
        "'wasserstein' there.",
    )
