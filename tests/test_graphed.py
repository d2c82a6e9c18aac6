"""When a GraphedFill captures, replays and runs the fill itself (the CUDA replay itself is
checked in tests/test_cuda.py; here a stand-in graph records what would be replayed)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from koopkit.record import graphed as graphed_module
from koopkit.record.graphed import GraphedFill


class StandInGraph:
    def __init__(self, fill, tensors, out):
        self.fill, self.tensors, self.out, self.replays = fill, tensors, out, 0

    def replay(self):
        self.replays += 1
        self.fill(self.tensors, self.out)  # a graph reads what it was captured with


def graphed_sum(monkeypatch, broken=False):
    calls = []

    def fill(tensors, out):
        calls.append([t.data_ptr() for t in tensors])
        out.copy_(sum(t.sum() for t in tensors))
        return out

    def record(self, tensors, out):
        if broken:
            raise RuntimeError("operation not permitted when stream is capturing")
        return StandInGraph(self.fill, list(tensors), out)

    monkeypatch.setattr(GraphedFill, "_capture", record)
    return GraphedFill(fill), calls


def test_captured_on_the_second_call_at_the_same_addresses_and_replayed_after(monkeypatch):
    graphed, calls = graphed_sum(monkeypatch)
    a, b, out = torch.ones(3), torch.ones(2, 2), torch.zeros(())
    assert graphed([a, b], out) == 7 and graphed.graph is None
    graphed([a, b], out)
    graph = graphed.graph
    assert graph is not None and graph.replays == 1
    a.mul_(2)  # in place: the addresses hold
    assert graphed([a, b], out) == 10
    assert graphed.graph is graph and graph.replays == 2


def test_a_moved_source_or_destination_runs_the_fill_and_drops_the_graph(monkeypatch):
    graphed, _ = graphed_sum(monkeypatch)
    a, b, out = torch.ones(3), torch.ones(2), torch.zeros(())
    graphed([a, b], out)
    graphed([a, b], out)
    moved = torch.full((2,), 5.0)  # another tensor, at another address
    assert graphed([a, moved], out) == 13 and graphed.graph is None
    other = torch.zeros(())
    assert graphed([a, moved], other) == 13 and graphed.graph is None
    graphed([a, moved], other)
    assert graphed.graph.replays == 1  # captured again once the addresses held twice


def test_the_same_address_with_another_shape_stride_or_dtype_is_a_move(monkeypatch):
    graphed, _ = graphed_sum(monkeypatch)
    base, out = torch.arange(6.0), torch.zeros(())
    for view in (base, base[:4], base.view(2, 3), base.view(3, 2).t(), base.view(torch.int32)):
        graphed([view], out)
        assert graphed.graph is None, view.shape
    graphed([base.view(torch.int32)], out)
    assert graphed.graph is not None


def test_a_failed_capture_raises_keeps_no_graph_and_is_not_tried_again(monkeypatch):
    graphed, calls = graphed_sum(monkeypatch, broken=True)
    a, out = torch.ones(3), torch.zeros(())
    graphed([a], out)
    with pytest.raises(RuntimeError, match="capturing"):
        graphed([a], out)
    assert graphed.graph is None and len(calls) == 1
    for _ in range(3):  # the stand-in would raise again if asked to capture
        assert graphed([a], out) == 3
    assert graphed.eager and graphed.graph is None and len(calls) == 4


def test_tensors_that_are_not_capturable_run_the_fill_from_then_on(monkeypatch):
    graphed, calls = graphed_sum(monkeypatch)
    graphed.capturable = lambda tensors: tensors[0].is_contiguous()
    a, out = torch.ones(2, 3).t(), torch.zeros(())
    for _ in range(3):
        assert graphed([a], out) == 6
    assert graphed.eager and graphed.graph is None and len(calls) == 3


class FakeCapture:
    """torch.cuda's capture calls, recorded; ``capture_end`` fails as CUDA's does after a
    failed fill ("operation failed due to a previous error during capture")."""

    def __init__(self, log):
        self.log, self.failed = log, False

    def capture_begin(self, capture_error_mode):
        self.log.append(("begin", capture_error_mode))

    def capture_end(self):
        self.log.append("end")
        if self.failed:
            raise RuntimeError("capture invalidated")


def test_a_fill_that_fails_during_capture_raises_its_own_error(monkeypatch):
    """And the capture is ended either way, so the stream is not left capturing."""
    log = []
    graph = FakeCapture(log)

    def fill(tensors, out):
        graph.failed = True
        raise ValueError("the fill's own error")

    class Side:
        def __init__(self, device):
            pass

        def wait_stream(self, stream):
            log.append(("side waits for", stream))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graph)
    monkeypatch.setattr(torch.cuda, "Stream", Side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: "main")
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    graphed = GraphedFill(fill)
    with pytest.raises(ValueError, match="own error"):
        graphed._capture([torch.ones(2)], torch.zeros(()))
    assert log == [("side waits for", "main"), ("begin", "thread_local"), "end"]


def test_graphs_dropped_before_they_pay_stop_the_capturing(monkeypatch):
    graphed, calls = graphed_sum(monkeypatch)
    out, pair = torch.zeros(()), [torch.ones(3), torch.ones(3)]
    for i in range(2 * graphed_module.MAX_WASTED + 1):
        graphed([pair[i // 2 % 2]], out)  # two calls at each address, then the other
    assert graphed.wasted == graphed_module.MAX_WASTED and graphed.eager
    before = len(calls)
    for _ in range(3):
        assert graphed([pair[0]], out) == 3 and graphed.graph is None
    assert len(calls) == before + 3  # the fill itself, every time


def test_graphs_that_paid_for_their_capture_do_not_count(monkeypatch):
    graphed, _ = graphed_sum(monkeypatch)
    out, pair = torch.zeros(()), [torch.ones(3), torch.ones(3)]
    for i in range(graphed_module.MAX_WASTED + 2):  # moves, each after a paying graph
        for _ in range(graphed_module.PAYS_AFTER + 1):
            graphed([pair[i % 2]], out)
        assert graphed.graph.replays == graphed_module.PAYS_AFTER
    assert graphed.wasted == 0 and not graphed.eager
