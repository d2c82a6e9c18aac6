"""JSON that strict parsers accept, for machine-readable output; numpy is never imported.

``koopkit info --json`` must start without numpy, and spectra and comparisons hold numpy
values: both go through :func:`json_safe`.
"""

from __future__ import annotations

import math

__all__ = ["json_safe"]


def json_safe(value):
    """``value`` with NaN and Inf floats replaced by None and numpy values made Python ones.

    Strict JSON has no NaN or Infinity, so machine output maps them to ``null``; dicts,
    lists, tuples and numpy arrays are converted recursively.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return json_safe(value.tolist())
    return value
