"""Deterministic training with a Recorder, run as a subprocess by the crash and lock tests.

    python record_and_die.py STORE RUN [--steps N] [--sleep S] [--hold] [--inflight BYTES]

Prints ``step K`` (flushed) after each recorded optimizer step, ``ready PID`` once the
Recorder is open, and ``done`` when it closed normally. ``--hold`` opens the Recorder and
then waits for a line on stdin before training (for the lock tests). The test kills the
process wherever it likes; ``reference_params`` computes the same trajectory in-process.

Imported by the tests too, so nothing runs at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

SEED = 1234
STEPS = 40
# Linear(4, 8) + Linear(8, 3) = 67 float32 parameters = 268 bytes per row; this budget gives
# chunk_steps = 4 and two host buffers, so a commit happens every 4 snapshots.
INFLIGHT = 2 * 268 * 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(k: int):
    """The mini-batch of optimizer step k, the same whatever the length of the run."""
    g = torch.Generator().manual_seed(SEED * 1000 + k)
    return torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(steps: int, on_step=None):
    """Train from the fixed seed; ``on_step(model, loss, k)`` after each optimizer step k."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for k in range(1, steps + 1):
        x, y = batch(k)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(model, loss, k)
    return model


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as in the subprocess, so every float operation is reproduced."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_params(steps: int = STEPS):
    """Flattened parameters at steps 0..steps, and the loss of each iteration, in-process."""
    snapshots, losses = [], []

    def keep(model, loss, k):
        snapshots.append(flat(model))
        losses.append(float(loss.detach()))

    with one_thread():
        snapshots.append(flat(make_model()))
        train(steps, keep)
    return torch.stack(snapshots).numpy(), losses


def record(store, run, steps=STEPS, sleep=0.0, inflight=INFLIGHT, hold=False, echo=print):
    """Train ``steps`` steps while recording every step into STORE/RUN (resuming if present)."""
    import koopkit

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with (
        one_thread(),
        koopkit.Recorder(
            store, run, model, every=1, max_inflight_bytes=inflight, tags={"seed": SEED}
        ) as rec,
    ):
        echo(f"ready {os.getpid()}")
        if hold:
            sys.stdin.readline()
        for k in range(1, steps + 1):
            x, y = batch(k)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
            echo(f"step {k}")
            if sleep:
                time.sleep(sleep)
    echo("done")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--inflight", type=int, default=INFLIGHT)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def echo(line):
        print(line, flush=True)

    record(args.store, args.run, args.steps, args.sleep, args.inflight, args.hold, echo)


if __name__ == "__main__":
    main()
