"""``koopkit demo``: the main job end to end on built-in data, in a few minutes on a CPU.

Experiment 1 (OMD / OGD / bisection) in full and a reduced experiment 2 (network widths on
the bundled digits): record with the Recorder, estimate Hankel-DMD spectra, compare them
with Wasserstein distances and permutation tests, and write a store, figures and a summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import fcn, optimizers

ALPHA = 0.05


def verdict(p_holm: float) -> str:
    if np.isnan(p_holm):
        return "untested"
    if p_holm < ALPHA:
        return "not conjugate"
    return "conjugate (not separated)"


def _pairs(comparison) -> list[dict]:
    return [{**pair, "verdict": verdict(pair["p_value_holm"])} for pair in comparison.pairs()]


def _pooled(comparison) -> dict:
    names = comparison.conditions
    return {
        f"{names[i]}-{names[j]}": float(comparison.distance_mean[i, j])
        for i in range(len(names))
        for j in range(i + 1, len(names))
    }


def run_demo(out, quick: bool = False, progress=print) -> dict:
    """Run both experiments into ``out``; returns the summary also written to summary.json."""
    from ..plots import plot_comparison

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "runs.zarr"
    if store.exists():
        raise FileExistsError(f"{str(store)!r} already exists; choose another --out or remove it.")
    start = time.perf_counter()

    progress("experiment 1: online mirror descent vs online gradient descent vs bisection")
    optimizers.record(store, progress=progress)
    opt_cmp, opt_pooled = optimizers.analyse(store, n_perm=10_000)
    plot_comparison(opt_cmp, out / "optimizers.png")

    progress("experiment 2: fully connected networks of widths 5, 10, 40 on the digits")
    seeds, inits, steps = ((0, 1, 2), 3, 200) if quick else ((0, 1, 2, 3), 5, 300)
    fcn.record(store, seeds=seeds, inits=inits, steps=steps, progress=progress)
    fcn_cmp = fcn.analyse(store, delays=8, rank=10, n_perm=10_000)
    plot_comparison(fcn_cmp, out / "fcn.png")

    summary = {
        "store": str(store),
        "optimizers": {
            "pairs": _pairs(opt_cmp),
            "pooled_distance": _pooled(opt_pooled),
            "paper_pooled_distance": {
                "bisection-ogd": 0.7534,
                "bisection-omd": 0.7460,
                "ogd-omd": 0.00807,
            },
        },
        "fcn": {"seeds": list(seeds), "inits": inits, "steps": steps, "pairs": _pairs(fcn_cmp)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.txt").write_text(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = ["koopkit demo", ""]
    lines.append(
        "Experiment 1: OMD vs OGD vs bisection (Hankel DMD, 4 delays; replicates = grid rows)"
    )
    for pair in summary["optimizers"]["pairs"]:
        lines.append(_pair_line(pair))
    pooled = summary["optimizers"]["pooled_distance"]
    paper = summary["optimizers"]["paper_pooled_distance"]
    lines.append("  pooled over all 25 starts (paper in brackets):")
    for key, value in pooled.items():
        lines.append(f"    W({key}) = {value:.4g}  [{paper.get(key, float('nan')):.4g}]")
    fc = summary["fcn"]
    lines += [
        "",
        f"Experiment 2: widths 5/10/40 on digits ({len(fc['seeds'])} seeds x {fc['inits']} inits, {fc['steps']} steps)",
    ]
    for pair in fc["pairs"]:
        lines.append(_pair_line(pair))
    lines += ["", f"store: {summary['store']}   time: {summary['seconds']} s"]
    return "\n".join(lines) + "\n"


def _pair_line(pair) -> str:
    a, b = pair["pair"]
    return f"  {a} vs {b}: W = {pair['distance']:.4g}, p = {pair['p_value']:.3g} (Holm {pair['p_value_holm']:.3g}) -> {pair['verdict']}"
