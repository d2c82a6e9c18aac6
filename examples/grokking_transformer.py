"""Grokking vs. constrained training of a one-layer transformer on (a + b) mod p.

Reproduces the transformer experiment of Redman et al., "Identifying Equivalent Training
Dynamics" (NeurIPS 2024): over the first 100 full-batch AdamW steps, a run that will grok
(weight decay 1.0) and one that cannot (Omnigrok-style: init scaled by 0.8, no weight
decay, total parameter norm held fixed) have Koopman spectra of their MLP output weights
that do not overlap. The paper finds their early train and test curves alike; here the
constrained run fits the training set more slowly (curves.png), so read the spectra as
one more view of two runs that already differ, not as the only one.

Each (condition, seed) trains several nearby initialisations, recorded with
``koopkit.Recorder``; ``koopkit.compare`` fits one centred-PCA + delay-embedding DMD per
(condition, seed) and tests between- against within-condition Wasserstein distances.

    python examples/grokking_transformer.py          # p = 113, the paper's model; ~8 min
    python examples/grokking_transformer.py --quick  # p = 31, 3 seeds x 2 inits; < 40 s
    python examples/grokking_transformer.py --seeds 10 --inits 10   # the paper's design

The paper runs 10 seeds x 10 inits (about 30 CPU minutes here); the default 5 x 5 keeps
its model and analysis, and 5 + 5 seeds still reach the exact p-value 2/252. Fewer inits
make the rank-10 spectrum of a seed fragile: with 3, one constrained seed of five lands
far from the other four.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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
from koopkit.plots import plot_comparison, plot_spectra

CONDITIONS = {
    # name: (init scale, weight decay, hold the total norm fixed)
    "grokking": (1.0, 1.0, False),
    "constrained": (0.8, 0.0, True),
}
FULL = {"p": 113, "d_model": 128, "d_mlp": 512, "heads": 4, "seeds": 5, "inits": 5, "delays": 32}
# Quick: the same model on a smaller p. Smaller widths (d_model 32) or fewer steps (60) do not
# separate the conditions reliably; this setting does for every seed triple tried (0-11).
QUICK = {"p": 31, "d_model": 128, "d_mlp": 512, "heads": 4, "seeds": 3, "inits": 2, "delays": 8}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class OneLayerTransformer(nn.Module):
    """Attention + ReLU MLP, no LayerNorm, the answer read at the last position ("=").

    Initialised as in Nanda et al.'s grokking code: Gaussian weights over sqrt(d_model)
    (the unembedding over sqrt(p)), zero biases.

    With a single layer only the last position's residual stream reaches the logits, so the
    query, the MLP and the unembedding are computed there alone, and the keys and values are
    looked up per token: the same function and gradients as the full causal model at a
    fraction of the cost (a CPU run of the paper's size takes seconds).
    """

    def __init__(self, p: int, d_model: int, d_mlp: int, heads: int, generator):
        super().__init__()
        d_head = d_model // heads
        vocab = p + 1  # the p residues and "="

        def init(*shape, fan=d_model):
            return nn.Parameter(torch.randn(*shape, generator=generator) / math.sqrt(fan))

        self.W_E = init(vocab, d_model)
        self.W_pos = init(3, d_model)
        self.attn = nn.ParameterDict(
            {name: init(d_model, heads * d_head) for name in ("W_Q", "W_K", "W_V", "W_O")}
        )
        self.heads = heads
        self.mlp = nn.ParameterDict(
            {
                "W_in": init(d_model, d_mlp),
                "b_in": nn.Parameter(torch.zeros(d_mlp)),
                "W_out": init(d_mlp, d_model),
                "b_out": nn.Parameter(torch.zeros(d_model)),
            }
        )
        self.W_U = init(d_model, p, fan=p)

    def forward(self, tokens):
        """Logits over the p residues for ``tokens`` of shape (batch, 3)."""
        a, batch = self.attn, tokens.shape[0]
        last = self.W_E[-1] + self.W_pos[-1]  # the "=" query, the same for every example
        q = (last @ a["W_Q"]).view(self.heads, -1)
        k = self.project(tokens, a["W_K"]).view(batch, 3, self.heads, -1)
        v = self.project(tokens, a["W_V"]).view(batch, 3, self.heads, -1)
        scores = (k * q).sum(-1) / math.sqrt(q.shape[-1])  # (batch, 3, heads)
        z = (scores.softmax(1).unsqueeze(-1) * v).sum(1)  # (batch, heads, d_head)
        resid = last + z.flatten(1) @ a["W_O"]
        m = self.mlp
        resid = resid + torch.relu(resid @ m["W_in"] + m["b_in"]) @ m["W_out"] + m["b_out"]
        return resid @ self.W_U

    def project(self, tokens, weight):
        """(W_E[tokens] + W_pos) @ weight as a lookup into a (vocab, ·) table, not a batch matmul."""
        return (self.W_E @ weight)[tokens] + self.W_pos @ weight


def make_data(p: int, train_fraction: float, seed: int):
    """All p² pairs as (a, b, "=") token triples and their sums, split by a seeded permutation."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    labels = (a + b) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * p * p)
    train, test = order[:n_train], order[n_train:]
    return (tokens[train], labels[train]), (tokens[test], labels[test])


@torch.no_grad()
def prepare(model: nn.Module, scale: float, seed: int, init: int) -> torch.Tensor:
    """Scale the model, perturb it to nearby init ``init``, and return its total L2 norm.

    Init 0 is the scaled base model; init i > 0 multiplies every weight by
    (1 + 0.001 U(-1, 1)), drawn on the parameter's own device from a generator seeded by
    (seed, init), so the perturbation is reproducible on CPU and CUDA alike.
    """
    for param in model.parameters():
        param.mul_(scale)
        if init:
            generator = torch.Generator(device=param.device).manual_seed(1000 * seed + init)
            noise = torch.rand(param.shape, generator=generator, device=param.device)
            param.mul_(1 + 0.001 * (2 * noise - 1))
    return total_norm(model)


def total_norm(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in model.parameters()]).norm()


