"""Checks shared by the spectral metrics: what makes a spectrum a valid point set."""

from __future__ import annotations

import numpy as np

from koopkit.errors import EstimationError, NonFiniteDataError

__all__ = ["eigenvalues_of", "amplitude_weights"]


def eigenvalues_of(spectrum, arg: str) -> np.ndarray:
    """The eigenvalues of ``spectrum`` as a non-empty, finite complex array.

    Parameters
    ----------
    spectrum : Spectrum
        The spectrum to read.
    arg : str
        Name of the argument, for error messages.

    Returns
    -------
    (r,) complex ndarray
    """
    values = np.asarray(spectrum.eigenvalues, dtype=np.complex128).ravel()
    if values.size == 0:
        raise EstimationError(
            f"Invalid spectrum {arg!r} with 0 eigenvalues; expected at least one eigenvalue."
        )
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise NonFiniteDataError(
            f"Invalid spectrum {arg!r}: eigenvalue {values[bad]!r} at index {bad}; "
            "expected finite eigenvalues."
        )
    return values


def amplitude_weights(spectrum, arg: str) -> np.ndarray:
    """Probability weights proportional to ``|amplitudes|``.

    Parameters
    ----------
    spectrum : Spectrum
        The spectrum to read; must carry amplitudes.
    arg : str
        Name of the argument, for error messages.

    Returns
    -------
    (r,) float ndarray
        Non-negative weights that sum to one.
    """
    if spectrum.amplitudes is None:
        raise EstimationError(
            f"Invalid spectrum {arg!r} without amplitudes; weights='amplitude' expects "
            "spectra estimated with amplitudes (or use weights='uniform')."
        )
    magnitude = np.abs(np.asarray(spectrum.amplitudes, dtype=np.complex128).ravel())
    if not np.all(np.isfinite(magnitude)):
        raise NonFiniteDataError(
            f"Invalid spectrum {arg!r}: amplitudes hold NaN or Inf; expected finite amplitudes."
        )
    peak = magnitude.max()
    if peak <= 0:
        raise EstimationError(
            f"Invalid spectrum {arg!r}: amplitudes sum to {float(magnitude.sum())!r} in "
            "magnitude; expected at least one nonzero amplitude."
        )
    magnitude = magnitude / peak  # finite magnitudes can still sum to inf
    return magnitude / magnitude.sum()
