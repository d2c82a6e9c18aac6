"""From groups of spectra to the distance matrix and labels that the tests work on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from koopkit.errors import EstimationError, InsufficientDataError, NonFiniteDataError

__all__ = [
    "two_conditions",
    "flatten_groups",
    "distance_matrix",
    "check_distances",
    "condition_mask",
]


def two_conditions(groups: Mapping) -> list[tuple]:
    """The ``(label, spectra)`` items of ``groups``, checked to be exactly two.

    Parameters
    ----------
    groups : mapping of label to list of Spectrum
    """
    if len(groups) != 2:
        raise EstimationError(
            f"Invalid groups with {len(groups)} conditions {list(groups)!r}; expected exactly "
            "two: compare conditions pairwise."
        )
    return [(label, list(members)) for label, members in groups.items()]


def flatten_groups(groups: Mapping) -> tuple[list, list]:
    """All spectra of two conditions in one list, with the condition label of each.

    Parameters
    ----------
    groups : mapping of label to list of Spectrum
        Exactly two conditions.

    Returns
    -------
    spectra : list of Spectrum, length n
    labels : list, length n
    """
    items = two_conditions(groups)
    spectra = [s for _, members in items for s in members]
    labels = [label for label, members in items for _ in members]
    return spectra, labels


def distance_matrix(spectra: Sequence, metric) -> np.ndarray:
    """Pairwise distances, calling ``metric`` once per unordered pair.

    Parameters
    ----------
    spectra : sequence of Spectrum, length n
    metric : callable (Spectrum, Spectrum) -> float

    Returns
    -------
    (n, n) float ndarray
        Symmetric, zero diagonal (the metric is not called on a spectrum and itself).
    """
    n = len(spectra)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            value = float(metric(spectra[i], spectra[j]))
            if not np.isfinite(value):
                raise NonFiniteDataError(
                    f"Invalid distance {value!r} from the metric between spectra {i} and {j}; "
                    "expected a finite number."
                )
            out[i, j] = out[j, i] = value
    return out


def check_distances(distances, n: int) -> np.ndarray:
    """A checked float copy of an ``(n, n)`` symmetric distance matrix, with a zero diagonal.

    Parameters
    ----------
    distances : (n, n) array_like of float
        Symmetric distances; the diagonal is ignored.
    n : int
        Number of spectra (labels).
    """
    d = np.array(distances, dtype=np.float64)
    if d.shape != (n, n):
        raise EstimationError(
            f"Invalid distances of shape {d.shape}; expected ({n}, {n}) for {n} labels."
        )
    np.fill_diagonal(d, 0.0)
    if not np.all(np.isfinite(d)):
        i, j = np.argwhere(~np.isfinite(d))[0]
        raise NonFiniteDataError(
            f"Invalid distance {d[i, j]!r} between spectra {i} and {j}; expected finite values."
        )
    if not np.allclose(d, d.T, rtol=1e-12, atol=0):
        raise EstimationError("Invalid distances that are not symmetric; expected D == D.T.")
    return d


def condition_mask(labels: Sequence) -> np.ndarray:
    """Which spectra belong to the first of exactly two conditions.

    Parameters
    ----------
    labels : sequence of hashable, length n
        The condition of each spectrum; each condition needs at least two, since the
        within-condition distance needs a pair.

    Returns
    -------
    (n,) bool ndarray
        True for spectra of the condition met first in ``labels``.
    """
    labels = list(labels)
    names = list(dict.fromkeys(labels))
    if len(names) != 2:
        raise EstimationError(
            f"Invalid labels with {len(names)} conditions {names!r}; expected exactly two: "
            "compare conditions pairwise."
        )
    in_first = np.array([label == names[0] for label in labels], dtype=bool)
    for name, size in zip(names, (in_first.sum(), (~in_first).sum()), strict=True):
        if size < 2:
            raise InsufficientDataError(
                f"Invalid condition {name!r} with {size} spectrum; expected at least 2 "
                "runs or replicates per condition (the within-condition distance needs a pair)."
            )
    return in_first


class DistanceTest:
    """A test whose statistic sees the spectra only through their pairwise distances.

    Subclasses define ``run_on_distances(distances, labels)``; ``run`` computes the
    distance matrix once (n(n-1)/2 metric calls) and hands it over.
    """

    def run(self, groups, metric):
        """Test two conditions, computing their distance matrix with ``metric``.

        Parameters
        ----------
        groups : mapping of label to list of Spectrum
            Exactly two conditions, each with at least two spectra.
        metric : callable (Spectrum, Spectrum) -> float
            Called once per unordered pair of spectra.
        """
        spectra, labels = flatten_groups(groups)
        condition_mask(labels)  # fail before any metric call
        return self.run_on_distances(distance_matrix(spectra, metric), labels)
