"""Experiment 2 of Redman et al. (2024): do narrow and wide networks train conjugately?

    python examples/fcn_widths.py --out koopkit-examples/fcn [--seeds 0 1 2 3 4] [--inits 10] [--steps 1000]

1-hidden-layer networks without biases (widths 5, 10, 40), SGD lr 0.1, batch 60, output
weights recorded every step; each seed's nearby initialisations are fit jointly (Hankel DMD,
rank 10) and seeds are the replicates of the permutation test. Data: the bundled digits, or
``--dataset mnist`` when torchvision and a downloaded MNIST are available.
"""

import argparse
import json
import sys
from pathlib import Path

from koopkit.experiments import fcn
from koopkit.plots import plot_comparison


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="koopkit-examples/fcn")
    parser.add_argument("--widths", type=int, nargs="+", default=list(fcn.WIDTHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--inits", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--delays", type=int, default=8)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "runs.zarr"
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    fcn.record(store, args.widths, args.seeds, args.inits, args.steps, args.dataset, progress=log)
    comparison = fcn.analyse(store, delays=args.delays, rank=args.rank, progress=True)
    plot_comparison(comparison, out / "fcn.png")
    (out / "summary.json").write_text(json.dumps(comparison.to_json(), indent=2))
    for pair in comparison.pairs():
        a, b = pair["pair"]
        print(
            f"h={a} vs h={b}: W = {pair['distance']:.4g} ± {pair['distance_std']:.2g}, "
            f"p = {pair['p_value']:.3g} (Holm {pair['p_value_holm']:.3g})"
        )
    return comparison


if __name__ == "__main__":
    main()
