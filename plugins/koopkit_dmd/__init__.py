"""Built-in exact DMD estimators, registered as koopkit estimators like any third-party plugin."""

import koopkit


@koopkit.hookimpl
def koopkit_register_estimators(register):
    register(
        "dmd",
        "koopkit_dmd.estimators:DMD",
        description="Exact DMD by the method of snapshots, streamed; ResDMD residuals.",
    )
    register(
        "hankel-dmd",
        "koopkit_dmd.estimators:HankelDMD",
        description="Exact DMD of delay-embedded snapshots, delays taken on the T x T Gram.",
    )
    register(
        "pca-hankel",
        "koopkit_dmd.estimators:PCAHankelDMD",
        description="PCA of the stacked snapshots, then delays, then exact DMD "
        "(Redman et al. 2024).",
    )
