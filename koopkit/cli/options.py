"""Options shared by several commands, defined once."""

from __future__ import annotations

import json
import math

import click

store_argument = click.argument("store", metavar="STORE")
json_option = click.option(
    "--json", "json_", is_flag=True, help="Print machine-readable JSON to stdout."
)
where_option = click.option(
    "--where",
    multiple=True,
    metavar="TAG=VALUE",
    help="Keep runs whose tag equals the value (repeatable).",
)


def parse_value(text: str):
    """'40' -> 40, '0.1' -> 0.1, 'true' -> True, anything else stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(items, what: str = "--tag") -> dict:
    """``["width=40", "opt=sgd"]`` -> ``{"width": 40, "opt": "sgd"}``."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE.", param_hint=what)
        value = parse_value(value)
        if not isinstance(value, str | int | float | bool) and value is not None:
            value = json.dumps(value)
        out[key] = value
    return out


def print_json(data) -> None:
    """Strict JSON on stdout: NaN and Infinity become ``null`` (``allow_nan=False`` guards it)."""
    click.echo(json.dumps(_strict(data), indent=2, default=str, allow_nan=False))


def _strict(value):
    """NaN and Inf floats as None, numpy values as Python ones (without importing numpy)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _strict(value.tolist())
    return value
