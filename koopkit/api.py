"""The Python entry points: ``estimate``, ``distance`` and ``compare``."""

from __future__ import annotations

from .plugins import create
from .results import Spectrum

__all__ = ["estimate", "distance", "compare"]


def estimate(trajectories, estimator: str = "dmd", **params) -> Spectrum:
    """Estimate a Koopman spectrum from one or several trajectories of one condition.

    Parameters
    ----------
    trajectories : (steps, features) array-like, or a list of them
        numpy, zarr, dask or torch arrays; several are fit jointly, with no pairs across
        trajectory boundaries.
    estimator : str
        A registered estimator name (``koopkit plugins`` lists them).
    **params
        The estimator's parameters (``rank``, ``delays``, ...).
    """
    if not isinstance(trajectories, list | tuple):
        trajectories = [trajectories]
    spectrum = create("estimator", estimator, **params).fit(list(trajectories))
    if not isinstance(spectrum, Spectrum):
        from .errors import PluginError

        raise PluginError(
            f"Estimator {estimator!r} returned {type(spectrum).__name__}; expected a koopkit.Spectrum."
        )
    return spectrum


def distance(a: Spectrum, b: Spectrum, metric: str = "wasserstein", **params) -> float:
    """Distance between two spectra with a registered metric."""
    from .errors import EstimationError
    from .pipeline import create_metric

    for name, spectrum in (("a", a), ("b", b)):
        if not isinstance(spectrum, Spectrum):
            raise EstimationError(
                f"Invalid spectrum {name!r}: got {type(spectrum).__name__}; expected a "
                "koopkit.Spectrum, as koopkit.estimate returns."
            )
    return create_metric(metric, params)(a, b)


def compare(store, by: str, **options):
    """Compare the spectra of the conditions of a store; see :func:`koopkit.pipeline.compare_store`."""
    from .pipeline import compare_store

    return compare_store(store, by, **options)
