"""The CUDA paths: the Recorder's side-stream pipeline and the GPU estimator (skipped without a GPU)."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

import koopkit
from koopkit.record import sketch as sketch_module
from koopkit.record.graphed import GraphedFill
from koopkit.record.sketch import make_sketch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).cuda()


def test_recorded_cuda_parameters_equal_the_model_bit_for_bit(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reference = []
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()  # noqa: E731
    with koopkit.Recorder(
        tmp_path / "s.zarr", "cuda/run", model, every=1, max_inflight_bytes=64 * 1024
    ) as rec:
        reference.append(flat())
        for _ in range(40):
            x = torch.randn(16, 32, device="cuda")
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
            reference.append(flat())
    run = koopkit.open_run(tmp_path / "s.zarr", "cuda/run")
    assert np.array_equal(run["params"]["value"].values, torch.stack(reference).numpy())
    assert run["scalars/loss"]["value"].shape == (40,)


@pytest.mark.parametrize("sketch", [None, 16])
def test_a_loop_on_its_own_stream_keeps_it_and_records_its_values(tmp_path, sketch):
    """rec.step switches to its side stream and back: the loop's stream is current after
    each step, and the rows are those its work on that stream produced."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # noqa: E731
    loop, reference = torch.cuda.Stream(), []
    loop.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(loop):
        with koopkit.Recorder(tmp_path / "s.zarr", "r", model, every=1, sketch=sketch) as rec:
            reference.append(flat().clone())
            for _ in range(20):
                model(torch.randn(16, 32, device="cuda")).square().mean().backward()
                opt.step()
                opt.zero_grad()
                rec.step()
                assert torch.cuda.current_stream() == loop
                reference.append(flat().clone())
            project = rec._fillers["params"].keywords["project"]
            if isinstance(project, GraphedFill):  # the sketch was replayed on the loop's stream
                assert project.graph is not None and project.replays > 10
        loop.synchronize()
    stored = koopkit.open_run(tmp_path / "s.zarr", "r")["params"]["value"].values
    expected = torch.stack(reference).cpu()
    if sketch is not None:
        cpu = make_sketch("countsketch", sketch, expected.shape[1], 0, "cpu")
        expected = torch.stack([cpu.project([row], torch.empty(sketch)) for row in expected])
        np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-6)
    else:
        assert np.array_equal(stored, expected.numpy())


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_loop_that_switches_streams_gets_the_sketches_of_each_step(tmp_path, dtype):
    """Params and grads share the sketch's group buffer: a fill on the new stream waits
    for the other series' last fill on the old one. Both series are replayed from graphs."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    flat = lambda grads: torch.cat(  # noqa: E731
        [(p.grad if grads else p).detach().reshape(-1) for p in model.parameters()]
    )
    streams, params, grads = [torch.cuda.Stream(), torch.cuda.Stream()], [], []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    with koopkit.Recorder(
        tmp_path / "s.zarr", "r", model, sketch=16, grads=True, initial=False, dtype=dtype
    ) as rec:
        for i in range(24):
            stream = streams[i % 2]
            stream.wait_stream(streams[(i + 1) % 2])  # the loop's own work stays in order
            with torch.cuda.stream(stream):
                model(torch.randn(16, 32, device="cuda")).square().mean().backward()
                opt.step()
                rec.step()
                params.append(flat(False).clone())
                grads.append(flat(True).clone())
                opt.zero_grad(set_to_none=False)
        for path in ("params", "grads"):
            project = rec._fillers[path].keywords["project"]
            assert isinstance(project, GraphedFill) and project.replays > 10, path
        torch.cuda.synchronize()
    run = koopkit.open_run(tmp_path / "s.zarr", "r")
    cpu = make_sketch("countsketch", 16, params[0].numel(), 0, "cpu")
    tolerance = {"float32": 1e-5, "float16": 2e-3}[dtype]
    for path, rows in (("params", params), ("grads", grads)):
        expected = torch.stack([cpu.project([row.cpu()], torch.empty(16)) for row in rows])
        stored = run[path]["value"].values.astype(np.float32)
        np.testing.assert_allclose(stored, expected.numpy(), rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("sketch", [None, 16])
def test_a_model_on_a_device_that_is_not_the_current_one(tmp_path, sketch):
    """Events, copies and Triton launches go to the model's device, not the current one."""
    torch.cuda.set_device(0)
    model = _model().to("cuda:1")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()  # noqa: E731
    losses, reference = [], []
    with koopkit.Recorder(tmp_path / "s.zarr", "r", model, sketch=sketch) as rec:
        reference.append(flat())
        for _ in range(12):
            loss = model(torch.randn(16, 32, device="cuda:1")).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
            losses.append(loss.item())
            reference.append(flat())
    run = koopkit.open_run(tmp_path / "s.zarr", "r")
    expected = torch.stack(reference)
    if sketch is not None:
        cpu = make_sketch("countsketch", sketch, expected.shape[1], 0, "cpu")
        expected = torch.stack([cpu.project([row], torch.empty(sketch)) for row in expected])
    np.testing.assert_allclose(run["params"]["value"].values, expected.numpy(), atol=1e-5)
    assert np.array_equal(run["scalars/loss"]["value"].values, np.float32(losses))


