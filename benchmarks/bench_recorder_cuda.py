"""5. Recorder overhead on CUDA: the MLP of benchmark 4, and a 12-layer d=768 Transformer encoder
(85 M parameters, AdamW, bf16 autocast, batch 16 x 256).

Same method as ``bench_recorder_cpu`` (each case paired with its own bare run, steady state timed
with the final flush beside it, overhead = median of ``case / bare - 1``), with
``torch.cuda.synchronize`` around the timed steps. The Transformer skips the every-step full
snapshots (340 MB each).
Targets at every 10 steps: <= 10% over the bare step; sketch (k = 4096) every step: <= 5%.
Skipped without CUDA. ``koopkit.Recorder`` writes with zarr; without zarr only the
torch.save and list cases run.
"""

from __future__ import annotations

import importlib.util

from bench_recorder_cpu import CASES, mlp_workload, rows, time_cases
from common import CaseFailed, Result, cuda_available, run_case, skipped

NAME = "recorder-cuda"
SIZES = {  # timed steps of the MLP and of the Transformer
    "tiny": {"steps": (10, 5), "warmup": 3},
    "small": {"steps": (640, 200), "warmup": 20},
    "full": {"steps": (2000, 500), "warmup": 50},
}
EVERY_STEP_FULL = ("Recorder every step", "torch.save every step", "list copies every step")


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
        "mlp": ("MLP 784-1024-1024-10, batch 128, per step", cases),
        "transformer": (
            "Transformer 12 x 768 bf16, batch 16 x 256, per step",
            [c for c in cases if c not in EVERY_STEP_FULL],
        ),
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
        label = label.replace("Transformer", f"Transformer ({out['parameters'] / 1e6:.0f} M)")
        results.extend(rows(NAME, label, out, ("<= 10%", 10), ("<= 5%", 5)))
    return results
