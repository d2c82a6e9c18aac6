"""JSON Schemas of the trajectory store, and the one validator the reader and the CLI share.

The schemas are plain files in ``koopkit/schemas`` (one per node kind, each ``$id`` carrying the
format version, as OME-Zarr does) so a store can be checked in any language without koopkit.
Here they are loaded once into a ``referencing.Registry`` (no network), and jsonschema's errors
become short reasons that name a JSON path. Attributes come from stores we did not write, so
nothing here raises on bad input or echoes a 10 MB string back to the terminal.
"""

from __future__ import annotations

import copy
import json
import re
import reprlib
from datetime import datetime
from functools import cache
from importlib.resources import files

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from .layout import FORMAT_VERSION, NAMESPACE, SUPPORTED_MAJOR

__all__ = ["NODE_KINDS", "check_version", "schema", "validate_attrs"]

NODE_KINDS = ("store", "run", "series", "analysis", "static")
MAX_REASONS = 50  # a hostile store can hold a million bad keys; nobody reads past the first few

_short = reprlib.Repr()  # quotes values at most ~80 characters long, however big or deep
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxdict = 6
_short.maxlevel = 3

_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value) -> bool:
    """RFC 3339 with an offset; checked here so validation does not hinge on an optional package."""
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        return False
    datetime.fromisoformat(value.upper())  # ValueError for month 13, hour 25, 30 February
    return True


@cache
def _schemas() -> tuple[dict[str, dict], Registry]:
    """Every schema file by node kind, and a registry that resolves their ``$ref``s offline."""
    schemas = {}
    for path in (files("koopkit") / "schemas").iterdir():
        if path.name.endswith(".schema.json"):
            schemas[path.name.removesuffix(".schema.json")] = json.loads(
                path.read_text(encoding="utf-8")
            )
    registry = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in schemas.values()
    )
    return schemas, registry


def _check_node(node: str) -> str:
    if node not in NODE_KINDS:
        raise ValueError(f"Invalid node kind {node!r}; known: {', '.join(NODE_KINDS)}.")
    return node


@cache
def _validator(node: str) -> Draft202012Validator:
    schemas, registry = _schemas()
    return Draft202012Validator(
        schemas[_check_node(node)], registry=registry, format_checker=_FORMATS
    )


def schema(node: str) -> dict:
    """The JSON Schema of one node kind (a copy: the cached original stays pristine)."""
    return copy.deepcopy(_schemas()[0][_check_node(node)])


def check_version(block) -> str | None:
    """Why a node's ``koopkit`` block is in a format version this koopkit cannot read, or None.

    Run before the schemas, because a newer store is expected to fail them and "upgrade koopkit"
    is then the one useful thing to say. A missing block or version is left to the schemas.
    """
    if not isinstance(block, dict) or "version" not in block:
        return None
    version = block["version"]
    if not isinstance(version, str):
        return f"format version {_short.repr(version)} is not a string like {FORMAT_VERSION!r}"
    if version == FORMAT_VERSION:
        return None
    same_major = version.split(".")[0] == str(SUPPORTED_MAJOR)
    reads = FORMAT_VERSION if same_major else f"{SUPPORTED_MAJOR}.x"
    return f"format version {_short.repr(version)} is not supported by this koopkit (reads {reads})"


def validate_attrs(node: str, attrs) -> list[str]:
    """Every reason ``attrs`` are not valid attributes of a ``node`` (one of NODE_KINDS).

    An empty list means valid. Each reason reads ``"<node>: <json.path>: <what is wrong>"``.
    Never raises on any JSON value; raises ValueError only for an unknown ``node``.
    """
    validator = _validator(node)
    if isinstance(attrs, dict) and (reason := check_version(attrs.get(NAMESPACE))):
        return [f"{node}: {NAMESPACE}.version: {reason}"]
    reasons: dict[str, None] = {}  # an ordered set: "required" reports each missing key per error
    try:
        for error in validator.iter_errors(attrs):
            reasons.update(dict.fromkeys(f"{node}: {r}" for r in _reasons(error)))
            if len(reasons) > MAX_REASONS:
                break
    except RecursionError:
        reasons[f"{node}: attributes: nested too deeply to validate"] = None
    out = sorted(reasons)
    if len(out) > MAX_REASONS:
        out[MAX_REASONS:] = [f"{node}: (further reasons not shown)"]
    return out


def _reasons(error):
    """``path: message`` for one jsonschema error; missing and unexpected keys name the key."""
    path, kind, instance = list(error.absolute_path), error.validator, error.instance
    if kind == "required":
        for key in error.validator_value:
            if key not in instance:
                yield f"{_path([*path, key])}: required key is missing"
    elif kind == "additionalProperties" and error.validator_value is False:
        for key in instance:
            if key not in error.schema.get("properties", {}):
                yield f"{_path([*path, key])}: unexpected key"
    elif "propertyNames" in error.relative_schema_path:
        yield f"{_path([*path, instance])}: invalid key: {_describe(error)}"
    else:
        yield f"{_path(path)}: {_describe(error)}"


def _describe(error) -> str:
    kind, instance, value = error.validator, error.instance, error.validator_value
    if kind == "maxLength":
        return f"string of {len(instance)} characters is longer than {value}"
    if kind == "pattern":
        return f"{_short.repr(instance)} is not a {error.schema.get('description', repr(value))}"
    if kind == "format":  # date-time is the only format the schemas use
        return f"{_short.repr(instance)} is not an RFC 3339 {value} with an offset, like '2024-05-01T12:00:00+00:00'"
    if kind == "const":
        return f"expected {value!r}, got {_short.repr(instance)}"
    full = repr(instance)  # jsonschema quotes the whole value; keep the message, shorten the value
    return error.message.replace(full, _short.repr(instance)) if len(full) > 80 else error.message


def _path(parts) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            plain = isinstance(part, str) and len(part) <= 40 and part.isprintable()
            key = part if plain else _short.repr(part)
            out += f".{key}" if out else key
    return out or "attributes"
