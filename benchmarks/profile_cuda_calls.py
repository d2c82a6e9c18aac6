"""Host time of the CUDA calls a sketch snapshot makes, alone and between training steps.

A diagnostic for the recorder benchmarks, not one of them. For the MLP of benchmark 5 and
a CountSketch of k = 4096 replayed from a CUDA graph (as the Recorder does), times each
pattern of calls two ways: in a tight loop of its own ("alone"), and once after every SGD
step of the MLP ("in the loop", the host time per call, and the wall time per step). A
call that costs a few microseconds alone can cost several times that between training
steps, so a snapshot's cost is judged by the second::

    python benchmarks/profile_cuda_calls.py --steps 1500
"""

from __future__ import annotations

import argparse
import sys
import time

import common
from bench_recorder_cpu import SKETCH, mlp_workload

ALONE = 200  # calls timed alone: few enough that the GPU's launch queue never fills


def patterns(params):
    """name -> a function of one step's loss making that pattern of calls."""
    import torch

    from koopkit.record.graphed import GraphedFill
    from koopkit.record.sketch import make_sketch

    n = sum(p.numel() for p in params)
    fill = GraphedFill(make_sketch("countsketch", SKETCH, n, 0, "cuda").project)
    staging, side = torch.empty(SKETCH, device="cuda"), torch.cuda.Stream()
    host, device = torch.empty(64, SKETCH).pin_memory(), torch.empty(64, SKETCH, device="cuda")
    free, filled, count = torch.cuda.Event(), torch.cuda.Event(), [0]
    free.record(side)

    def row(rows):
        count[0] += 1
        return rows[count[0] % len(rows)]

    def replay(loss):
        fill(params, staging)

    def events(loss):
        main = torch.cuda.current_stream()
        main.wait_event(free)
        fill(params, staging)
        filled.record(main)
        side.wait_event(filled)
        free.record(side)

    def to_host(loss):
        fill(params, staging)
        row(host).copy_(staging, non_blocking=True)

    def on_device(loss):
        fill(params, staging)
        row(device).copy_(staging, non_blocking=True)

    def side_context(loss):
        fill(params, staging)
        with torch.cuda.stream(side):
            pass

    def side_copy(loss):  # what a Recorder snapshot does on CUDA, less its Python
        main = torch.cuda.current_stream()
        main.wait_event(free)
        fill(params, staging)
        filled.record(main)
        side.wait_event(filled)
        with torch.cuda.stream(side):
            row(host).copy_(staging, non_blocking=True)
            free.record(side)

    return {
        "nothing": lambda loss: None,
        "graph replay": replay,
        "replay + 4 event calls": events,
        "replay + copy to pinned host": to_host,
        "replay + copy to a device row": on_device,
        "replay + torch.cuda.stream(side)": side_context,
        "replay + events + side-stream copy": side_copy,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="timed steps per pattern")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    print(common.describe(common.machine_info()), flush=True)
    model, step = mlp_workload("cuda")
    params = list(model.parameters())
    for repetition in range(args.repeat):
        for name, call in patterns(params).items():
            loss = step()
            for _ in range(50):  # warm up: the graph is captured at the second call
                call(loss)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(ALONE):
                call(loss)
            alone = (time.perf_counter() - start) / ALONE
            torch.cuda.synchronize()
            inside, start = 0.0, time.perf_counter()
            for _ in range(args.steps):
                loss = step()
                before = time.perf_counter()
                call(loss)
                inside += time.perf_counter() - before
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            print(
                f"{repetition} {name:36s} alone {1e6 * alone:6.1f} us; in the "
                f"loop {1e6 * inside / args.steps:6.1f} us, wall {1e3 * wall / args.steps:.3f} "
                "ms/step",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
