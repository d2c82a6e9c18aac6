"""``koopkit demo [--out DIR]``: the main job end to end on built-in data."""

from __future__ import annotations

import click


def register(cli):
    @cli.command(name="demo")
    @click.option(
        "--out",
        default="koopkit-demo",
        show_default=True,
        type=click.Path(file_okay=False),
        help="Folder for the store, figures and summary.",
    )
    @click.option("--quick", is_flag=True, help="A smaller experiment 2 (for tests).")
    def demo(out, quick):
        """Reproduce the OMD/OGD/bisection conjugacy test and compare network widths."""
        from ..errors import KoopkitError
        from ..experiments.demo import format_summary, run_demo

        try:
            summary = run_demo(out, quick=quick, progress=lambda m: click.echo(m, err=True))
        except OSError as exc:
            if exc.filename is not None and exc.strerror:  # the system refused a path
                raise KoopkitError(
                    f"Cannot write {exc.filename!r} (--out): {exc.strerror}."
                ) from exc
            raise KoopkitError(str(exc)) from exc  # run_demo's own refusal, already worded
        click.echo(format_summary(summary), nl=False)
        click.echo(f"figures and summary in {out}/", err=True)
