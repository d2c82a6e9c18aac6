"""``koopkit spectrum`` and ``koopkit compare``: estimate, compare and test stored runs."""

from __future__ import annotations

import itertools
import math
import os

import click

from .options import json_option, parse_pairs, parse_value, print_json, store_argument, where_option


def estimator_options(f):
    """--estimator, --rank, --delays, --param and --series, shared by spectrum and compare."""
    decorators = [
        click.option(
            "--estimator", default="dmd", show_default=True, help="Registered estimator name."
        ),
        click.option(
            "--rank",
            default=None,
            help="Rank: an int, an energy fraction in (0, 1), 'gd' (Gavish-Donoho) or 'full'.",
        ),
        click.option(
            "--delays",
            type=int,
            default=None,
            help="Number of delays (delay-embedding estimators).",
        ),
        click.option(
            "--param",
            "params",
            multiple=True,
            metavar="KEY=VALUE",
            help="Any other estimator parameter (repeatable).",
        ),
        click.option(
            "--series",
            default="params",
            show_default=True,
            help="Series to analyse (params, grads, probes/NAME).",
        ),
        click.option(
            "--no-save", is_flag=True, help="Do not write the result to the store's analyses/."
        ),
        click.option(
            "-o",
            "--output",
            "figure",
            type=click.Path(dir_okay=False),
            default=None,
            callback=_check_figure_path,
            help="Write a figure (PNG/PDF/SVG).",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def _check_figure_path(ctx, param, path):
    """Refuse, before any work, a figure path whose folder is missing or whose format
    matplotlib cannot write."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.BadParameter(f"{path!r}: folder {folder!r} does not exist.", ctx, param)
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            raise click.BadParameter(
                f"{path!r}: matplotlib cannot write .{suffix} files; use one of "
                f"{', '.join('.' + f for f in sorted(formats))}.",
                ctx,
                param,
            )
    return path


def estimator_params(rank, delays, params) -> dict:
    out = parse_pairs(params, "--param")
    options = {}
    if rank is not None:
        options["rank"] = None if rank == "full" else parse_value(rank)
    if delays is not None:
        options["delays"] = delays
    twice = sorted(options.keys() & out.keys())
    if twice:  # one would silently win
        raise click.BadParameter(
            f"{twice[0]!r} is given as --{twice[0]} too.", param_hint="--param"
        )
    return {**out, **options}


def register(cli):
    @cli.command(name="spectrum")
    @store_argument
    @where_option
    @click.option(
        "--by",
        multiple=True,
        metavar="TAG",
        help="Fit runs sharing these tags jointly (default: one spectrum per run).",
    )
    @estimator_options
    @json_option
    def spectrum(store, where, by, estimator, rank, delays, params, series, no_save, figure, json_):
        """Estimate Koopman spectra of the runs of STORE."""
        from ..pipeline import estimate_groups, group_runs
        from ..plugins import lookup
        from ..store.location import check_writable
        from ..store.reader import open_store, parse_where

        lookup("estimator", estimator)
        opened = open_store(store)
        if not no_save:
            check_writable(store, "pass --no-save to analyse it without saving")
        groups = group_runs(opened, parse_where(where), by, None, series)
        est_params = estimator_params(rank, delays, params)
        results = estimate_groups(opened, groups, estimator, est_params, series, progress=not json_)
        if figure:
            from ..plots import plot_spectra

            def label(r):
                return " ".join(f"{k}={r.group.tags.get(k)}" for k in by) if by else r.group.runs[0]

            plot_spectra(
                [(label(r), r.spectrum) for r in results],
                figure,
                legend_title=" ".join(by) if by else "run",
            )
        if not no_save:
            from ..store.analyses import save_spectra

            analysis = save_spectra(
                store, results, estimator=(estimator, est_params), store=opened, series=series
            )
            click.echo(f"saved analyses/{analysis}", err=True)
        if json_:
            print_json({"spectra": [r.to_json() for r in results]})
            return
        for r in results:
            click.echo(f"{', '.join(r.group.runs)}  rank {r.spectrum.rank}")
            for z, res in zip(r.spectrum.eigenvalues, _residuals(r.spectrum), strict=True):
                click.echo(f"  {z.real:+.6f} {z.imag:+.6f}i  |λ|={abs(z):.6f}{res}")

    @cli.command(name="compare")
    @store_argument
    @click.option(
        "--by", required=True, metavar="TAG", help="Tag naming the condition (e.g. width)."
    )
    @click.option(
        "--replicate",
        default=None,
        metavar="TAG",
        help="Tag splitting each condition into replicates (e.g. seed).",
    )
    @where_option
    @estimator_options
    @click.option(
        "--metric", default="wasserstein", show_default=True, help="Registered metric name."
    )
    @click.option(
        "--test",
        "test",
        default="permutation",
        show_default=True,
        help="Registered test name, or 'none'.",
    )
    @click.option(
        "--n-perm",
        type=click.IntRange(min=1),
        default=None,
        help="Permutations/shuffles/draws of the test.",
    )
    @click.option(
        "--seed", type=click.IntRange(min=0), default=None, help="Seed of the test's random draws."
    )
    @json_option
    def compare(
        store,
        by,
        replicate,
        where,
        estimator,
        rank,
        delays,
        params,
        series,
        no_save,
        figure,
        metric,
        test,
        n_perm,
        seed,
        json_,
    ):
        """Compare the dynamics of the conditions of STORE: distances and p-values."""
        from ..pipeline import compare_store
        from ..plugins import lookup
        from ..store.location import check_writable
        from ..store.reader import open_store, parse_where

        test = None if test == "none" else test
        test_params = {}
        if n_perm is not None:
            test_params[{"eigen-swap": "n_shuffles", "bootstrap": "n_boot"}.get(test, "n_perm")] = (
                n_perm
            )
        if seed is not None:
            test_params["seed"] = seed
        where = parse_where(where)
        est_params = estimator_params(rank, delays, params)
        for kind, name in (("estimator", estimator), ("metric", metric), ("test", test)):
            if name:
                lookup(kind, name)  # unknown names fail before the store is opened
        opened = open_store(store)
        if not no_save:
            check_writable(store, "pass --no-save to analyse it without saving")
        result = compare_store(
            opened,
            by,
            replicate=replicate,
            where=where,
            estimator=estimator,
            estimator_params=est_params,
            metric=metric,
            test=test,
            test_params=test_params,
            series=series,
            save=False,  # saved below, once the figure is written: a failure leaves no analysis
            progress=not json_,
        )
        if result.note:
            click.echo(f"note: {result.note}", err=True)
        if figure:
            from ..plots import plot_comparison

            plot_comparison(result, figure)
        if not no_save:
            from ..store.analyses import save_comparison

            analysis = save_comparison(
                opened.url,
                result,
                by=by,
                replicate=replicate,
                estimator=(estimator, est_params),
                metric=(metric, None),
                test=(test, test_params),
                store=opened,
                series=series,
            )
            click.echo(f"saved analyses/{analysis}", err=True)
        if json_:
            print_json(result.to_json())
            return
        _print_comparison(result)


def _residuals(spectrum):
    if spectrum.residuals is None:
        return [""] * spectrum.rank
    return [f"  residual={r:.2e}" for r in spectrum.residuals]


def _number(value, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _print_comparison(result):
    names = result.conditions
    width = max(8, *(len(n) for n in names)) + 2
    click.echo("mean distance (std) between conditions:")
    click.echo(" " * width + "".join(f"{n:>{width + 10}}" for n in names))
    for i, a in enumerate(names):
        row = "".join(
            f"{_number(result.distance_mean[i, j], '.4g'):>{width}} "
            f"({_number(result.distance_std[i, j], '.2g')})"
            for j in range(len(names))
        )
        click.echo(f"{a:<{width}}{row}")
    if result.test_name and not result.note:
        pairs = list(itertools.combinations(range(len(names)), 2))
        if result.calibrated:
            click.echo(f"\n{result.test_name} test (n={result.n_perm}), p-values (Holm-corrected):")
            for i, j in pairs:
                click.echo(
                    f"  {names[i]} vs {names[j]}: p={_number(result.p_value[i, j], '.4g')}  "
                    f"(Holm {_number(result.p_value_holm[i, j], '.4g')})"
                )
        else:
            click.echo(
                f"\n{result.test_name} (n={result.n_perm}): uncalibrated p, a score that is not a "
                "p-value (no size guarantee), so not Holm-corrected:"
            )
            for i, j in pairs:
                click.echo(
                    f"  {names[i]} vs {names[j]}: "
                    f"uncalibrated p={_number(result.p_value[i, j], '.4g')}"
                )