def test_step_never_synchronises_the_host(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16, 32, device="cuda")
    with koopkit.Recorder(tmp_path / "s.zarr", "sync/run", model, every=1, sketch=64) as rec:
        for _ in range(3):  # warm up allocations outside the check
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
        torch.cuda.synchronize()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns that the debug mode is experimental
                torch.cuda.set_sync_debug_mode("error")
            for _ in range(20):
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                rec.step(loss=loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert koopkit.open_store(tmp_path / "s.zarr").run("sync/run").committed("params") == 24


def test_cuda_countsketch_equals_the_cpu_sketch():
    x = torch.randn(100_003)
    cpu = make_sketch("countsketch", 512, x.numel(), 3, "cpu").project([x], torch.zeros(512))
    gpu = make_sketch("countsketch", 512, x.numel(), 3, "cuda").project(
        [x.cuda()], torch.zeros(512, device="cuda")
    )
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


@needs_triton
@pytest.mark.parametrize("k", [8192, 1000, 7])
@pytest.mark.parametrize("group", [1 << 26, 5000])
def test_fused_countsketch_kernel_equals_the_torch_reference(k, group, monkeypatch):
    """Tensors that start and end inside tiles, bf16 and fp16 inputs, k not a power of two,
    small tensors concatenated into groups of either size."""
    monkeypatch.setattr(sketch_module, "_GROUP", group)
    g = torch.Generator().manual_seed(k)
    shapes = [(37,), (300, 11), (1,), (2 * k + 5,), (64, 64)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    tensors = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    n = sum(t.numel() for t in tensors)
    fused = make_sketch("countsketch", k, n, 11, "cuda")
    assert fused._fused is not None
    got = fused.project([t.cuda() for t in tensors], torch.zeros(k, device="cuda"))
    reference = make_sketch("countsketch", k, n, 11, "cpu").project(
        [t.double() for t in tensors], torch.zeros(k, dtype=torch.float64)
    )
    torch.testing.assert_close(got.cpu().double(), reference, rtol=1e-5, atol=1e-4)
    # float64 output falls back to the torch path on the device, with the same answer
    wide = fused.project(
        [t.cuda().double() for t in tensors], torch.zeros(k, device="cuda").double()
    )
    torch.testing.assert_close(wide.cpu(), reference, rtol=1e-10, atol=1e-10)


@needs_triton
def test_a_replayed_sketch_equals_the_sketch_of_the_values_now(monkeypatch):
    """The graph reads the tensors' memory at each replay, not the values it was captured
    with; a tensor moved elsewhere is sketched where it is now, and the graph dropped."""
    monkeypatch.setattr(sketch_module, "_GROUP", 5000)  # groups: the copy into the buffer too
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = [torch.randn(s, device="cuda", generator=g) for s in [(37,), (70, 70), (9000,)]]
    n = sum(t.numel() for t in tensors)
    sketch = make_sketch("countsketch", 256, n, 5, "cuda")
    graphed, out = GraphedFill(sketch.project), torch.empty(256, device="cuda")

    def check():
        expected = sketch.project(tensors, torch.empty(256, device="cuda"))
        torch.testing.assert_close(graphed(tensors, out).clone(), expected, rtol=0, atol=1e-5)

    for _ in range(2):
        check()
    assert graphed.graph is not None and not graphed.eager
    for _ in range(3):
        for t in tensors:
            t.mul_(-1.5).add_(0.25)
        check()  # replayed
    graph, tensors[1] = graphed.graph, tensors[1] + 1  # a new tensor at another address
    check()
    assert graphed.graph is None
    check()
    assert graphed.graph is not None and graphed.graph is not graph


@needs_triton
def test_only_the_fused_sketch_is_replayed_from_a_graph(tmp_path):
    """Not the torch path (float64), whose temporaries a graph's pool would keep, nor the
    Gaussian sketch, drawn on the host."""
    sketch = make_sketch("countsketch", 64, 1000, 0, "cuda")
    assert sketch.graphable(torch.float32) and sketch.graphable(torch.bfloat16)
    assert not sketch.graphable(torch.float64)
    assert not make_sketch("gaussian", 64, 1000, 0, "cuda").graphable(torch.float32)
    for dtype, graphed in (("float32", True), ("float16", True), ("float64", False)):
        store = tmp_path / f"{dtype}.zarr"
        with koopkit.Recorder(store, "r", _model(), sketch=16, dtype=dtype) as rec:
            project = rec._fillers["params"].keywords["project"]
            assert isinstance(project, GraphedFill) is graphed, dtype


def test_gpu_dmd_matches_cpu():
    rng = np.random.default_rng(0)
    data = np.cumsum(rng.standard_normal((200, 20_000)), axis=0).astype(np.float32)
    cpu = koopkit.estimate(data, "dmd", rank=10)
    gpu = koopkit.estimate(torch.from_numpy(data).cuda(), "dmd", rank=10, device="cuda")
    assert np.allclose(
        np.sort_complex(cpu.eigenvalues), np.sort_complex(gpu.eigenvalues), atol=1e-8
    )
