"""Checks of the tests' parameters."""

from numbers import Integral

from koopkit.errors import EstimationError

__all__ = ["check_positive_int", "check_seed"]


def check_positive_int(name: str, value) -> None:
    """Raise unless ``value`` is a positive integer (``bool`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise EstimationError(f"Invalid {name} {value!r}; expected a positive integer.")


def check_seed(value) -> None:
    """Raise unless ``value`` is a non-negative integer, as ``numpy.random.default_rng`` takes."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise EstimationError(f"Invalid seed {value!r}; expected a non-negative integer.")
