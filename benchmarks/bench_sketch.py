"""8. On-device CountSketch: ``koopkit.record.sketch.CountSketch(k=8192).project`` of a flat
float32 vector on CUDA: the fused Triton kernel (hashing on the fly), and beside it the
torch-ops path it falls back to without Triton (cached hash tables up to 2**28 entries,
hashed on the fly in slices above). The floor is ``x.sum()``, one read of the vector.
Target (fused kernel, 1e9 parameters): <= 3 ms. Skipped without CUDA; imports only torch
and koopkit.record.sketch.
"""

from __future__ import annotations

from common import CaseFailed, Result, cuda_available, median, run_case, skipped

NAME = "sketch"
SIZES = {"tiny": [10**6], "small": [10**7, 10**8], "full": [10**8, 10**9]}
K = 8192


def cuda_times(fn, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls, timed with CUDA events."""
    import torch

    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    return times


def case(size: int, repeat: int, fused: bool) -> dict:
    import time

    import torch

    from koopkit.record import sketch as sketch_module
    from koopkit.record.sketch import CountSketch

    if not fused:
        sketch_module._fused_kernel = lambda device: None

    x = torch.randn(size, device="cuda")
    out = torch.empty(K, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    sketch = CountSketch(K, size, seed=0, device="cuda")
    torch.cuda.synchronize()
    setup = time.perf_counter() - start
    sketch.project([x], out)  # warm-up
    x.sum()
    floor = cuda_times(lambda: x.sum(), repeat)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = cuda_times(lambda: sketch.project([x], out), repeat)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {
        "times": times,
        "floor": floor,
        "setup_s": setup,
        "peak_mib": peak,
        "fused": sketch._fused is not None,
        "tables_mib": 0
        if sketch._tables is None
        else sum(t.nbytes for t in sketch._tables) / 2**20,
    }


def run(size: str, repeat: int) -> list[Result]:
    if not cuda_available():
        return [skipped(NAME, f"CountSketch k={K} on CUDA", "no CUDA device")]
    results = []
    for n in SIZES[size]:
        for fused in (True, False):
            results.append(one_case(n, fused, repeat))
    return results


def one_case(n: int, fused: bool, repeat: int) -> Result:
    path = "fused kernel" if fused else "torch ops"
    name = f"CountSketch k={K}, {path}, {n:.0e} float32 on CUDA"
    try:
        out = run_case("bench_sketch", "case", size=n, repeat=max(10, repeat), fused=fused)
    except CaseFailed as exc:
        return Result(NAME, name, note=f"failed: {exc}")
    if fused and not out["fused"]:
        return Result(NAME, name, note="skipped: Triton is not installed")
    seconds, floor = median(out["times"]), median(out["floor"])
    target = fused and n >= 10**9
    return Result(
        NAME,
        name,
        seconds,
        out["times"],
        out["peak_mib"],
        ratio=seconds / floor,
        vs="{ratio:.1f}x the x.sum() floor",
        target="<= 3 ms at 1e9 (fused kernel)" if target else "",
        met=seconds <= 3e-3 if target else None,
        note=(
            f"x.sum() {floor * 1e3:.2f} ms; setup {out['setup_s']:.2f} s; "
            f"tables {out['tables_mib']:.0f} MiB; peak is GPU memory"
        ),
    )
