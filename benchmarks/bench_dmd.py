"""1. Exact DMD, rank 20: koopkit vs PyDMD ``DMD(svd_rank=20, exact=True)`` vs deeptime
``DMD('exact', rank=20)`` on a random walk of ``features x steps``, float64 and float32.

Targets (full size, 200 000 x 500): >= 10x faster than PyDMD, peak extra memory <= 1/5 of
PyDMD's, float64 eigenvalues equal to PyDMD's to 1e-8, float32 input never copied whole to
float64 (peak extra well below the input's size).

Also, with no target, a walk that moves 1e-4 of its size a step, as weights under SGD do:
its 20th singular value is below what the Gram resolves (about 1.5e-4 of the largest), so
koopkit factors the snapshots by CholeskyQR instead (the ``qr`` method): after the Gram,
one more pass over the data (CholeskyQR2), or two where that is not enough.
"""

from __future__ import annotations

import importlib.util

from common import (
    CaseFailed,
    Result,
    available_ram_bytes,
    complex_from_json,
    complex_to_json,
    max_eig_error,
    measure,
    median,
    random_walk,
    run_case,
    skipped,
)

NAME = "dmd"
SIZES = {"tiny": (100, 5_000), "small": (500, 50_000), "full": (500, 200_000)}  # steps, features
RANK = 20
LIBRARIES = {  # case name -> module it needs
    "PyDMD": "pydmd",
    "deeptime": "deeptime",
    "koopkit": "koopkit",
    "koopkit + modes": "koopkit",
}
PEER_BUDGET = 120  # seconds of timed calls after which a case stops repeating
TARGET = ">= 10x faster than PyDMD, peak extra <= 1/5 PyDMD's"


DATASETS = [  # (dtype, how far the walk moves a step, label suffix)
    ("float64", 0.01, ""),
    ("float32", 0.01, ""),
    ("float64", 1e-4, ", steps 1e-4"),
]


def case(library: str, steps: int, features: int, dtype: str, repeat: int, move=0.01) -> dict:
    """Fit ``repeat`` times in this (fresh) process; data generated outside the timed part."""
    data = random_walk(steps, features, dtype, move=move)  # (steps, features), C order
    method = {}
    if library == "PyDMD":
        from pydmd import DMD

        data = data.T.copy()  # PyDMD's layout: (features, snapshots)

        def fit(data=data):
            return DMD(svd_rank=RANK, exact=True).fit(data).eigs

        fit(data[:2000])  # warm-up: imports and first-call costs, on a slice

    elif library == "deeptime":
        from deeptime.decomposition import DMD

        def fit(data=data):
            model = DMD("exact", rank=RANK).fit((data[:-1], data[1:])).fetch_model()
            return model.eigenvalues

        fit(data[:, :2000])

    else:
        import koopkit

        modes = library == "koopkit + modes"

        def fit(data=data):
            spectrum = koopkit.estimate(data, "dmd", rank=RANK, modes=modes)
            method["method"] = spectrum.meta["method"]
            if modes:
                spectrum.get_modes()
            return spectrum.eigenvalues

        fit(data[:, :2000])

    times, peak, eigenvalues = measure(fit, repeat, budget=PEER_BUDGET)
    return {
        "times": times,
        "peak_mib": peak,
        "input_mib": data.nbytes / 2**20,
        "eigenvalues": complex_to_json(eigenvalues),
        **method,
    }


def run(size: str, repeat: int) -> list[Result]:
    steps, features = SIZES[size]
    results = []
    for dtype, move, suffix in DATASETS:
        label = f"{features} x {steps} {dtype}{suffix}"
        out = {}
        for library, module in LIBRARIES.items():
            case_name = f"{library}, {label}"
            if importlib.util.find_spec(module) is None:
                results.append(skipped(NAME, case_name, f"{module} is not installed"))
                continue
            need = 4 * steps * features * 8  # the peers hold about 3x the data in float64
            ram = available_ram_bytes()
            if library in ("PyDMD", "deeptime") and ram is not None and need > ram:
                results.append(skipped(NAME, case_name, f"needs ~{need / 2**30:.0f} GiB of RAM"))
                continue
            try:
                out[library] = run_case(
                    "bench_dmd",
                    "case",
                    library=library,
                    steps=steps,
                    features=features,
                    dtype=dtype,
                    repeat=repeat,
                    move=move,
                )
            except CaseFailed as exc:
                results.append(Result(NAME, case_name, note=f"failed: {exc}"))
                continue
            results.append(_row(case_name, library, out, dtype, targets=move == 0.01))
        results.extend(_accuracy_rows(out, dtype, label))
    return results


def _row(case_name, library, out, dtype, targets=True) -> Result:
    mine = out[library]
    row = Result(NAME, case_name, median(mine["times"]), mine["times"], mine["peak_mib"])
    peer = out.get("PyDMD")
    if not library.startswith("koopkit"):
        return row
    notes = [f"method {mine['method']}"]
    if targets:
        row.target = TARGET + (
            "; float32 kept (peak extra < input/2)" if dtype == "float32" else ""
        )
    if peer is None:
        row.note = "; ".join([*notes, "no PyDMD to compare"])
        return row
    row.ratio = median(peer["times"]) / row.median_s
    row.vs = "{ratio:.1f}x faster than PyDMD"
    memory = None
    if mine["peak_mib"] is not None and peer["peak_mib"]:
        memory = mine["peak_mib"] / peer["peak_mib"]
        notes.append(f"memory {memory:.3f}x PyDMD's")
    if "deeptime" in out:
        notes.append(f"{median(out['deeptime']['times']) / row.median_s:.1f}x faster than deeptime")
    row.note = "; ".join(notes)
    if not targets:
        return row
    row.met = row.ratio >= 10 and memory is not None and memory <= 0.2
    if dtype == "float32":
        row.met = row.met and mine["peak_mib"] < mine["input_mib"] / 2
    return row


def _accuracy_rows(out, dtype, label) -> list[Result]:
    """Largest eigenvalue difference from PyDMD; the 1e-8 target is for float64."""
    if "PyDMD" not in out:
        return []
    reference = complex_from_json(out["PyDMD"]["eigenvalues"])
    rows = []
    for library in ("koopkit", "deeptime"):
        if library not in out:
            continue
        error = max_eig_error(complex_from_json(out[library]["eigenvalues"]), reference)
        row = Result(NAME, f"eigenvalues {library} vs PyDMD, {label}", ratio=error)
        row.vs = "max |dlambda| {ratio:.1e}"
        if library == "koopkit" and dtype == "float64":
            row.target, row.met = "<= 1e-8", error <= 1e-8
        rows.append(row)
    return rows
