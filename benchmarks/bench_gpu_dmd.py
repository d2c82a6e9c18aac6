"""7. GPU estimator: ``DMD(rank=20, device="cuda")`` on a float32 random walk already on the GPU.

The peer is PyDMD's call sequence done with torch on the same GPU (``torch.linalg.svd`` of
the whole snapshot matrix, then the r x r problem), the obvious way to "put DMD on a GPU".
Target (full size, 10 000 000 features x 500 steps): < 1 s. Skipped without CUDA; imports
only torch, numpy, scipy and koopkit's estimator module (no zarr, no dask, no entry points).
"""

from __future__ import annotations

from common import CaseFailed, Result, complex_to_json, cuda_available, median, run_case, skipped

NAME = "gpu-dmd"
SIZES = {"tiny": (50, 100_000), "small": (500, 2_000_000), "full": (500, 10_000_000)}
RANK = 20


def gpu_random_walk(steps: int, features: int, device="cuda", seed: int = 0):
    """The random walk of ``common.random_walk``, generated on the device in float32."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    out = torch.empty(steps, features, device=device)
    row = torch.randn(features, device=device, generator=generator)
    drift = 0.001 * torch.randn(features, device=device, generator=generator)
    for t in range(steps):
        out[t] = row
        row += drift + 0.01 * torch.randn(features, device=device, generator=generator)
    return out


def svd_dmd(data, rank: int):
    """PyDMD's exact DMD sequence in torch: full economy SVD, truncate, r x r eigenproblem."""
    import torch

    x, y = data[:-1].T, data[1:].T  # (features, pairs)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    atilde = u.T @ y @ v / s
    return torch.linalg.eigvals(atilde.double())


def gpu_timed(fn, repeat: int):
    """(seconds per call, peak extra GPU MiB, last value) with a synchronize around each call."""
    import time

    import torch

    times, value = [], None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, (torch.cuda.max_memory_allocated() - base) / 2**20, value


def case(library: str, steps: int, features: int, repeat: int) -> dict:
    import torch

    data = gpu_random_walk(steps, features)
    if library == "koopkit":
        from koopkit_dmd.estimators import DMD

        estimator = DMD(rank=RANK, device="cuda")

        def fit(data=data):
            return estimator.fit(data).eigenvalues
    else:

        def fit(data=data):
            return svd_dmd(data, RANK).cpu().numpy()

    fit(data[:, :20_000].contiguous())  # warm-up: CUDA context, cuBLAS/cuSOLVER handles
    try:
        times, peak, eigenvalues = gpu_timed(fit, repeat)
    except RuntimeError as exc:  # out of memory, or cuSOLVER refusing the size
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return {
        "times": times,
        "peak_mib": peak,
        "eigenvalues": complex_to_json(eigenvalues),
        "gpu": torch.cuda.get_device_name(),
    }


def run(size: str, repeat: int) -> list[Result]:
    steps, features = SIZES[size]
    label = f"{features} x {steps} float32 on GPU"
    if not cuda_available():
        return [skipped(NAME, f"koopkit dmd device='cuda', {label}", "no CUDA device")]
    out, results = {}, []
    for library, name in [
        ("torch-svd", "torch.linalg.svd exact DMD (PyDMD's sequence)"),
        ("koopkit", "koopkit dmd device='cuda'"),
    ]:
        try:
            out[library] = run_case(
                "bench_gpu_dmd",
                "case",
                library=library,
                steps=steps,
                features=features,
                repeat=repeat,
            )
        except CaseFailed as exc:
            out[library] = {"error": str(exc)}
        if "error" in out[library]:
            results.append(Result(NAME, f"{name}, {label}", note=out[library]["error"]))
            continue
        times = out[library]["times"]
        results.append(
            Result(
                NAME,
                f"{name}, {label}",
                median(times),
                times,
                out[library]["peak_mib"],
                note="peak is GPU memory",
            )
        )
    mine = results[-1]
    if "times" in out["koopkit"]:
        mine.target, mine.met = "< 1 s", mine.median_s < 1
        if "times" in out["torch-svd"]:
            mine.ratio = median(out["torch-svd"]["times"]) / mine.median_s
            mine.vs = "{ratio:.1f}x faster than torch SVD"
    return results
