"""The ``koopkit`` command: parse, call the library, print. Errors become one line on stderr."""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import KoopkitError

EXAMPLE = """\b
Record inside a training loop (Python), then analyse from the shell:
  koopkit info runs.zarr
  koopkit spectrum runs.zarr --where width=40 --estimator dmd --rank 10
  koopkit compare runs.zarr --by width --replicate seed --test permutation
  koopkit demo --out koopkit-demo
"""


class KoopkitGroup(click.Group):
    """Turns library errors into one line and an exit code; ``--debug`` shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (
            click.exceptions.Exit,
            click.ClickException,
            click.Abort,
            SystemExit,
            BrokenPipeError,
        ):
            raise
        except Exception as exc:
            if ctx.meta.get("koopkit.debug") or os.environ.get("KOOPKIT_DEBUG"):
                raise
            if isinstance(exc, KoopkitError):
                message = str(exc)
            else:
                message = (
                    f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
                )
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)


@click.group(
    cls=KoopkitGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLE
)
@click.version_option(__version__, prog_name="koopkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """Record training trajectories into Zarr and compare their dynamics with Koopman spectra."""
    ctx.meta["koopkit.debug"] = debug


def _register_commands():
    from . import analyse, demo, importing, info, plugins, validate

    for module in (info, validate, importing, plugins, analyse, demo):
        module.register(cli)
    from ..plugins import get_plugin_manager

    get_plugin_manager().hook.koopkit_register_commands(cli=cli)


_register_commands()


def main():
    try:
        cli(prog_name="koopkit")
    except BrokenPipeError:
        # The reader of our output went away (``koopkit plugins | head``): exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
