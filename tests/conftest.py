"""Shared fixtures of the test suite."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).parent / "helpers"
_MEMORY_IDS = itertools.count()


def _load_helper(name: str):
    spec = importlib.util.spec_from_file_location(
        f"koopkit_test_helpers_{name}", HELPERS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def crash_helper():
    """tests/helpers/record_and_die.py as a module: deterministic training and its reference."""
    return _load_helper("record_and_die")


@pytest.fixture(scope="session")
def helper_path():
    """The path of a helper script, to run as ``python <path> ...``."""
    return lambda name: str(HELPERS / f"{name}.py")


@pytest.fixture
def memory_url(request):
    """A fresh ``memory://`` store URL, removed from fsspec's in-memory filesystem afterwards."""
    url = f"memory://koopkit-tests/{os.getpid()}-{next(_MEMORY_IDS)}/store"
    yield url
    import fsspec

    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://").rsplit("/", 1)[0]
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits
    make them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def projection_beside(monkeypatch):
    """A CPU sketch projected on its helper thread, whatever torch's thread count."""
    from koopkit.record import recorder

    monkeypatch.setattr(recorder, "a_core_is_free", lambda: True)


@pytest.fixture
def restore_sigterm():
    """The Recorder installs a SIGTERM handler while open; never let one leak between tests."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture
def tiny_model():
    """A seeded two-layer MLP factory: ``tiny_model(seed=0, dtype=None)``."""
    import torch

    def make(seed: int = 0, dtype=None):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        return model if dtype is None else model.to(dtype)

    return make


@pytest.fixture
def cli_runner():
    """Run the root ``koopkit`` click group in-process: ``cli_runner(*args) -> Result``."""
    from click.testing import CliRunner

    from koopkit.cli import cli

    runner = CliRunner()
    return lambda *args: runner.invoke(cli, [str(a) for a in args], prog_name="koopkit")


@pytest.fixture(scope="session")
def run_python():
    """Run ``python -c code`` (or a script) in a fresh interpreter; returns CompletedProcess."""

    def run(*args, timeout=120, env=None, **kwargs):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            **kwargs,
        )

    return run


@pytest.fixture(scope="session")
def run_koopkit(run_python):
    """Run the ``koopkit`` command in a fresh interpreter: ``run_koopkit(*args, env=None)``."""
    launcher = "import sys; from koopkit.cli import main; sys.argv[0] = 'koopkit'; main()"
    return lambda *args, **kwargs: run_python("-c", launcher, *map(str, args), **kwargs)


@pytest.fixture
def zip_directory():
    """``zip_directory(folder, target)``: a zip of the folder's files, as a zipped store is."""
    import zipfile

    def make(directory, target):
        with zipfile.ZipFile(target, "w") as zf:
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(directory).as_posix())
        return target

    return make
