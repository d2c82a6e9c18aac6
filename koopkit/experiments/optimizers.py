"""Online mirror descent vs online gradient descent vs bisection (Redman et al. 2024, Fig. 2).

OMD with the log-barrier regulariser on x and OGD on u = log x are conjugate (Ghai, Lu &
Hazan 2022); the bisection method is not. Each trajectory is recorded as a run, the
iterate being a 2-parameter "model", and the Koopman spectra of the three methods are
compared with Hankel DMD (4 delays) and a permutation test over replicate groups of
starting points (the rows of the 5 x 5 grid).

References: W. T. Redman et al., "Identifying Equivalent Training Dynamics", NeurIPS 2024.
U. Ghai, Z. Lu, E. Hazan, "Non-convex online learning via algorithmic equivalence", 2022.
"""

from __future__ import annotations

import numpy as np
import torch

ETA = 0.01
STEPS = 99  # 100 iterates: the starting point and 99 updates
LOWER = 0.01  # the box K = [0.01, 1]^2 of OMD; OGD's box is its image under log
METHODS = ("omd", "ogd", "bisection")


def loss(x: np.ndarray) -> float:
    return float(np.sum(np.tan(x)))


def omd_step(x: np.ndarray) -> np.ndarray:
    """Mirror step for R(x) = -sum log x, then the (separable) Bregman projection: a clip."""
    return np.clip(1.0 / (1.0 / x + ETA / np.cos(x) ** 2), LOWER, 1.0)


def ogd_step(u: np.ndarray) -> np.ndarray:
    """Gradient step on f(exp u), then the Euclidean projection onto [log 0.01, 0]^2."""
    x = np.exp(u)
    return np.clip(u - ETA * x / np.cos(x) ** 2, np.log(LOWER), 0.0)


def bisection_step(state):
    a, b = state
    z = (a + b) / 2
    value = loss(z)
    if value < 0:
        a = z
    elif value > 0:
        b = z
    return a, b


def starting_grids(conjugate: bool = True):
    """5 x 5 grids of starting points, row-major, for each method.

    The conjugate OGD grid is u0 = log x0; the original code used linspace(-2.3, -0.1),
    which covers the same region with different points.
    """

    def grid(lo, hi):
        axis = np.linspace(lo, hi, 5)
        return np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)

    x0 = grid(0.1, 0.9)
    u0 = np.log(x0) if conjugate else grid(-2.3, -0.1)
    a0, b0 = grid(-4 / 3, -1 / 3), grid(1 / 7, 8 / 7)
    return {"omd": list(x0), "ogd": list(u0), "bisection": list(zip(a0, b0, strict=True))}


class Iterate(torch.nn.Module):
    """A 2-D iterate held as a parameter, so the Recorder sees it like any model."""

    def __init__(self, x):
        super().__init__()
        self.x = torch.nn.Parameter(
            torch.as_tensor(np.asarray(x), dtype=torch.float64), requires_grad=False
        )


def record(store, conjugate: bool = True, progress=None) -> int:
    """Run every method from every starting point; one run per trajectory. Returns runs written."""
    from ..record.recorder import Recorder

    grids = starting_grids(conjugate)
    count = 0
    for method in METHODS:
        for index, start in enumerate(grids[method]):
            state = start
            iterate = Iterate(_observed(method, state))
            tags = {
                "experiment": "optimizers",
                "method": method,
                "row": index // 5,
                "col": index % 5,
                "grid": "conjugate" if conjugate else "original",
            }
            with Recorder(
                store, f"optimizers/{method}/{index:02d}", iterate, tags=tags, dtype="float64"
            ) as rec:
                for _ in range(STEPS):
                    # a scalar goes at the step of the iterate it describes
                    before = _loss(method, state)
                    state = _advance(method, state)
                    iterate.x.data.copy_(torch.from_numpy(_observed(method, state)))
                    rec.step(loss=before)
            count += 1
        if progress:
            progress(f"recorded {len(grids[method])} {method} trajectories")
    return count


def _advance(method, state):
    if method == "omd":
        return omd_step(state)
    if method == "ogd":
        return ogd_step(state)
    return bisection_step(state)


def _observed(method, state) -> np.ndarray:
    """What DMD sees: x for OMD, u for OGD, the midpoint z for bisection."""
    if method == "bisection":
        a, b = state
        return (a + b) / 2
    return np.asarray(state, dtype=np.float64)


def _loss(method, state) -> float:
    """The loss at the observed iterate, in OMD's coordinates x (OGD observes u = log x)."""
    observed = _observed(method, state)
    return loss(np.exp(observed) if method == "ogd" else observed)


def analyse(store, n_perm: int = 10_000, save: bool = True, progress: bool = False):
    """Distances and permutation p-values between the three methods (replicates = grid rows).

    Returns ``(comparison, pooled)``: the replicate comparison, and the paper's pooled
    distances (one spectrum per method from all 25 trajectories).
    """
    from ..pipeline import compare_store

    params = {"delays": 4, "rank": None}
    comparison = compare_store(
        store,
        "method",
        replicate="row",
        where={"experiment": "optimizers"},
        estimator="hankel-dmd",
        estimator_params=params,
        test="permutation",
        test_params={"n_perm": n_perm},
        save=save,
        progress=progress,
    )
    pooled = compare_store(
        store,
        "method",
        where={"experiment": "optimizers"},
        estimator="hankel-dmd",
        estimator_params=params,
        test=None,
        save=False,
    )
    return comparison, pooled
