"""Options shared by several commands, defined once."""

from __future__ import annotations

import json

import click

from ..strict_json import json_safe

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
        if key in out:  # the last would silently win
            raise click.BadParameter(f"{key!r} is given twice.", param_hint=what)
        value = parse_value(value)
        if not isinstance(value, str | int | float | bool) and value is not None:
            value = json.dumps(value)
        out[key] = value
    return out


def print_json(data) -> None:
    """Strict JSON on stdout: NaN and Infinity become ``null`` (``allow_nan=False`` guards it)."""
    click.echo(json.dumps(json_safe(data), indent=2, default=str, allow_nan=False))