@torch.no_grad()
def hold_norm(model: nn.Module, norm: torch.Tensor) -> None:
    """Rescale all parameters so their total L2 norm is back at ``norm`` (Omnigrok)."""
    factor = norm / total_norm(model)
    for param in model.parameters():
        param.mul_(factor)


@torch.no_grad()
def accuracy(model: nn.Module, tokens, labels) -> torch.Tensor:
    return (model(tokens).argmax(-1) == labels).float().mean()


def train_run(store, condition: str, seed: int, init: int, args, data) -> None:
    """Train one (condition, seed, init) for ``args.steps`` full-batch steps, recording W_out."""
    scale, weight_decay, constrained = CONDITIONS[condition]
    (x_train, y_train), (x_test, y_test) = data
    model = OneLayerTransformer(
        args.p, args.d_model, args.d_mlp, args.heads, torch.Generator().manual_seed(seed)
    )
    norm = prepare(model, scale, seed, init)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=weight_decay
    )
    tags = {"condition": condition, "seed": seed, "init": init}
    with koopkit.Recorder(
        store,
        f"{condition}/seed{seed}/init{init}",
        model,
        params=r"^mlp\.W_out$",
        tags=tags,
        optimizer=optimizer,
    ) as rec:
        for _ in range(args.steps):
            # scalars describe the parameters before the update, the step they are stored at
            logits = model(x_train)
            loss = nn.functional.cross_entropy(logits, y_train)
            train_acc = (logits.argmax(-1) == y_train).float().mean()
            current_norm = total_norm(model).detach()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if constrained:
                hold_norm(model, norm)
            rec.step(loss=loss.detach(), train_accuracy=train_acc, norm=current_norm)
        with torch.no_grad():  # the state after the last step, so every series ends there
            logits = model(x_train)
            rec.log(
                loss=nn.functional.cross_entropy(logits, y_train),
                train_accuracy=(logits.argmax(-1) == y_train).float().mean(),
                test_accuracy=accuracy(model, x_test, y_test),
                norm=total_norm(model),
            )


def train_all(store, args) -> None:
    """Every condition × seed × init; the split depends on the seed only, as in the paper."""
    total = len(CONDITIONS) * args.seeds * args.inits
    done, started = 0, time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        data = make_data(args.p, args.train_fraction, seed)
        for condition in CONDITIONS:
            for init in range(args.inits):
                train_run(store, condition, seed, init, args, data)
                # A closed Recorder's ring buffers (128 MiB here) sit in a reference cycle;
                # free them now, not at the next full collection (3.6 GB peak without this).
                gc.collect()
                done += 1
                elapsed = time.perf_counter() - started
                log(f"[{done}/{total}] {condition} seed={seed} init={init} ({elapsed:.0f} s)")


def curves(store) -> dict:
    """Per condition, the (runs, steps) arrays of every recorded scalar, read from the store."""
    opened = koopkit.open_store(store)
    out = {}
    for condition in CONDITIONS:
        runs = [info.run_id for info in opened.select({"condition": condition})]
        out[condition] = {
            name: np.stack([np.asarray(opened.trajectory(r, f"scalars/{name}")) for r in runs])
            for name in ("loss", "train_accuracy", "test_accuracy", "norm")
        }
    return out


