"""Distances between Koopman spectra, registered as koopkit metrics.

Each factory takes the metric's parameters and returns a callable
``(Spectrum, Spectrum) -> float``.
"""

import koopkit

from .matching import MatchedMean
from .wasserstein import LogWasserstein, Wasserstein

__all__ = ["Wasserstein", "LogWasserstein", "MatchedMean"]


@koopkit.hookimpl
def koopkit_register_metrics(register):
    register(
        "wasserstein",
        Wasserstein,
        description="Exact 1-Wasserstein distance between eigenvalues in the complex plane "
        "(uniform or amplitude weights).",
    )
    register(
        "wasserstein-log",
        LogWasserstein,
        description="1-Wasserstein distance between continuous-time rates log(eigenvalue)/dt.",
    )
    register(
        "matched-mean",
        MatchedMean,
        description="Optimal-matching mean of Redman et al. (equal sizes only); equals "
        "'wasserstein' there.",
    )
