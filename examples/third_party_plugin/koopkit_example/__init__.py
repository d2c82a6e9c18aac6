"""An example third-party koopkit plugin: one estimator, ``"lstsq-dmd"``.

koopkit finds this module through the ``koopkit`` entry-point group declared in
``pyproject.toml`` and calls the hook below with a ``register`` callback.
"""

import koopkit

from .lstsq_dmd import LstsqDMD

__all__ = ["LstsqDMD"]


@koopkit.hookimpl
def koopkit_register_estimators(register):
    register(
        "lstsq-dmd",
        LstsqDMD,
        description="Exact DMD by least squares in feature space (few features only).",
    )
