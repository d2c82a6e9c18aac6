"""``koopkit demo``: the main job end to end on built-in data, in a few minutes on a CPU.

Experiment 1 (OMD / OGD / bisection) in full and a reduced experiment 2 (network widths on
the bundled digits): record with the Recorder, estimate Hankel-DMD spectra, compare them
with Wasserstein distances and permutation tests, and write a store, figures and a summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..results import json_safe
from . import fcn, optimizers

ALPHA = 0.05
OUTPUTS = ("runs.zarr", "optimizers.png", "fcn.png", "summary.json", "summary.txt")
"""Everything a demo writes into its folder."""


def replicates(comparison) -> dict[str, int]:
    """The number of spectra (replicates) of each condition."""
    counts = dict.fromkeys(comparison.conditions, 0)
    for r in comparison.spectra:
        counts[str(r.group.condition)] += 1
    return counts


def smallest_p_holm(comparison) -> float:
    """The smallest Holm-corrected p-value the comparison's permutation tests can give.

    An exact test of :math:`n_a + n_b` replicates has :math:`\\binom{n_a + n_b}{n_a}`
    arrangements, and with equal sizes the label swap ties every value, so its p is at least
    :math:`2 / \\binom{n_a + n_b}{n_a}` (:math:`1 / \\binom{\\cdot}{\\cdot}` otherwise); a
    sampled one is at least :math:`1 / (1 + n_{perm})`. Holm multiplies the smallest of
    :math:`m` p-values by :math:`m`, so no pair can go below :math:`m` times the smallest
    attainable p, whatever the data. NaN when nothing was tested.
    """
    counts = replicates(comparison)
    floors = []
    for (a, b), result in comparison.tests.items():
        if np.isnan(result.p_value):
            continue
        if result.exact:
            ties = 2 if counts[a] == counts[b] else 1
            floors.append(ties / result.n_perm)
        else:
            floors.append(1 / (1 + result.n_perm))
    if not floors:
        return float("nan")
    return min(1.0, len(floors) * min(floors))


def verdict(p_holm: float, floor: float = 0.0, n_replicates: str = "") -> str:
    """What a Holm-corrected p-value says at level ALPHA, given the smallest one attainable.

    A test that cannot reject says nothing about conjugacy: when even the most extreme data
    could not reach ALPHA the verdict says so, and otherwise non-rejection is "not
    separated" (no evidence of a difference), never "conjugate".
    """
    if np.isnan(p_holm):
        return "untested"
    if p_holm < ALPHA:
        return "not conjugate"
    if floor >= ALPHA:
        return (
            f"cannot be separated with {n_replicates or 'these'} replicates "
            f"(smallest possible Holm p {floor:.3g})"
        )
    return "not separated"


def _pairs(comparison) -> list[dict]:
    floor = smallest_p_holm(comparison)
    counts = replicates(comparison)
    out = []
    for pair in comparison.pairs():
        a, b = pair["pair"]
        n = str(counts[a]) if counts[a] == counts[b] else f"{counts[a]} + {counts[b]}"
        out.append({**pair, "verdict": verdict(pair["p_value_holm"], floor, n)})
    return out


def _pooled(comparison) -> dict:
    names = comparison.conditions
    return {
        f"{names[i]}-{names[j]}": float(comparison.distance_mean[i, j])
        for i in range(len(names))
        for j in range(i + 1, len(names))
    }


def run_demo(out, quick: bool = False, progress=print) -> dict:
    """Run both experiments into ``out``; returns the summary also written to summary.json.

    Refuses before any work if one of its OUTPUTS exists, and a demo that fails removes what
    it created (the outputs and the folders it made), so the same command can run again.
    """
    out = Path(out).resolve()  # "new/../d" would hide an existing d from the checks
    for name in OUTPUTS:
        if os.path.lexists(out / name):  # a dangling link too: writing would follow it
            raise FileExistsError(
                f"{str(out / name)!r} already exists; choose another --out or remove it."
            )
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    try:
        return _run(out, quick, progress)
    except BaseException:
        _remove(out, made)
        raise


def _remove(out: Path, made: list[Path]) -> None:
    """Remove the outputs (none existed before the demo) and the folders it made, if empty."""
    for path in (out / name for name in OUTPUTS):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()
    for folder in made:  # deepest first; one that holds anything else stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def _run(out: Path, quick: bool, progress) -> dict:
    from ..plots import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    store, opt_figure, fcn_figure, summary_json, summary_txt = (out / name for name in OUTPUTS)
    start = time.perf_counter()

    progress("experiment 1: online mirror descent vs online gradient descent vs bisection")
    optimizers.record(store, progress=progress)
    opt_cmp, opt_pooled = optimizers.analyse(store, n_perm=10_000)
    plot_comparison(opt_cmp, opt_figure)

    progress("experiment 2: fully connected networks of widths 5, 10, 40 on the digits")
    # 5 seeds per width: 252 arrangements, so the smallest Holm p over 3 pairs is
    # 3 * 2/252 = 0.024 < 0.05; with 4 seeds it would be 3 * 2/70 = 0.086, and no pair
    # could ever be separated.
    seeds, inits, steps = ((0, 1, 2), 3, 200) if quick else ((0, 1, 2, 3, 4), 5, 300)
    fcn.record(store, seeds=seeds, inits=inits, steps=steps, progress=progress)
    fcn_cmp = fcn.analyse(store, delays=8, rank=10, n_perm=10_000)
    plot_comparison(fcn_cmp, fcn_figure)

    summary = {
        "store": str(store),
        "optimizers": {
            "pairs": _pairs(opt_cmp),
            "smallest_p_holm": smallest_p_holm(opt_cmp),
            "pooled_distance": _pooled(opt_pooled),
            "paper_pooled_distance": {
                "bisection-ogd": 0.7534,
                "bisection-omd": 0.7460,
                "ogd-omd": 0.00807,
            },
        },
        "fcn": {
            "seeds": list(seeds),
            "inits": inits,
            "steps": steps,
            "pairs": _pairs(fcn_cmp),
            "smallest_p_holm": smallest_p_holm(fcn_cmp),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    summary_json.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    summary_txt.write_text(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = ["koopkit demo", ""]
    lines.append(
        "Experiment 1: OMD vs OGD vs bisection (Hankel DMD, 4 delays; replicates = grid rows)"
    )
    for pair in summary["optimizers"]["pairs"]:
        lines.append(_pair_line(pair))
    lines += _floor_lines(summary["optimizers"])
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
    lines += _floor_lines(fc)
    lines += ["", f"store: {summary['store']}   time: {summary['seconds']} s"]
    return "\n".join(lines) + "\n"


def _floor_lines(experiment: dict) -> list[str]:
    floor = experiment.get("smallest_p_holm")
    if floor is None or np.isnan(floor):
        return []
    return [f"  (smallest Holm p these replicates allow: {floor:.3g}; alpha = {ALPHA})"]


def _pair_line(pair) -> str:
    a, b = pair["pair"]
    p, holm = (
        "-" if x is None or np.isnan(x) else f"{x:.3g}"
        for x in (pair["p_value"], pair["p_value_holm"])
    )
    return f"  {a} vs {b}: W = {pair['distance']:.4g}, p = {p} (Holm {holm}) -> {pair['verdict']}"
