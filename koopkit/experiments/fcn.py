"""Fully connected networks of different widths (Redman et al. 2024, Fig. 3).

A 1-hidden-layer network without biases (inputs -> h -> 10) trained with SGD (lr 0.1,
batch 60); its output-layer weights are recorded after every step. Each seed builds one
network and nearby copies (weights times 1 + 0.001 U(-1, 1)); all copies of a seed are fit
jointly into one spectrum, and seeds are the replicates of the permutation test.

Unlike the original scripts, every source of randomness is seeded (the base initialisation,
the perturbations, the batch order) and the batches are shuffled on every device.
Data: scikit-learn's bundled 8 x 8 digits, or MNIST through torchvision when it is
installed and already downloaded.
"""

from __future__ import annotations

import numpy as np
import torch

LR = 0.1
BATCH = 60
WIDTHS = (5, 10, 40)


def load_digits_data():
    """Digits as float32 tensors, standardised with the training mean and std."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(data.target, dtype=torch.int64)


def load_data(dataset: str = "digits"):
    if dataset == "digits":
        return load_digits_data()
    if dataset == "mnist":
        try:
            from torchvision import datasets
        except ImportError as exc:
            raise RuntimeError("dataset='mnist' needs torchvision; use dataset='digits'.") from exc
        mnist = datasets.MNIST("~/.cache/koopkit/mnist", train=True, download=False)
        x = mnist.data.reshape(len(mnist.data), -1).float() / 255.0
        return (x - 0.1307) / 0.3081, mnist.targets.clone()
    raise ValueError(f"Invalid dataset {dataset!r}; expected 'digits' or 'mnist'.")


class FCN(torch.nn.Module):
    def __init__(self, inputs: int, width: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(inputs, width, bias=False)
        self.fc2 = torch.nn.Linear(width, 10, bias=False)

    def forward(self, x):
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=-1)


def nearby_initialisations(base: FCN, count: int, seed: int) -> list[FCN]:
    """The base network and ``count - 1`` copies with weights times (1 + 0.001 U(-1, 1))."""
    import copy

    nets = [base]
    for i in range(1, count):
        net = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 + 0.001 * (2 * torch.rand(p.shape, generator=g) - 1))
        nets.append(net)
    return nets


def train(net, x, y, steps, seed, rec=None):
    """Plain SGD on shuffled batches (order seeded, identical for every copy of a seed)."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    position = 0
    for _ in range(steps):
        if position + BATCH > len(x):
            order, position = torch.randperm(len(x), generator=g), 0
        batch = order[position : position + BATCH]
        position += BATCH
        loss = torch.nn.functional.nll_loss(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(loss=loss)


def record(
    store, widths=WIDTHS, seeds=(0, 1, 2), inits=10, steps=1000, dataset="digits", progress=None
) -> int:
    """Train every (width, seed, init) and record fc2.weight every step. Returns runs written.

    Runs single-threaded (tiny networks) and restores torch's thread count afterwards.
    """
    for name, value in (("inits", inits), ("steps", steps)):
        if value < 1:  # checked before anything is written: 0 inits would still record one
            raise ValueError(f"Expected {name} >= 1. Got {value!r} instead.")
    x, y = load_data(dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    try:
        return _record_all(store, x, y, widths, seeds, inits, steps, dataset, progress)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, whatever happened


def _record_all(store, x, y, widths, seeds, inits, steps, dataset, progress) -> int:
    from ..record.recorder import Recorder

    count = 0
    for width in widths:
        for seed in seeds:
            torch.manual_seed(seed)
            base = FCN(x.shape[1], width)
            for init, net in enumerate(nearby_initialisations(base, inits, seed)):
                tags = {
                    "experiment": "fcn",
                    "width": width,
                    "seed": seed,
                    "init": init,
                    "dataset": dataset,
                }
                run = f"fcn/h{width}/seed{seed}/init{init}"
                with Recorder(store, run, net, params=["fc2.weight"], tags=tags) as rec:
                    train(net, x, y, steps, seed, rec)
                count += 1
            if progress:
                progress(f"width {width}, seed {seed}: {inits} runs of {steps} steps")
    return count


def analyse(store, delays=8, rank=10, n_perm=10_000, save=True, progress=False):
    """Distances between widths (mean over seed pairs) and Holm-corrected permutation p-values."""
    from ..pipeline import compare_store

    return compare_store(
        store,
        "width",
        replicate="seed",
        where={"experiment": "fcn"},
        estimator="hankel-dmd",
        estimator_params={"delays": delays, "rank": rank},
        test="permutation",
        test_params={"n_perm": n_perm},
        save=save,
        progress=progress,
    )


def summary(comparison) -> dict:
    mean = np.asarray(comparison.distance_mean)
    return {
        "conditions": comparison.conditions,
        "distance_mean": mean.tolist(),
        "p_value_holm": np.asarray(comparison.p_value_holm).tolist(),
    }
