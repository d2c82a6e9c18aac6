"""``koopkit info STORE``: runs, tags, series, committed steps, sizes, status."""

from __future__ import annotations

import click

from .options import json_option, print_json, store_argument


def describe(store) -> dict:
    """The summary ``info`` prints; reads metadata and step rows only, through ``store.nodes``."""
    runs = []
    for run_id, info in store.runs.items():
        series = {}
        problems = list(info.problems)
        for path in info.series:
            value = store.nodes.array(f"runs/{run_id}/{path}/value")
            step = store.nodes.array(f"runs/{run_id}/{path}/step")
            rows = min(value.shape[0] if value.shape else 0, step.shape[0] if step.shape else 0)
            committed = info.committed(path)
            if committed > rows:  # a reader never goes past the rows written: neither does info
                problems.append(
                    f"{path}: committed_steps is {committed} but only {rows} rows are written"
                )
                committed = rows
            span = store.step_span(run_id, path)
            series[path] = {
                "committed": committed,
                "shape": [committed, *value.shape[1:]],
                "dtype": value.dtype,
                "first_step": None if span is None else span[0],
                "last_step": None if span is None else span[1],
            }
        runs.append(
            {
                "run_id": run_id,
                "status": info.status,
                "tags": info.tags,
                "created": info.attrs.get("created"),
                "committed_steps": info.attrs.get("committed_steps", {}),
                "dropped": info.attrs.get("dropped", 0),
                "nonfinite": info.attrs.get("nonfinite", {}),
                "nonfinite_count": info.attrs.get("nonfinite_count", {}),
                "series": series,
                "problems": problems,
            }
        )
    return {
        "store": store.url,
        "format": store.attrs.get("koopkit"),
        "runs": runs,
        "analyses": store.analyses,
    }


def register(cli):
    @cli.command(name="info")
    @store_argument
    @json_option
    def info(store, json_):
        """List the runs of STORE with their tags, series and committed steps."""
        from ..store.reader import summarize

        summary = summarize(store, describe)  # a local store: JSON documents only, no zarr
        if json_:
            print_json(summary)
            return
        fmt = summary["format"]
        click.echo(
            f"{summary['store']}: koopkit {fmt['format']} v{fmt['version']}, {len(summary['runs'])} run(s)"
        )
        for run in summary["runs"]:
            tags = " ".join(f"{k}={v}" for k, v in run["tags"].items()) or "-"
            click.echo(f"\n{run['run_id']}  [{run['status']}]  tags: {tags}")
            for path, s in run["series"].items():
                span = (
                    ""
                    if s["first_step"] is None
                    else f"  steps {s['first_step']}..{s['last_step']}"
                )
                shape = " x ".join(str(d) for d in s["shape"])
                click.echo(
                    f"  {path:<22} {s['committed']:>7} committed  ({shape} {s['dtype']}){span}"
                )
            if run["dropped"]:
                click.echo(f"  dropped snapshots: {run['dropped']}")
            for problem in run["problems"][:3]:
                click.echo(f"  invalid: {problem}")
            nonfinite = run["nonfinite"] if isinstance(run["nonfinite"], dict) else {}
            counts = run["nonfinite_count"] if isinstance(run["nonfinite_count"], dict) else {}
            for path, steps in nonfinite.items():
                if isinstance(steps, list):  # anything else is a schema problem: validate names it
                    # the list stops at 100 steps; the count does not
                    count = counts.get(path, len(steps))
                    click.echo(f"  NaN/Inf in {path} at {count} step(s), first {steps[:5]}")
        if summary["analyses"]:
            click.echo(f"\nanalyses: {', '.join(summary['analyses'])}")
