"""The example plugin passes koopkit's conformance suite and is found through its entry point."""

import numpy as np
import pytest
from koopkit_example import LstsqDMD

import koopkit
import koopkit.plugins
from koopkit.errors import EstimationError, InsufficientDataError
from koopkit.testing import EIGENVALUES, estimator_checks, linear_trajectories


@pytest.mark.parametrize("name, check", estimator_checks())
@pytest.mark.parametrize("params", [{"rank": 4}, {}], ids=["rank=4", "default"])
def test_conformance(name, check, params):
    check(LstsqDMD, **params)


def test_registered_through_the_entry_point():
    koopkit.plugins.refresh()
    entry = koopkit.plugins.lookup("estimator", "lstsq-dmd")
    assert (entry.factory, entry.plugin, entry.package) == (
        LstsqDMD,
        "example",
        "koopkit-plugin-example",
    )
    spectrum = koopkit.estimate(linear_trajectories(), estimator="lstsq-dmd", rank=4)
    assert np.allclose(np.sort_complex(spectrum.eigenvalues), np.sort_complex(EIGENVALUES))


@pytest.mark.parametrize(
    "params, error, message",
    [
        ({"rank": 0}, EstimationError, "Expected rank to be an int >= 1. Got 0 instead."),
        ({"rank": 5}, InsufficientDataError, "Expected rank at most 4"),
        ({"max_features": 2}, EstimationError, "use the estimator 'dmd'"),
    ],
)
def test_bad_input_is_refused_clearly(params, error, message):
    with pytest.raises(error, match=message):
        LstsqDMD(**params).fit(linear_trajectories())
