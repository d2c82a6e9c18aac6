"""``koopkit validate STORE``: schemas and structure; exit 1 with the reasons."""

from __future__ import annotations

import sys

import click

from .options import store_argument


def register(cli):
    @cli.command(name="validate")
    @store_argument
    def validate(store):
        """Check STORE against the format's schemas and structural rules."""
        from ..store.validate import validate_store

        reasons, runs = validate_store(store)
        if reasons:
            for reason in reasons:
                click.echo(f"invalid: {reason}", err=True)
            sys.exit(1)
        click.echo(f"valid: {store} ({runs} run(s))")
