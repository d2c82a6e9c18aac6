"""Select runs -> estimate one spectrum per group -> distances -> significance tests.

Runs are grouped by the value of a tag (the condition, ``by``) and optionally by a second
tag (the replicate, e.g. ``seed``); all runs of one (condition, replicate) are fit jointly.
The distance matrix among all spectra is computed once; each pair of conditions is then
tested on its sub-matrix, and the pairwise p-values are Holm-corrected as one family.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import (
    EstimationError,
    InsufficientDataError,
    KoopkitError,
    NonFiniteDataError,
    PluginError,
    SelectionError,
)
from .multiple_testing import holm_matrix
from .plugins import create, lookup
from .results import Spectrum, TestResult, json_safe

__all__ = [
    "Group",
    "SpectrumResult",
    "Comparison",
    "group_runs",
    "step_interval",
    "estimate_groups",
    "compare_store",
]


@dataclass(frozen=True)
class Group:
    """Runs fit jointly into one spectrum; ``condition``/``replicate`` are tag values or None."""

    runs: tuple[str, ...]
    tags: dict
    condition: object = None
    replicate: object = None


@dataclass(frozen=True)
class SpectrumResult:
    group: Group
    spectrum: Spectrum

    def to_json(self) -> dict:
        return {"runs": list(self.group.runs), "tags": self.group.tags, **self.spectrum.to_json()}


def _label(value) -> str:
    return str(value)


def _common_tags(infos) -> dict:
    common = dict(infos[0].tags)
    for info in infos[1:]:
        common = {k: v for k, v in common.items() if info.tags.get(k) == v}
    return common


def group_runs(store, where=None, by=(), replicate=None, series="params") -> list[Group]:
    """Runs matching ``where`` that hold ``series``, grouped by the ``by`` tags (and replicate).

    Without ``by`` every run is its own group.
    """
    infos = [info for info in store.select(where) if series in info.series]
    if not infos:
        shown = " ".join(f"{k}={v}" for k, v in (where or {}).items()) or "(no filter)"
        raise SelectionError(
            f"No run in {store.url!r} matches {shown} and holds series {series!r}."
        )
    if isinstance(by, str):
        by = (by,)
    if replicate and replicate in by:
        raise SelectionError(
            f"Invalid replicate tag {replicate!r}: it is also a --by tag, so each condition "
            "would hold one replicate; replicates are the runs within a condition."
        )
    keys = tuple(by) + ((replicate,) if replicate else ())
    if not keys:
        return [Group((i.run_id,), i.tags) for i in infos]
    _check_tagged(infos, keys)
    _check_spellings(infos, keys)
    buckets: dict[tuple, list] = {}
    for info in infos:
        # True == 1 in Python; as tags they are different values
        key = tuple((isinstance(info.tags[k], bool), info.tags[k]) for k in keys)
        buckets.setdefault(key, []).append(info)
    groups = []
    for tagged in sorted(buckets, key=lambda k: tuple(_sort_key(v) for _, v in k)):
        members = buckets[tagged]
        key = tuple(v for _, v in tagged)
        condition = key[0] if len(by) == 1 else (" ".join(map(str, key[: len(by)])) if by else None)
        groups.append(
            Group(
                tuple(i.run_id for i in members),
                _common_tags(members),
                condition=condition,
                replicate=key[-1] if replicate else None,
            )
        )
    return groups


def _shown(items, limit: int = 5) -> str:
    """``'a', 'b', 'c' (and 4 more)``: the first ``limit`` items quoted, then a count."""
    items = list(items)
    text = ", ".join(repr(x) for x in items[:limit])
    return text + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _check_tagged(infos, keys) -> None:
    """Every run carries every grouping tag; else name, per missing tag, the runs without it."""
    reasons = []
    for key in keys:
        without = [i.run_id for i in infos if key not in i.tags]
        if without:
            runs = "run" if len(without) == 1 else "runs"
            reasons.append(f"no tag {key!r} on {len(without)} {runs}: {_shown(without)}")
    if reasons:
        text = "; ".join(reasons)
        raise SelectionError(
            f"{text[0].upper()}{text[1:]}; tag every run or narrow the selection with --where."
        )


def _check_spellings(infos, keys) -> None:
    """Refuse distinct values of one tag that print alike (``1`` and ``"1"``): their labels
    would merge two conditions, or make one label stand for two."""
    for key in keys:
        seen: dict[str, object] = {}
        for info in infos:
            value = info.tags[key]
            first = seen.setdefault(_label(value), value)
            if type(first) is not type(value) or first != value:
                raise SelectionError(
                    f"Tag {key!r} has distinct values {first!r} ({type(first).__name__}) and "
                    f"{value!r} ({type(value).__name__}) that print alike as {_label(value)!r}; "
                    "retag the runs so each value is spelled one way."
                )


def _sort_key(value):
    return (
        (0, value, "")
        if isinstance(value, int | float) and not isinstance(value, bool)
        else (1, 0, str(value))
    )


def _progress(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def step_interval(store, run_id: str, series: str = "params") -> int | None:
    """The optimizer steps between consecutive rows of a run's series; None with one row.

    A Koopman estimate treats rows as equally spaced in time: rows at uneven steps (a
    log-spaced schedule, dropped snapshots) would mix time steps, and are refused.
    """
    steps = np.asarray(store.steps(run_id, series))
    if steps.size < 2:
        return None
    gaps = np.unique(np.diff(steps))
    if gaps.size > 1:
        shown = ", ".join(str(int(g)) for g in gaps[:5]) + (", ..." if gaps.size > 5 else "")
        raise SelectionError(
            f"Expected the rows of {series!r} in run {run_id!r} at one step interval. Got "
            f"intervals {shown} instead; a spectrum needs equally spaced snapshots: estimate "
            "equally spaced steps in Python, koopkit.estimate(run['params']['value']"
            ".sel(step=steps))."
        )
    return int(gaps[0])


def _group_interval(store, group: Group, series: str) -> int | None:
    """The step interval all runs of a group share (their rows are fitted as one system)."""
    intervals = {run_id: step_interval(store, run_id, series) for run_id in group.runs}
    known = {v for v in intervals.values() if v is not None}
    if len(known) > 1:
        shown = ", ".join(f"{run_id}: {v}" for run_id, v in intervals.items())
        raise SelectionError(
            f"Expected the runs fitted together to share one step interval. Got {shown}."
        )
    return known.pop() if known else None


class _FlatRows:
    """A (step, sample, feature) series seen as (step, sample x feature), read lazily.

    A block of columns reads only the samples it covers; estimators slice ``[rows, columns]``.
    """

    def __init__(self, rows):
        self.rows = rows
        self.width = int(np.prod(rows.shape[2:], dtype=np.int64))
        self.shape = (int(rows.shape[0]), int(rows.shape[1]) * self.width)
        self.dtype = rows.dtype
        self.ndim = 2

    def __getitem__(self, key):
        steps, columns = (*(key if isinstance(key, tuple) else (key,)), slice(None))[:2]
        first, last = 0, int(self.rows.shape[1])
        contiguous = isinstance(columns, slice) and columns.indices(self.shape[1])[2] == 1
        if contiguous:  # read only the samples these columns cover
            start, stop, _ = columns.indices(self.shape[1])
            first = start // self.width
            last = max(first, -(-stop // self.width))
            columns = slice(start - first * self.width, max(start, stop) - first * self.width)
        block = np.asarray(self.rows[steps, first:last])
        flat = block.reshape(-1) if not isinstance(steps, slice) else block.reshape(len(block), -1)
        return flat[..., columns]

    def __array__(self, dtype=None, copy=None):
        data = self[:, :]
        return data if dtype is None else data.astype(dtype)

    def __len__(self):
        return self.shape[0]


def _as_rows(trajectory):
    """A stored series as (step, features): probes' (sample, feature) become its features."""
    return _FlatRows(trajectory) if trajectory.ndim > 2 else trajectory


