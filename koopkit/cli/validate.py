"""``koopkit validate STORE``: schemas and structure; exit 1 with the reasons."""

from __future__ import annotations

import sys

import click

from .options import store_argument

INCOMPLETE = "store could not be read completely"  # validate_store's reason when it stopped


def register(cli):
    @cli.command(name="validate")
    @store_argument
    def validate(store):
        """Check STORE against the format's schemas and structural rules."""
        from ..store.reader import unreadable_metadata
        from ..store.validate import validate_store

        reasons, runs = validate_store(store)
        if any(reason.startswith(INCOMPLETE) for reason in reasons):
            # the check stopped at a node zarr cannot read: name its document instead
            named = unreadable_metadata(store)
            if named:
                reasons = [named[0] if r.startswith(INCOMPLETE) else r for r in reasons]
        if reasons:
            for reason in reasons:
                click.echo(f"invalid: {reason}", err=True)
            sys.exit(1)
        click.echo(f"valid: {store} ({runs} run(s))")
