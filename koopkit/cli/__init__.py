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
    """Turns library errors into one line and an exit code; ``--debug`` shows the traceback.

    Plugin commands are added on first use, so plugins load while the CLI runs (their
    warnings print as one line) rather than when the module is imported.
    """

    _plugin_commands_added = False

    def _add_plugin_commands(self):
        if not self._plugin_commands_added:
            self._plugin_commands_added = True
            from ..plugins import add_commands

            add_commands(self)

    def get_command(self, ctx, name):
        self._add_plugin_commands()
        command = super().get_command(ctx, name)
        if command is not None:
            _accept_debug(command)
        return command

    def list_commands(self, ctx):
        self._add_plugin_commands()
        return super().list_commands(ctx)

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
            elif isinstance(exc, OSError) and exc.strerror:
                # a file the user named cannot be read or written: their problem, not a bug
                where = exc.filename if exc.filename is not None else ""
                message = f"{exc.strerror}: {where!r}" if where else exc.strerror
            else:
                message = (
                    f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
                )
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)


def _set_debug(ctx, param, value):
    if value:
        ctx.meta["koopkit.debug"] = True  # meta is shared by the whole context chain


def _accept_debug(command) -> None:
    """Let ``--debug`` also follow the subcommand (``koopkit info x --debug``)."""
    if not any(p.name == "debug" for p in command.params):
        command.params.append(
            click.Option(
                ["--debug"],
                is_flag=True,
                expose_value=False,
                hidden=True,
                callback=_set_debug,
                help="Show full tracebacks instead of one-line errors.",
            )
        )
    if isinstance(command, click.Group):
        for child in command.commands.values():
            _accept_debug(child)


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


_register_commands()


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings from the CLI as one line on stderr, without source locations."""
    text = " ".join(str(message).split())
    print(f"Warning: {text}", file=sys.stderr if file is None else file)


def main():
    import warnings

    warnings.showwarning = _one_line_warning
    try:
        cli(prog_name="koopkit")
    except BrokenPipeError:
        # The reader of our output went away (``koopkit plugins | head``): exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