def estimate_groups(
    store,
    groups,
    estimator="dmd",
    params=None,
    series="params",
    progress=False,
    one_interval=False,
) -> list[SpectrumResult]:
    """One spectrum per group, each from all the group's runs jointly.

    Each spectrum's ``meta["step_interval"]`` is the optimizer steps between its rows: an
    eigenvalue is per that many steps. Intervals are checked before anything is fitted;
    ``one_interval`` (a comparison) also refuses groups of different intervals.
    """
    est = create("estimator", estimator, **(params or {}))
    groups = list(groups)
    intervals = [_group_interval(store, group, series) for group in groups]
    if one_interval:
        _check_one_interval(
            (interval, group.runs[0]) for interval, group in zip(intervals, groups, strict=True)
        )
    results = []
    for i, (group, interval) in enumerate(zip(groups, intervals, strict=True), 1):
        _progress(f"[{i}/{len(groups)}] {estimator}: {', '.join(group.runs)}", progress)
        trajectories = [_as_rows(store.trajectory(run_id, series)) for run_id in group.runs]
        try:
            spectrum = est.fit(trajectories)
        except EstimationError as exc:  # the same error, naming the runs it concerns
            exc.args = (f"Runs {list(group.runs)}: {exc}", *exc.args[1:])
            raise
        except KoopkitError:
            raise
        except Exception as exc:
            entry = lookup("estimator", estimator)
            raise PluginError(
                f"Estimator {estimator!r} (plugin {entry.plugin!r}) failed on runs {list(group.runs)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(spectrum, Spectrum):
            entry = lookup("estimator", estimator)
            raise PluginError(
                f"Estimator {estimator!r} (plugin {entry.plugin!r}) returned "
                f"{type(spectrum).__name__}; expected a koopkit.Spectrum."
            )
        if not np.all(np.isfinite(spectrum.eigenvalues)):
            raise NonFiniteDataError(
                f"Estimator {estimator!r} gave non-finite eigenvalues for runs {list(group.runs)}."
            )
        meta = {**spectrum.meta, "runs": list(group.runs), "step_interval": interval}
        results.append(
            SpectrumResult(
                group,
                Spectrum(
                    spectrum.eigenvalues,
                    spectrum.amplitudes,
                    spectrum.residuals,
                    spectrum.modes,
                    meta,
                ),
            )
        )
    return results


@dataclass(frozen=True)
class Comparison:
    """Distances between conditions and the significance of their differences.

    ``distance_mean[i, j]`` is the mean distance over replicate pairs of conditions i and j
    (the diagonal: over distinct replicate pairs within a condition, NaN for a condition
    with one spectrum), ``distance_std`` its spread; ``p_value`` holds each pair's test,
    ``p_value_holm`` the Holm-corrected values.

    ``calibrated`` is False for a test whose value is not a calibrated p-value (a score such
    as the bootstrap or eigen-swap fraction): ``p_value`` then holds that score and
    ``p_value_holm`` stays NaN, since Holm's correction assumes p-values. ``null_label``
    says what the test's ``null`` draws are, for figures.
    """

    conditions: list[str]
    spectra: list[SpectrumResult]
    distances: np.ndarray
    distance_mean: np.ndarray
    distance_std: np.ndarray
    test_name: str | None
    p_value: np.ndarray
    p_value_holm: np.ndarray
    tests: dict = field(default_factory=dict)
    n_perm: int | None = None
    note: str | None = None
    calibrated: bool = True
    null_label: str | None = None

    def pairs(self) -> list[dict]:
        """One entry per pair of conditions: distance (mean, std), p-value and Holm p-value."""
        return [
            {
                "pair": [self.conditions[i], self.conditions[j]],
                "distance": float(self.distance_mean[i, j]),
                "distance_std": float(self.distance_std[i, j]),
                "p_value": float(self.p_value[i, j]),
                "p_value_holm": float(self.p_value_holm[i, j]),
            }
            for i, j in itertools.combinations(range(len(self.conditions)), 2)
        ]

    def to_json(self) -> dict:
        """The public JSON shape; NaN and Inf become None, and ``spectra[].condition`` is the
        condition's label, as in ``conditions``."""
        return json_safe(
            {
                "conditions": self.conditions,
                "distance": {"mean": self.distance_mean, "std": self.distance_std},
                "test": {
                    "name": self.test_name,
                    "p_value": self.p_value,
                    "p_value_holm": self.p_value_holm,
                    "n_perm": self.n_perm,
                    "note": self.note,
                    "calibrated": self.calibrated if self.test_name else None,
                },
                "spectra": [
                    {
                        "condition": _label(r.group.condition),
                        "replicate": r.group.replicate,
                        "runs": list(r.group.runs),
                        **r.spectrum.to_json(),
                    }
                    for r in self.spectra
                ],
            }
        )


def distance_matrix(spectra: list[Spectrum], metric: Callable) -> np.ndarray:
    """Symmetric matrix of ``metric`` over every unordered pair, computed once each."""
    n = len(spectra)
    d = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        d[i, j] = d[j, i] = float(metric(spectra[i], spectra[j]))
    return d


def _summaries(d, labels, conditions):
    k = len(conditions)
    mean, std = np.full((k, k), np.nan), np.full((k, k), np.nan)
    index = {c: np.flatnonzero(labels == c) for c in conditions}
    for a, b in itertools.product(range(k), repeat=2):
        ia, ib = index[conditions[a]], index[conditions[b]]
        if a == b:
            values = d[np.ix_(ia, ia)][np.triu_indices(len(ia), 1)]
            if values.size == 0:  # one spectrum: no pair to measure, so no within distance
                continue
        else:
            values = d[np.ix_(ia, ib)].ravel()
        mean[a, b], std[a, b] = values.mean(), values.std()
    return mean, std


def create_metric(name: str, params=None) -> Callable:
    """The registered metric ``name``, checked at every call: a failure, or a value that is
    not a distance (a finite real number >= 0), is reported naming the metric's plugin."""
    fn = create("metric", name, **(params or {}))
    plugin = lookup("metric", name).plugin

    def metric(a: Spectrum, b: Spectrum) -> float:
        try:
            value = fn(a, b)
        except KoopkitError:
            raise
        except Exception as exc:
            raise PluginError(
                f"Metric {name!r} (plugin {plugin!r}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        distance = _real(value)
        if distance is None or not (math.isfinite(distance) and distance >= 0):
            raise PluginError(
                f"Metric {name!r} (plugin {plugin!r}) returned {value!r}; expected a distance, "
                "a finite number >= 0."
            )
        return distance

    return metric


def _real(value) -> float | None:
    """``value`` as a float if it is one real number (a numpy scalar or 0-d array too), not a
    bool, a string or a complex number; else None."""
    if isinstance(value, bool | str | bytes) or np.ndim(value) != 0:
        return None
    if not isinstance(value, numbers.Real) and not np.isrealobj(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def run_tests(d, labels, conditions, test, metric, spectra, name):
    """Each pair of conditions tested on its sub-matrix of ``d``; returns p-values and results.

    A failure of the test ``name``, or a result that is not a ``TestResult`` with a p-value
    in [0, 1] (or NaN), is reported naming its plugin.
    """
    k = len(conditions)
    p = np.full((k, k), np.nan)
    results: dict[tuple[str, str], TestResult] = {}
    for a, b in itertools.combinations(range(k), 2):
        idx = np.flatnonzero((labels == conditions[a]) | (labels == conditions[b]))
        sub_labels = [str(x) for x in labels[idx]]
        pair = f"conditions {conditions[a]!r} and {conditions[b]!r}"
        try:
            if hasattr(test, "run_on_distances"):
                result = test.run_on_distances(d[np.ix_(idx, idx)], sub_labels)
            else:
                groups = {
                    c: [spectra[i] for i in idx if labels[i] == c]
                    for c in (conditions[a], conditions[b])
                }
                result = test.run(groups, metric)
        except KoopkitError:
            raise
        except Exception as exc:
            raise PluginError(
                f"Test {name!r} (plugin {_plugin_of('test', name)!r}) failed on {pair}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        value = _real(getattr(result, "p_value", None))
        valid = value is not None and (np.isnan(value) or 0 <= value <= 1)
        if not isinstance(result, TestResult) or not valid:
            shown = (
                f"p-value {result.p_value!r}"
                if isinstance(result, TestResult)
                else type(result).__name__
            )
            raise PluginError(
                f"Test {name!r} (plugin {_plugin_of('test', name)!r}) returned {shown} for "
                f"{pair}; expected a koopkit.TestResult with a p-value in [0, 1] or NaN."
            )
        p[a, b] = p[b, a] = value
        results[(conditions[a], conditions[b])] = result
    return p, results


def _plugin_of(kind: str, name: str) -> str:
    try:
        return lookup(kind, name).plugin
    except KoopkitError:  # not a registered name
        return "unknown"


def _check_one_interval(intervals_and_runs) -> None:
    """Spectra of different step intervals hold eigenvalues of different time steps
    (``lambda`` against ``lambda ** k``): their distances would measure the sampling.

    Takes (step interval, a run) pairs, one per spectrum or group.
    """
    intervals = {}
    for interval, run in intervals_and_runs:
        if interval is not None:
            intervals.setdefault(interval, run)
    if len(intervals) > 1:
        shown = ", ".join(f"every {k} (run {run!r})" for k, run in sorted(intervals.items()))
        raise SelectionError(
            f"Expected spectra of one step interval to compare. Got {shown}; record or select "
            "runs sampled at the same interval."
        )


def compare_spectra(
    spectra: list[SpectrumResult],
    metric="wasserstein",
    metric_params=None,
    test="permutation",
    test_params=None,
    replicated=True,
) -> Comparison:
    """Distances among all spectra once, then the test for each pair of conditions."""
    metric_fn = create_metric(metric, metric_params)
    test_obj = create("test", test, **(test_params or {})) if test else None
    return _compare(spectra, metric_fn, test, test_obj, replicated)


def _condition_labels(groups: list[Group]) -> np.ndarray:
    """Each group's condition label; distinct conditions that print alike are refused."""
    seen: dict[str, object] = {}
    for group in groups:
        first = seen.setdefault(_label(group.condition), group.condition)
        if type(first) is not type(group.condition) or first != group.condition:
            raise SelectionError(
                f"Conditions {first!r} and {group.condition!r} print alike as "
                f"{_label(first)!r}; give each condition a distinct value."
            )
    return np.array([_label(group.condition) for group in groups], dtype=object)


def _conditions(labels: np.ndarray) -> list[str]:
    """The distinct labels in order of appearance: at least two, or nothing to compare."""
    conditions = list(dict.fromkeys(labels.tolist()))
    if len(conditions) < 2:
        raise InsufficientDataError(
            f"Expected at least 2 conditions to compare. Got {len(conditions)} ({', '.join(conditions)})."
        )
    return conditions


def _compare(spectra, metric_fn, test, test_obj, replicated) -> Comparison:
    """:func:`compare_spectra` with the metric and the test already created."""
    _check_one_interval((r.spectrum.meta.get("step_interval"), r.group.runs[0]) for r in spectra)
    labels = _condition_labels([r.group for r in spectra])
    conditions = _conditions(labels)
    d = distance_matrix([r.spectrum for r in spectra], metric_fn)
    mean, std = _summaries(d, labels, conditions)
    nan = np.full_like(mean, np.nan)
    if test_obj is None:
        return Comparison(conditions, spectra, d, mean, std, None, nan, nan)
    calibrated = bool(getattr(test_obj, "calibrated", True))  # third-party tests: p-values
    described = {"calibrated": calibrated, "null_label": getattr(test_obj, "null_label", None)}
    try:
        p, results = run_tests(
            d, labels, conditions, test_obj, metric_fn, [r.spectrum for r in spectra], test
        )
    except InsufficientDataError as exc:
        if replicated:
            raise
        note = f"test {test!r} not run: {exc} Use --replicate TAG to estimate one spectrum per replicate."
        return Comparison(conditions, spectra, d, mean, std, test, nan, nan, note=note, **described)
    n_perm = max((r.n_perm for r in results.values()), default=None)
    holm = holm_matrix(p) if calibrated else nan  # Holm's correction is for p-values only
    return Comparison(
        conditions, spectra, d, mean, std, test, p, holm, results, n_perm, **described
    )


def compare_store(
    store,
    by: str,
    replicate: str | None = None,
    where=None,
    estimator: str = "dmd",
    estimator_params=None,
    metric: str = "wasserstein",
    metric_params=None,
    test: str | None = "permutation",
    test_params=None,
    series: str = "params",
    save: bool = True,
    progress: bool = False,
) -> Comparison:
    """Group the runs of a store by ``by`` (and ``replicate``), estimate, compare and test.

    ``store`` is a URL or an opened store. With ``save``, the result is written to the
    store's ``analyses/`` with provenance (:func:`koopkit.store.analyses.save_comparison`).
    Names and parameters of the estimator, metric and test are checked before any work.
    """
    from .store.location import check_writable
    from .store.reader import TrajectoryStore, open_store

    for kind, name in (("estimator", estimator), ("metric", metric), ("test", test)):
        if name:
            lookup(kind, name)  # unknown names fail before any work
    metric_fn = create_metric(metric, metric_params)
    test_obj = create("test", test, **(test_params or {})) if test else None
    opened = store if isinstance(store, TrajectoryStore) else open_store(store)
    if save:
        check_writable(opened.url, "pass save=False to compare without saving")
    groups = group_runs(opened, where, by, replicate, series)
    _conditions(_condition_labels(groups))  # checked before any estimation
    spectra = estimate_groups(
        opened, groups, estimator, estimator_params, series, progress, one_interval=True
    )
    comparison = _compare(spectra, metric_fn, test, test_obj, bool(replicate))
    if save:
        from .store.analyses import save_comparison

        save_comparison(
            opened.url,
            comparison,
            by=by,
            replicate=replicate,
            estimator=(estimator, estimator_params),
            metric=(metric, metric_params),
            test=(test, test_params),
            store=opened,
            series=series,
        )
    return comparison
