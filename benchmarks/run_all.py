"""Run the koopkit benchmarks, print a markdown table and write JSON with the machine's description.

    python benchmarks/run_all.py [--size tiny|small|full] [--only NAME ...] [--json OUT]
                                 [--markdown OUT] [--repeat N] [--threads N] [--workdir DIR]

``tiny`` only checks that every benchmark still runs (cases share one process, seconds in
all); ``small`` (default) gives indicative numbers; ``full`` is the size of the targets.
Benchmarks are not tests: nothing here fails on a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import SIZES, Result  # noqa: E402

MODULES = [  # run in this order
    "bench_dmd",
    "bench_hankel",
    "bench_out_of_core",
    "bench_recorder_cpu",
    "bench_writer_contention",
    "bench_recorder_cuda",
    "bench_permutation",
    "bench_gpu_dmd",
    "bench_sketch",
    "bench_cli",
]


def load(name: str):
    import importlib

    return importlib.import_module(name)


def parse(argv):
    names = [load(m).NAME for m in MODULES]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=", ".join(names))
    parser.add_argument("--json", type=Path, help="default: benchmark-results-SIZE.json")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--repeat", type=int, help="repetitions per case (default by size)")
    parser.add_argument("--threads", type=int, help="BLAS/OpenMP/torch threads of every case")
    parser.add_argument("--workdir", help="folder for stores and checkpoints (default: temp)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    common.INLINE = args.size == "tiny"
    common.WORKDIR = args.workdir
    repeat = args.repeat or common.REPEATS[args.size]
    machine = common.machine_info()
    machine["threads"] = args.threads
    print(common.describe(machine), file=sys.stderr)

    results: list[Result] = []
    for module_name in MODULES:
        module = load(module_name)
        if args.only and module.NAME not in args.only:
            continue
        print(f"[{module.NAME}] running at size {args.size} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            rows = module.run(args.size, repeat)
        except Exception as exc:  # a broken benchmark is a row, not the end of the run
            traceback.print_exc()
            rows = [Result(module.NAME, "all", note=f"failed: {type(exc).__name__}: {exc}")]
        print(f"[{module.NAME}] {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        results.extend(rows)

    table = common.markdown_table(results)
    print(table)
    out = args.json or Path(f"benchmark-results-{args.size}.json")
    argv_used = ["python", "benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)]
    out.write_text(json.dumps(common.to_json(results, machine, argv_used), indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(f"{common.describe(machine)}\n\n{table}\n")
    failed = [r for r in results if r.note.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
