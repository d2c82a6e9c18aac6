"""Where ``rec.step``'s time goes: a diagnostic for the recorder benchmarks, not one of them.

For the MLP of benchmark 4 and the Transformer of benchmark 5 (on CPU one of width 64: the
same 144 tensors, so the same host work per tensor in a short step), bare and with the
Recorder (sketch every step, full parameters every 10 steps), prints the wall time per step,
the host time spent inside the training step and inside ``rec.step``, then a cProfile of
``rec.step`` calls alone and a ``torch.profiler`` table of ten steps. In a loop bound by
kernel launches, host time inside ``rec.step`` is step time; in one bound by the GPU it is
hidden until the launch queue fills, so compare it with the wall time::

    python benchmarks/profile_recorder.py --device cuda --workdir /dev/shm > profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from functools import partial

import common
from bench_recorder_cpu import SKETCH, make_hook, mlp_workload
from bench_recorder_cuda import transformer_workload

KINDS = (("bare", None), ("sketch", 1), ("recorder", 10), ("bare", None))  # bare twice: drift


def one(model, step, kind, every, steps, device, workdir) -> None:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    folder = tempfile.mkdtemp(prefix="koopkit-profile-", dir=workdir)
    hook = make_hook(kind, model, folder, every)
    try:
        for _ in range(20):
            hook.step(step())
        sync()
        in_step = in_hook = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            a = time.perf_counter()
            loss = step()
            b = time.perf_counter()
            hook.step(loss)
            in_step, in_hook = in_step + b - a, in_hook + time.perf_counter() - b
        sync()
        wall = time.perf_counter() - start
        label = f"sketch k={SKETCH}" if kind == "sketch" else kind
        print(
            f"## {label} every={every}: wall {1e3 * wall / steps:.3f} ms/step; host in the "
            f"step {1e3 * in_step / steps:.3f} ms; host in rec.step {1e3 * in_hook / steps:.3f} ms",
            flush=True,
        )
        if kind == "bare":
            return
        profile, loss = cProfile.Profile(), step()
        profile.enable()
        for _ in range(steps):
            hook.step(loss)
        profile.disable()
        sync()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
        print(f"cProfile of {steps} rec.step calls alone:\n{text.getvalue()}")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                with torch.profiler.record_function("train_step"):
                    loss = step()
                with torch.profiler.record_function("rec_step"):
                    hook.step(loss)
            sync()
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=22))
        if device == "cuda":
            print(averages.table(sort_by="self_cuda_time_total", row_limit=15))
    finally:
        hook.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300, help="timed steps of the MLP")
    parser.add_argument("--workdir", help="folder for the stores (default: temp)")
    args = parser.parse_args(argv)
    print(common.describe(common.machine_info()), flush=True)
    models = {"mlp": (mlp_workload, args.steps)}
    if args.device == "cuda":  # a fifth of the steps: the Transformer's step is 30 times longer
        models["transformer"] = (transformer_workload, max(1, args.steps // 5))
    else:  # the Transformer's 144 tensors, narrow enough that a CPU step is short
        models["transformer d=64"] = (
            partial(transformer_workload, width=64, batch=2, seq=32),
            args.steps,
        )
    for name, (workload, steps) in models.items():
        model, step = workload(args.device)
        print(f"# {name}, {sum(p.numel() for p in model.parameters())} parameters", flush=True)
        for kind, every in KINDS:
            one(model, step, kind, every, steps, args.device, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
