"""koopkit: record training trajectories into Zarr and compare their dynamics with Koopman spectra.

``import koopkit`` is light: torch, dask, zarr and xarray load only when a feature needs them.
"""

from importlib import import_module

from .hookspecs import hookimpl

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access
_LAZY = {
    "Recorder": "koopkit.record.recorder",
    "Probe": "koopkit.record.recorder",
    "open_store": "koopkit.store.reader",
    "open_run": "koopkit.store.reader",
    "Spectrum": "koopkit.results",
    "TestResult": "koopkit.results",
    "estimate": "koopkit.api",
    "distance": "koopkit.api",
    "compare": "koopkit.api",
    "log_steps": "koopkit.record.schedule",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'koopkit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
