"""``koopkit import npy|torch SRC STORE --run ID``: bring existing trajectories into a store."""

from __future__ import annotations

import click

run_option = click.option(
    "--run", "run_id", required=True, help="Run id to create, e.g. 'fcn/h40/seed2'."
)
tag_option = click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the run (repeatable)."
)


def register(cli):
    @cli.group(name="import")
    def import_():
        """Import .npy arrays or folders of torch state dicts as runs."""

    @import_.command(name="npy")
    @click.argument("source", type=click.Path(dir_okay=False))
    @click.argument("store")
    @run_option
    @tag_option
    def import_npy(source, store, run_id, tags):
        """Import SOURCE, a (steps, features) .npy array, into STORE as one run."""
        from ..store.importers import import_npy as run_import
        from .options import parse_pairs

        rows = run_import(source, store, run_id, tags=parse_pairs(tags))
        click.echo(f"imported {rows} steps into {store} as run {run_id!r}", err=True)

    @import_.command(name="torch")
    @click.argument("source", type=click.Path(file_okay=False))
    @click.argument("store")
    @run_option
    @tag_option
    @click.option("--params", default=None, help="Regex selecting tensors by name (default: all).")
    def import_torch(source, store, run_id, tags, params):
        """Import SOURCE, a folder of torch.save state dicts (one per step), into STORE."""
        from ..store.importers import import_torch as run_import
        from .options import parse_pairs

        rows = run_import(source, store, run_id, tags=parse_pairs(tags), params=params)
        click.echo(f"imported {rows} checkpoints into {store} as run {run_id!r}", err=True)
