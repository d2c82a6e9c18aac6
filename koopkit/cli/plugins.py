"""``koopkit plugins [--json]``: every registered estimator, metric and test."""

from __future__ import annotations

import click

from .options import json_option, print_json


def register(cli):
    @cli.command(name="plugins")
    @json_option
    def plugins(json_):
        """List registered estimators, metrics and tests with their plugin and version."""
        from ..plugins import list_plugins

        entries = list_plugins()
        if json_:
            print_json(entries)
            return
        for e in entries:
            source = e["package"] or e["plugin"]
            version = f" {e['version']}" if e["version"] else ""
            click.echo(
                f"{e['kind']:<10} {e['name']:<18} {source}{version}  {e.get('description', '')}".rstrip()
            )