def plot_curves(scalars: dict, path) -> None:
    """Train loss, train accuracy and total parameter norm per condition (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("loss", "train_accuracy", "norm")
    fig, axes = plt.subplots(1, len(names), figsize=(13, 3.8))
    for condition, series in scalars.items():
        for ax, name in zip(axes, names, strict=True):
            mean, std = series[name].mean(0), series[name].std(0)
            steps = np.arange(mean.size)
            ax.plot(steps, mean, label=condition)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.3)
            ax.set_xlabel("step")
            ax.set_title(name.replace("_", " "))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyse(store, args):
    """One spectrum per (condition, seed) from its nearby inits; distances and the test."""
    return koopkit.compare(
        store,
        by="condition",
        replicate="seed",
        estimator="pca-hankel",
        estimator_params={
            "components": args.components,
            "delays": args.delays,
            "center": True,
            "rank": args.rank,
        },
        metric="wasserstein",
        test="permutation",
        test_params={"n_perm": args.n_perm, "seed": 0},
        progress=True,
    )


def summarise(comparison, scalars, args, seconds: float) -> dict:
    """The numbers of the experiment: W between and within conditions, p, the spectra."""
    labels = comparison.conditions
    i, j = labels.index("grokking"), labels.index("constrained")
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "conditions": labels,
        "W_between": {
            "mean": float(comparison.distance_mean[i, j]),
            "std": float(comparison.distance_std[i, j]),
        },
        "W_within": {
            c: {
                "mean": float(comparison.distance_mean[k, k]),
                "std": float(comparison.distance_std[k, k]),
            }
            for k, c in enumerate(labels)
        },
        "p_value": float(comparison.p_value[i, j]),
        "final": {
            condition: {name: float(values[:, -1].mean()) for name, values in series.items()}
            for condition, series in scalars.items()
        },
        "comparison": comparison.to_json(),
        "seconds": seconds,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("koopkit-examples/grokking_transformer"), help="output dir"
    )
    parser.add_argument("--quick", action="store_true", help="small p, few runs, for tests")
    parser.add_argument("--p", type=int, help="modulus (113 full, 31 quick)")
    parser.add_argument("--d-model", type=int, help="residual width (128)")
    parser.add_argument("--d-mlp", type=int, help="MLP width (512)")
    parser.add_argument("--heads", type=int, help="attention heads (4)")
    parser.add_argument("--seeds", type=int, help="replicates per condition (5 full, 3 quick)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here")
    parser.add_argument("--inits", type=int, help="nearby inits per seed (5 full, 2 quick)")
    parser.add_argument("--steps", type=int, default=100, help="full-batch AdamW steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--train-fraction", type=float, default=0.3, help="share of the p² pairs")
    parser.add_argument("--components", type=int, default=10, help="PCA components")
    parser.add_argument("--delays", type=int, help="time delays (32 full, 8 quick)")
    parser.add_argument("--rank", type=int, default=10, help="DMD rank")
    parser.add_argument("--n-perm", type=int, default=10_000, help="permutations of the test")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (one avoids spin-waits on small ops)"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 2:  # fail before training, not after
        parser.error(f"Expected --seeds of at least 2, the test's replicates. Got {args.seeds}.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with threadpool_limits(args.threads):  # torch's OpenMP, numpy's and scipy's BLAS
        return experiment(args)


def experiment(args) -> dict:
    """Train, record, compare, and write the summary and figures to ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "runs.zarr"
    if store.exists():
        log(f"replacing {store}")
        shutil.rmtree(store)
    started = time.perf_counter()
    train_all(store, args)
    comparison = analyse(store, args)
    seconds = time.perf_counter() - started
    scalars = curves(store)
    summary = summarise(comparison, scalars, args, seconds)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_comparison(comparison, args.out / "comparison.png")
    plot_curves(scalars, args.out / "curves.png")
    plot_spectra(
        [(r.group.condition, r.spectrum) for r in comparison.spectra],
        args.out / "eigenvalues.png",
        title="Koopman eigenvalues of W_out, one spectrum per seed",
    )
    log(
        f"W between = {summary['W_between']['mean']:.4g} ± {summary['W_between']['std']:.2g}, "
        + ", ".join(f"within {c} = {w['mean']:.3g}" for c, w in summary["W_within"].items())
        + f", p = {summary['p_value']:.3g}; {seconds:.0f} s; wrote {args.out}"
    )
    return summary


if __name__ == "__main__":
    main()
