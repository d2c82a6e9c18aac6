"""2. Delay-embedded (Hankel) DMD: koopkit ``hankel-dmd`` vs PyDMD ``HankelDMD(d=32)``.

PyDMD's ``d`` counts the snapshots in a window, koopkit's ``delays`` the shifts, so PyDMD
``d=32`` is koopkit ``delays=31``: the same embedded matrix, compared for time and
eigenvalues (rank 20, exact modes). The delay cost is koopkit ``delays=32`` against
``delays=0``. Targets (full size, 20 000 features x 1 000 steps): >= 20x faster than PyDMD;
32 delays <= 1.5x the time of none.
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

NAME = "hankel"
SIZES = {"tiny": (100, 300, 8), "small": (500, 2000, 32), "full": (1000, 20_000, 32)}
RANK = 20
PEER_BUDGET = 120  # seconds of timed calls after which a case stops repeating


def case(library: str, steps: int, features: int, window: int, delays: int, repeat: int) -> dict:
    data = random_walk(steps, features)
    if library == "PyDMD":
        from pydmd import HankelDMD

        data = data.T.copy()  # (features, snapshots)

        def fit(data=data):
            return HankelDMD(svd_rank=RANK, exact=True, d=window).fit(data).eigs

        fit(data[:50])  # warm-up on a slice
    else:
        import koopkit

        def fit(data=data):
            return koopkit.estimate(data, "hankel-dmd", delays=delays, rank=RANK).eigenvalues

        fit(data[:, :50])
    times, peak, eigenvalues = measure(fit, repeat, budget=PEER_BUDGET)
    return {"times": times, "peak_mib": peak, "eigenvalues": complex_to_json(eigenvalues)}


def run(size: str, repeat: int) -> list[Result]:
    steps, features, window = SIZES[size]
    label = f"{features} x {steps}"
    cases = {
        f"PyDMD HankelDMD(d={window})": ("PyDMD", window - 1),
        f"koopkit delays={window - 1} (= PyDMD d={window})": ("koopkit", window - 1),
        "koopkit delays=0": ("koopkit", 0),
        f"koopkit delays={window}": ("koopkit", window),
    }
    out, results = {}, []
    for name, (library, delays) in cases.items():
        case_name = f"{name}, {label}"
        if library == "PyDMD":
            if importlib.util.find_spec("pydmd") is None:
                results.append(skipped(NAME, case_name, "pydmd is not installed"))
                continue
            need = 3 * window * features * steps * 8  # embedded matrix, its U, and more
            ram = available_ram_bytes()
            if ram is not None and need > ram:
                results.append(skipped(NAME, case_name, f"needs ~{need / 2**30:.0f} GiB of RAM"))
                continue
        try:
            out[name] = run_case(
                "bench_hankel",
                "case",
                library=library,
                steps=steps,
                features=features,
                window=window,
                delays=delays,
                repeat=repeat,
            )
        except CaseFailed as exc:
            results.append(Result(NAME, case_name, note=f"failed: {exc}"))
            continue
        times = out[name]["times"]
        results.append(Result(NAME, case_name, median(times), times, out[name]["peak_mib"]))

    names = list(cases)
    peer, same, none, many = (out.get(n) for n in names)
    rows = {r.case.rsplit(",", 1)[0]: r for r in results}
    if same is not None:
        row = rows[names[1]]
        row.target = ">= 20x faster than PyDMD"
        if peer is not None:
            row.ratio = median(peer["times"]) / row.median_s
            row.vs, row.met = "{ratio:.1f}x faster than PyDMD", row.ratio >= 20
            error = max_eig_error(
                complex_from_json(same["eigenvalues"]), complex_from_json(peer["eigenvalues"])
            )
            row.note = f"max |dlambda| vs PyDMD {error:.1e}"
            row.extra["eigenvalue_error"] = error
    if many is not None and none is not None:
        row = rows[names[3]]
        row.ratio = row.median_s / median(none["times"])
        row.vs = "{ratio:.2f}x the time with no delays"
        row.target, row.met = "<= 1.5x the time with no delays", row.ratio <= 1.5
    return results
