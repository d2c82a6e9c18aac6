"""Built-in exact DMD estimators, registered as koopkit estimators like any third-party plugin."""

import koopkit

from .estimators import DMD, HankelDMD, PCAHankelDMD

__all__ = ["DMD", "HankelDMD", "PCAHankelDMD"]


@koopkit.hookimpl
def koopkit_register_estimators(register):
    register(
        "dmd",
        DMD,
        description="Exact DMD by the method of snapshots, streamed; ResDMD residuals.",
    )
    register(
        "hankel-dmd",
        HankelDMD,
        description="Exact DMD of delay-embedded snapshots, delays taken on the T x T Gram.",
    )
    register(
        "pca-hankel",
        PCAHankelDMD,
        description="PCA of the stacked snapshots, then delays, then exact DMD "
        "(Redman et al. 2024).",
    )
