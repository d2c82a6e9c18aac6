"""Early training of a LeNet-style CNN on the 8 x 8 digits, seen through windowed Koopman spectra.

Redman et al., "Identifying Equivalent Training Dynamics" (NeurIPS 2024, App. D.1) compute
Koopman spectra over successive windows of early training of LeNet and ResNet-20; the
heatmap of log10 Wasserstein distances between windows shows when the dynamics change.
Here a LeNet-style CNN is trained with SGD on scikit-learn's bundled digits (no download),
every weight is recorded at every step with ``koopkit.Recorder``, and each window of the
stored trajectory is read back by rows and fit with a fixed-rank (Hankel) DMD. With SGD at
lr 0.05 the loss sits on a plateau for about 200 steps and then falls: the plateau's windows
form one block of small distances, the escape from it another, far from the first.

    python examples/cnn_early_phase.py            # 600 steps, 100-step windows every 25; ~20 s
    python examples/cnn_early_phase.py --quick    # 300 steps, < 30 s
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg  # noqa: F401  (loads scipy's own BLAS, so threadpool_limits reaches it)
import torch
from threadpoolctl import threadpool_limits
from torch import nn

import koopkit
from koopkit.plots import plot_spectra

RUN = "lenet/seed{seed}"
FULL = {"steps": 600, "window": 100, "stride": 25}
QUICK = {"steps": 300, "window": 60, "stride": 30}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class LeNet(nn.Module):
    """LeNet-5's layout shrunk to 8 x 8 inputs: two 3 x 3 conv + pool stages, three fc layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def load_data(seed: int, test_fraction: float = 0.2):
    """Digits as (N, 1, 8, 8) tensors standardised with the training statistics; seeded split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


def batches(n: int, batch_size: int, generator):
    """Endless mini-batch indices, reshuffled every epoch by ``generator``."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(store, args) -> str:
    """Train with plain SGD for ``args.steps`` steps, recording every weight at every step."""
    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    with torch.random.fork_rng():  # nn's default init draws from the global RNG; leave it be
        torch.manual_seed(args.seed)
        model = LeNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    order = batches(len(y_train), args.batch_size, torch.Generator().manual_seed(args.seed))
    run = RUN.format(seed=args.seed)
    with koopkit.Recorder(
        store, run, model, params=r"weight$", tags={"seed": args.seed}, optimizer=optimizer
    ) as rec:
        for step in range(args.steps):
            index = next(order)
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss=loss.detach())
            if (step + 1) % 100 == 0:
                log(f"step {step + 1}/{args.steps}: loss {loss.item():.3f}")
        with torch.no_grad():
            accuracy = (model(x_test).argmax(-1) == y_test).float().mean()
        rec.log(test_accuracy=accuracy)
    return run


def window_starts(rows: int, window: int, stride: int) -> list[int]:
    """First row of every full window; windows that would run past the end are dropped."""
    starts = list(range(0, rows - window + 1, stride))
    if len(starts) < 2:
        raise ValueError(
            f"Expected at least 2 windows of --window {window} every --stride {stride} in "
            f"{rows} recorded rows. Got {len(starts)}; record more --steps."
        )
    return starts


def window_spectra(store, run: str, args) -> tuple[list[tuple[int, int]], list]:
    """One spectrum per window, each read from the store as a slice of rows."""
    opened = koopkit.open_store(store)
    trajectory, steps = opened.trajectory(run, "params"), opened.steps(run, "params")
    params = {"rank": args.rank, "center": args.center, "residuals": False}
    if args.estimator == "hankel-dmd":
        params["delays"] = args.delays
    windows, spectra = [], []
    for start in window_starts(len(steps), args.window, args.stride):
        rows = np.asarray(trajectory[start : start + args.window])
        spectra.append(koopkit.estimate(rows, args.estimator, **params))
        windows.append((int(steps[start]), int(steps[start + args.window - 1])))
    return windows, spectra


