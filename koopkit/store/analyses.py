"""Results written back into a store under ``analyses/<id>``, with their provenance.

An analysis is computed completely before anything is written, and a failed write removes
the partial group, so ``analyses/`` never holds half a result.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

import numpy as np

from .. import __version__
from ..errors import WriteFailedError
from ..plugins import lookup
from . import layout
from .location import open_root
from .writer import now


def _plugins(*kinds_names) -> dict:
    """What provided each name used, as ``koopkit plugins`` lists it: version and package."""
    entries = {f"{kind}:{name}": lookup(kind, name) for kind, name in kinds_names if name}
    return {
        "plugins": {key: entry.version for key, entry in entries.items()},
        "plugin_packages": {key: entry.package for key, entry in entries.items()},
    }


def _inputs(store, run_ids, series) -> list[dict]:
    return [
        {"run": run_id, "committed_steps": {series: store.run(run_id).committed(series)}}
        for run_id in run_ids
    ]


def _analysis_id(kind: str, attrs: dict) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    digest = hashlib.sha1(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{kind}-{stamp}-{digest}"


def _write(url, kind, attrs, arrays: dict, spectra) -> str:
    """Write one analysis group atomically (all or nothing); returns its id."""
    root = open_root(url, writable=True)
    analysis_id = base = _analysis_id(kind, attrs)
    n = 1
    while f"{layout.ANALYSES}/{analysis_id}" in root:  # the same analysis saved in one second
        n += 1
        analysis_id = f"{base}-{n}"
    path = f"{layout.ANALYSES}/{analysis_id}"
    created = False
    try:
        group = root.create_group(path)
        created = True  # from here on the group is ours to remove on failure
        for name, (dims, values) in arrays.items():
            group.create_array(name, data=np.asarray(values), dimension_names=dims)
        for i, result in enumerate(spectra):
            node = group.create_group(f"spectra/{i}")
            node.attrs.update(result["attrs"])
            spectrum = result["spectrum"]
            node.create_array("eigenvalues", data=spectrum.eigenvalues, dimension_names=("mode",))
            if spectrum.residuals is not None:
                node.create_array("residuals", data=spectrum.residuals, dimension_names=("mode",))
        group.attrs.update(attrs)  # written last: a group without attrs is not an analysis
    except BaseException as exc:
        try:
            if created and path in root:
                del root[path]
        except OSError:
            pass  # nothing could be written there either
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailedError):
            reason = exc.strerror or f"{type(exc).__name__}: {exc}"
            raise WriteFailedError(
                f"Cannot write {path!r} into store {os.fspath(url)!r}: {reason}."
            ) from exc
        raise
    return analysis_id


def _base_attrs(kind, estimator, inputs) -> dict:
    name, params = estimator
    return {
        layout.NAMESPACE: layout.node_block("analysis"),
        "kind": kind,
        "created": now(),
        "koopkit_version": __version__,
        "estimator": {"name": name, "params": dict(params or {})},
        "inputs": inputs,
    }


def save_spectra(url, results, *, estimator, store, series="params") -> str:
    """Write a list of pipeline ``SpectrumResult``s as a ``spectrum`` analysis."""
    runs = [r for result in results for r in result.group.runs]
    attrs = _base_attrs("spectrum", estimator, _inputs(store, runs, series))
    attrs.update(_plugins(("estimator", estimator[0])))
    spectra = [
        {
            "attrs": {
                "runs": list(r.group.runs),
                "tags": r.group.tags,
                "meta": _jsonable(r.spectrum.meta),
            },
            "spectrum": r.spectrum,
        }
        for r in results
    ]
    return _write(url, "spectrum", attrs, {}, spectra)


def save_comparison(
    url, comparison, *, by, replicate, estimator, metric, test, store, series="params"
) -> str:
    """Write a pipeline ``Comparison`` as a ``comparison`` analysis."""
    runs = [r for result in comparison.spectra for r in result.group.runs]
    attrs = _base_attrs("comparison", estimator, _inputs(store, runs, series))
    attrs.update(
        {
            "metric": {"name": metric[0], "params": dict(metric[1] or {})},
            **_plugins(("estimator", estimator[0]), ("metric", metric[0]), ("test", test[0])),
            "conditions": [str(c) for c in comparison.conditions],
            "by": by,
            "replicate": replicate,
        }
    )
    if test[0]:
        attrs["test"] = {
            "name": test[0],
            "params": dict(test[1] or {}),
            # False: p_value holds an uncalibrated score and p_value_holm is left NaN
            "calibrated": bool(getattr(comparison, "calibrated", True)),
        }
    pair = ("condition", "condition_other")
    arrays = {
        "distance_mean": (pair, comparison.distance_mean),
        "distance_std": (pair, comparison.distance_std),
        "p_value": (pair, comparison.p_value),
        "p_value_holm": (pair, comparison.p_value_holm),
        "distance": (("spectrum", "spectrum_other"), comparison.distances),
    }
    spectra = [
        {
            "attrs": {
                "runs": list(r.group.runs),
                "condition": _jsonable(r.group.condition),
                "replicate": _jsonable(r.group.replicate),
            },
            "spectrum": r.spectrum,
        }
        for r in comparison.spectra
    ]
    return _write(url, "comparison", attrs, arrays, spectra)


def _jsonable(value):
    return json.loads(
        json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    )
