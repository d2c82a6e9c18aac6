"""Format v1 of the trajectory store: node names, attribute keys and run-id rules.

A store is a Zarr v3 group::

    /                               attrs {"koopkit": {"format": "trajectory-store", "version": "1.0"}}
    runs/<run_id>/                  attrs {"koopkit": {"node": "run", "version": "1.0"}, run metadata...}
      params/                       series: value (step, param), step (step,)
      grads/                        series, same layout as params
      scalars/<name>/               series: value (step,), step (step,)
      probes/<name>/                series: value (step, sample, feature), step, sample, label
      static/<name>                 array, not a time series (an NTK, dataset ids)
    analyses/<analysis_id>/         results written back, with provenance attrs

Run metadata keys: run_id, tags, model, optimizer, created, koopkit_version, torch_version,
device, status, committed_steps ({series path: committed rows}), every, dropped, nonfinite.
A reader never shows rows of a series past its committed count.
"""

from __future__ import annotations

import math
import re

from ..errors import InvalidRunIdError, InvalidTagError

FORMAT_NAME = "trajectory-store"
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1

NAMESPACE = "koopkit"  # key of the koopkit block in every node's attributes
RUNS = "runs"
ANALYSES = "analyses"

PARAMS = "params"
GRADS = "grads"
SCALARS = "scalars"
PROBES = "probes"
STATIC = "static"
VECTOR_SERIES = (PARAMS, GRADS)

STATUSES = ("recording", "complete", "interrupted")
SERIES_KINDS = ("full", "subset", "sketch")

_NAME = re.compile(r"^[A-Za-z0-9_.\-=+@,]+$")


def root_attrs() -> dict:
    return {NAMESPACE: {"format": FORMAT_NAME, "version": FORMAT_VERSION}}


def node_block(node: str) -> dict:
    return {"node": node, "version": FORMAT_VERSION}


def check_name(name: str, what: str = "name") -> str:
    """A single path component: letters, digits and ``_.-=+@,``; never ``.`` or ``..``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidRunIdError(
            f"Invalid {what} {name!r}; expected letters, digits and _.-=+@, "
            "with no '..', slashes or NUL."
        )
    return name


def check_run_id(run_id: str) -> str:
    """A relative run id; ``/`` nests groups, but no component may escape the store."""
    if not isinstance(run_id, str) or not run_id or run_id.startswith("/") or "\\" in run_id:
        raise InvalidRunIdError(
            f"Invalid run id {run_id!r}; expected a relative name like 'fcn/h40/seed2'."
        )
    for part in run_id.split("/"):
        check_name(part, "run id component")
    return run_id


def _as_python_scalar(value):
    """numpy and torch scalars (one element with ``.item()``) as Python numbers."""
    if not callable(getattr(value, "item", None)):
        return value
    count = (
        value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", None)
    )
    return value.item() if count == 1 else value


TAG_KEY_LENGTH = 128
TAG_VALUE_LENGTH = 1024
"""The run schema's limits: a longer tag would make a store that fails validation."""


def check_tags(tags) -> dict:
    """Tags as JSON scalars: numpy/torch scalars become Python numbers, anything else is refused."""
    out = {}
    for key, value in dict(tags or {}).items():
        value = _as_python_scalar(value)
        if not isinstance(key, str) or not (
            value is None or isinstance(value, str | int | float | bool)
        ):
            raise InvalidTagError(
                f"Invalid tag {key!r}={value!r}; tags are str keys with str, number, bool or None values."
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidTagError(f"Invalid tag {key!r}={value!r}; numbers must be finite (JSON).")
        if len(key) > TAG_KEY_LENGTH or (isinstance(value, str) and len(value) > TAG_VALUE_LENGTH):
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise InvalidTagError(
                f"Invalid tag {shown!r}: keys are at most {TAG_KEY_LENGTH} characters and "
                f"string values at most {TAG_VALUE_LENGTH}."
            )
        out[key] = value
    return out


def run_path(run_id: str) -> str:
    return f"{RUNS}/{check_run_id(run_id)}"


def series_path(kind: str, name: str | None = None) -> str:
    """Path of a series inside a run: ``params``, ``grads``, ``scalars/loss``, ``probes/logits``."""
    if kind in VECTOR_SERIES:
        return kind
    if kind in (SCALARS, PROBES):
        return f"{kind}/{check_name(name, kind[:-1] + ' name')}"
    raise ValueError(f"Invalid series kind {kind!r}; expected params, grads, scalars or probes.")