def distance_matrix(spectra) -> np.ndarray:
    """Wasserstein distance between every pair of window spectra."""
    n = len(spectra)
    distances = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = koopkit.distance(spectra[i], spectra[j])
    return distances


def log10_off_diagonal(distances) -> np.ndarray:
    """log10 of the distances with NaN on the diagonal, where W = 0 has no logarithm."""
    with np.errstate(divide="ignore"):
        logs = np.log10(distances)
    np.fill_diagonal(logs, np.nan)
    return logs


def plot_heatmap(distances, windows, path) -> None:
    """log10 W between windows; the diagonal is left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = log10_off_diagonal(distances)
    labels = [f"{a}-{b}" for a, b in windows]
    fig, ax = plt.subplots(figsize=(7, 6))
    shown = ax.imshow(image, cmap="viridis")
    fig.colorbar(shown, ax=ax, label="log10 Wasserstein distance")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("window (steps)")
    ax.set_ylabel("window (steps)")
    ax.set_title("Koopman spectra of early training windows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(store, run, windows, spectra, distances, args, seconds) -> dict:
    """The numbers behind the figures: windows, their eigenvalues and loss, the W matrix."""
    opened = koopkit.open_store(store)
    loss = np.asarray(opened.trajectory(run, "scalars/loss"))
    log_w = log10_off_diagonal(distances)
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "run": run,
        "windows": [list(w) for w in windows],
        "eigenvalues": [s.to_json()["eigenvalues"] for s in spectra],
        "distance": distances.tolist(),
        "log10_distance": [[None if np.isnan(v) else float(v) for v in row] for row in log_w],
        "window_loss": [float(loss[a : b + 1].mean()) for a, b in windows],
        "test_accuracy": float(opened.trajectory(run, "scalars/test_accuracy")[-1]),
        "seconds": seconds,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("koopkit-examples/cnn_early_phase"), help="output dir"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps, for tests")
    parser.add_argument("--seed", type=int, default=0, help="init, split and batches")
    parser.add_argument("--steps", type=int, help="SGD steps recorded (600 full, 300 quick)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="SGD mini-batch")
    parser.add_argument("--window", type=int, help="snapshots per window (100 full, 60 quick)")
    parser.add_argument("--stride", type=int, help="steps between windows (25 full, 30 quick)")
    parser.add_argument(
        "--estimator", choices=("dmd", "hankel-dmd"), default="hankel-dmd", help="per window"
    )
    parser.add_argument("--delays", type=int, default=4, help="delays of hankel-dmd")
    parser.add_argument("--rank", type=int, default=8, help="fixed DMD rank of every window")
    parser.add_argument(
        "--center", action=argparse.BooleanOptionalAction, default=True, help="subtract means"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (one avoids spin-waits on small ops)"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:  # fail before training, not after
        window_starts(args.steps + 1, args.window, args.stride)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with threadpool_limits(args.threads):  # torch's OpenMP, numpy's and scipy's BLAS
        return experiment(args)


def experiment(args) -> dict:
    """Train and record, estimate per window, and write the summary and figures."""
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "runs.zarr"
    if store.exists():
        log(f"replacing {store}")
        shutil.rmtree(store)
    started = time.perf_counter()
    run_id = train(store, args)
    windows, spectra = window_spectra(store, run_id, args)
    distances = distance_matrix(spectra)
    seconds = time.perf_counter() - started
    summary = summarise(store, run_id, windows, spectra, distances, args, seconds)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_heatmap(distances, windows, args.out / "window_distances.png")
    plot_spectra(
        [(f"{a}-{b}", s) for (a, b), s in zip(windows, spectra, strict=True)],
        args.out / "window_eigenvalues.png",
        title="Koopman eigenvalues per window",
        legend_title="window",
    )
    log(
        f"{len(windows)} windows, W from {distances[distances > 0].min():.3g} "
        f"to {distances.max():.3g}; {seconds:.0f} s; wrote {args.out}"
    )
    return summary


if __name__ == "__main__":
    main()
