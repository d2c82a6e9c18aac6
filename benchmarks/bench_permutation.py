"""6. Permutation test on a precomputed distance matrix: ``PermutationTest.run_on_distances``.

10 + 10 runs, 10 000 relabellings (C(20, 10) = 184 756 arrangements is more, so they are
sampled). Target: < 1 s after the distance matrix.
"""

from __future__ import annotations

from common import CaseFailed, Result, measure, median, run_case

NAME = "permutation"
SIZES = {
    "tiny": (3, 200),
    "small": (10, 10_000),
    "full": (10, 10_000),
}  # runs per condition, n_perm


def case(runs: int, n_perm: int, repeat: int) -> dict:
    import numpy as np
    from koopkit_significance.permutation import PermutationTest

    rng = np.random.default_rng(0)
    points = np.vstack([rng.normal(0, 1, (runs, 3)), rng.normal(0.5, 1, (runs, 3))])
    distances = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
    labels = ["a"] * runs + ["b"] * runs
    test = PermutationTest(n_perm=n_perm, seed=0)
    test.run_on_distances(distances, labels)  # warm-up
    times, peak, result = measure(lambda: test.run_on_distances(distances, labels), repeat)
    return {"times": times, "peak_mib": peak, "p_value": result.p_value, "n_perm": result.n_perm}


def run(size: str, repeat: int) -> list[Result]:
    runs, n_perm = SIZES[size]
    name = f"{runs} + {runs} runs, {n_perm} permutations"
    try:
        out = run_case("bench_permutation", "case", runs=runs, n_perm=n_perm, repeat=max(repeat, 5))
    except CaseFailed as exc:
        return [Result(NAME, name, note=f"failed: {exc}")]
    seconds = median(out["times"])
    return [
        Result(
            NAME,
            name,
            seconds,
            out["times"],
            out["peak_mib"],
            target="< 1 s after the distance matrix",
            met=seconds < 1,
            note=f"p = {out['p_value']:.4g} over {out['n_perm']} arrangements",
        )
    ]
