"""Objects that cross the plugin contract: a Koopman ``Spectrum`` and a significance ``TestResult``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .strict_json import json_safe

__all__ = ["Spectrum", "TestResult", "json_safe"]


def _readonly(array, dtype):
    if array is None:
        return None
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Eigenvalues of an estimated Koopman operator, with what is known about each one.

    Parameters
    ----------
    eigenvalues : (r,) complex array
        Discrete-time eigenvalues, one per kept mode.
    amplitudes : (r,) complex array, optional
        Mode amplitudes fitted to the first snapshot of each trajectory (summed in magnitude).
    residuals : (r,) float array, optional
        ResDMD residual of each eigenpair; large values flag spurious eigenvalues.
    modes : (features, r) array or callable, optional
        DMD modes, or a zero-argument callable that computes them on demand (when first
        asked for, or when the spectrum is pickled).
    meta : mapping
        Provenance: estimator name and parameters, rank, input runs.
    """

    eigenvalues: np.ndarray
    amplitudes: np.ndarray | None = None
    residuals: np.ndarray | None = None
    modes: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "eigenvalues", _readonly(self.eigenvalues, np.complex128).ravel())
        object.__setattr__(self, "amplitudes", _readonly(self.amplitudes, np.complex128))
        object.__setattr__(self, "residuals", _readonly(self.residuals, np.float64))
        object.__setattr__(self, "meta", dict(self.meta))
        for name in ("amplitudes", "residuals"):
            value = getattr(self, name)
            if value is not None and value.shape != self.eigenvalues.shape:
                raise ValueError(
                    f"Expected {name} of shape {self.eigenvalues.shape}. Got {value.shape} instead."
                )

    def __reduce__(self):
        """Unpickled through the constructor, so the copy's arrays are read-only too; lazy
        modes are computed first, so the modes travel rather than the data behind them."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["modes"] = self.get_modes()
        return type(self), tuple(values.values())

    @property
    def rank(self) -> int:
        """Number of eigenvalues."""
        return int(self.eigenvalues.size)

    def get_modes(self):
        """The modes, computing them now if they were deferred."""
        return self.modes() if callable(self.modes) else self.modes

    def drop_spurious(self, max_residual: float) -> Spectrum:
        """A spectrum without eigenpairs whose residual exceeds ``max_residual``."""
        if self.residuals is None:
            raise ValueError("This spectrum has no residuals; estimate it with residuals=True.")
        keep = self.residuals <= max_residual
        pick = lambda a: None if a is None else a[keep]  # noqa: E731
        modes = self.get_modes()
        return replace(
            self,
            eigenvalues=self.eigenvalues[keep],
            amplitudes=pick(self.amplitudes),
            residuals=self.residuals[keep],
            modes=None if modes is None else np.asarray(modes)[:, keep],
            meta={**self.meta, "dropped_spurious_above": float(max_residual)},
        )

    def to_json(self) -> dict:
        """The public JSON shape: eigenvalues as ``[re, im]`` pairs; NaN and Inf become None."""
        out = {
            "eigenvalues": [[float(z.real), float(z.imag)] for z in self.eigenvalues],
            "residuals": None if self.residuals is None else [float(r) for r in self.residuals],
            "rank": self.rank,
        }
        if self.amplitudes is not None:
            out["amplitudes"] = [[float(z.real), float(z.imag)] for z in self.amplitudes]
        return json_safe(out)

    def to_dataset(self):
        """An ``xarray.Dataset`` with a ``mode`` dimension; ``meta`` goes to attrs as JSON."""
        import json

        import xarray as xr

        data = {"eigenvalues": ("mode", self.eigenvalues)}
        if self.amplitudes is not None:
            data["amplitudes"] = ("mode", self.amplitudes)
        if self.residuals is not None:
            data["residuals"] = ("mode", self.residuals)
        # numpy scalars and arrays as the numbers they hold, anything else as text
        plain = lambda v: v.tolist() if hasattr(v, "tolist") else str(v)  # noqa: E731
        return xr.Dataset(data, attrs={"koopkit_meta": json.dumps(self.meta, default=plain)})

    @classmethod
    def from_dataset(cls, ds) -> Spectrum:
        """Inverse of :meth:`to_dataset`."""
        import json

        get = lambda name: ds[name].values if name in ds else None  # noqa: E731
        return cls(
            eigenvalues=ds["eigenvalues"].values,
            amplitudes=get("amplitudes"),
            residuals=get("residuals"),
            meta=json.loads(ds.attrs.get("koopkit_meta", "{}")),
        )


@dataclass(frozen=True, eq=False)
class TestResult:
    """Outcome of a significance test.

    Parameters
    ----------
    statistic : float
        Observed value of the test statistic.
    p_value : float
        Probability under the null of a statistic at least as extreme.
    null : (n,) float array
        Statistics under the null (permutations, bootstrap draws); may be empty.
    n_perm : int
        Number of null draws, or of enumerated arrangements when ``exact``.
    exact : bool
        True when the null distribution was enumerated rather than sampled.
    interval : tuple of float, optional
        A confidence interval, for tests that give one.
    """

    __test__ = False  # not a pytest test class

    statistic: float
    p_value: float
    null: np.ndarray = field(default_factory=lambda: np.empty(0))
    n_perm: int = 0
    exact: bool = False
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        object.__setattr__(self, "null", _readonly(self.null, np.float64))
