"""5. Recorder overhead on CUDA: the MLP of benchmark 4, and a 12-layer d=768 Transformer encoder
(85 M parameters, AdamW, bf16 autocast, batch 16 x 256).

Same method as ``bench_recorder_cpu`` (each case paired with its own bare run, steady state timed
with the final flush beside it, overhead = median of ``case / bare - 1``), with
``torch.cuda.synchronize`` around the timed steps. The Transformer skips the every-step full
snapshots (340 MB each).
Targets at every 10 steps: <= 10% over the bare step; sketch (k = 4096) every step: <= 5%.
Skipped without CUDA. ``koopkit.Recorder`` writes with zarr; without zarr only the
torch.save and list cases run.

The full size takes more than ten minutes; run as a script, this module times chosen cases
of one model, each with its bare runs, and prints each case's rows when it is done::

    python benchmarks/bench_recorder_cuda.py transformer --steps 200 --repeat 3 \
        --workdir /dev/shm "Recorder every 10" "torch.save every 10"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import common
from bench_recorder_cpu import CASES, mlp_workload, rows, time_cases
from common import CaseFailed, Result, cuda_available, run_case, skipped

NAME = "recorder-cuda"
SIZES = {  # timed steps of the MLP and of the Transformer
    "tiny": {"steps": (10, 5), "warmup": 3},
    "small": {"steps": (640, 200), "warmup": 20},
    "full": {"steps": (2000, 500), "warmup": 50},
}
EVERY_STEP_FULL = ("Recorder every step", "torch.save every step", "list copies every step")
LABELS = {
    "mlp": "MLP 784-1024-1024-10, batch 128, per step",
    "transformer": "Transformer 12 x 768 bf16, batch 16 x 256, per step",
}
TARGETS = {"every": ("<= 10%", 10), "sketch": ("<= 5%", 5), "fifth_of_save": False}


def transformer_workload(
    device: str, layers: int = 12, width: int = 768, batch: int = 16, seq: int = 256
):
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        width, width // 64, 4 * width, dropout=0.0, batch_first=True
    )
    model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, seq, width, device=device)
    kind = torch.device(device).type

    def step():
        with torch.autocast(kind, dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def case(
    model: str, steps: int, warmup: int, repeat: int, cases: list[str], device: str = "cuda"
) -> dict:
    net, step = mlp_workload(device) if model == "mlp" else transformer_workload(device)
    chosen = {name: CASES[name] for name in cases}
    out = time_cases(net, step, chosen, steps, warmup, repeat, device)
    out["parameters"] = sum(p.numel() for p in net.parameters())
    return out


def run(size: str, repeat: int) -> list[Result]:
    if not cuda_available():
        return [skipped(NAME, "MLP and Transformer on CUDA", "no CUDA device")]
    results, cases = [], list(CASES)
    if importlib.util.find_spec("zarr") is None:
        cases = [c for c in cases if not c.startswith("Recorder")]
        results.append(
            skipped(
                NAME, "Recorder cases", "zarr is not installed (koopkit.Recorder writes with it)"
            )
        )
    params = SIZES[size]
    models = {
        "mlp": (LABELS["mlp"], cases),
        "transformer": (LABELS["transformer"], [c for c in cases if c not in EVERY_STEP_FULL]),
    }
    for model, (label, chosen) in models.items():
        try:
            out = run_case(
                "bench_recorder_cuda",
                "case",
                model=model,
                steps=params["steps"][model == "transformer"],
                warmup=params["warmup"],
                repeat=repeat,
                cases=chosen,
            )
        except CaseFailed as exc:
            results.append(Result(NAME, label, note=f"failed: {exc}"))
            continue
        results.extend(rows(NAME, _sized(label, out), out, **TARGETS))
    return results


def _sized(label: str, out: dict) -> str:
    return label.replace("Transformer", f"Transformer ({out['parameters'] / 1e6:.0f} M)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Time chosen recorder cases on CUDA.")
    parser.add_argument("model", choices=LABELS)
    parser.add_argument("cases", nargs="+", choices=[c for c in CASES if c != "bare"])
    parser.add_argument("--steps", type=int, required=True, help="timed steps per window")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="folder for stores and checkpoints (default: temp)")
    parser.add_argument("--json", help="append each case's timings here, one line per case")
    args = parser.parse_args(argv)
    if not cuda_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    if importlib.util.find_spec("zarr") is None and any(
        c.startswith("Recorder") for c in args.cases
    ):
        print("the Recorder cases need zarr (koopkit.Recorder writes with it)", file=sys.stderr)
        return 1
    common.WORKDIR = args.workdir
    net, step = mlp_workload("cuda") if args.model == "mlp" else transformer_workload("cuda")
    print(f"{common.describe(common.machine_info())}\n\n{common.markdown_table([])}", flush=True)
    for name in args.cases:
        chosen = {"bare": CASES["bare"], name: CASES[name]}
        out = time_cases(net, step, chosen, args.steps, args.warmup, args.repeat, "cuda")
        out["parameters"] = sum(p.numel() for p in net.parameters())
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k not in ("cases", "json")}
            with open(args.json, "a") as f:
                f.write(json.dumps({"case": name, **settings, **out}) + "\n")
        table = common.markdown_table(rows(NAME, _sized(LABELS[args.model], out), out, **TARGETS))
        print("\n".join(table.splitlines()[2:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
