"""A CUDA fill replayed as one captured graph while its tensors stay where they are.

A CountSketch's fill on CUDA is a zero, a copy per group of small tensors and a Triton
launch per group. On the host that takes longer than the kernels take on the GPU, and a
training loop bound by kernel launches pays it as step time. Replaying a CUDA graph of the
same kernels is one launch.

A graph reads and writes the addresses it was captured with. So it is replayed only while
every source and the destination sit at those addresses with the same shape, strides and
dtype. It is captured once they have held for two calls in a row. Otherwise the fill runs
as before, for example for gradients set to None and allocated anew at each step. Where
the addresses keep moving after captures (each costs more than a fill), capturing stops.
"""

from __future__ import annotations

import torch

MAX_CAPTURES = 16  # past this many, the addresses move too often for a graph to pay


def _addresses(tensors, out) -> list:
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in (*tensors, out)]


class GraphedFill:
    """``fill(tensors, out)`` replayed from a CUDA graph when the addresses repeat.

    ``fill`` must launch the same kernels for the same addresses and make no host
    synchronisation, as the fused CountSketch does. Calls come from one thread; the graph
    is replayed on the current stream, in order with the work around it.
    """

    def __init__(self, fill):
        self.fill = fill
        self.addresses = None  # of the last call
        self.graph = None  # captured at ``addresses``
        self.captures = 0
        self.eager = False  # a capture failed, or too many were made: no more graphs
        self._stream = None  # where graphs are captured (never the legacy default stream)

    def __call__(self, tensors, out: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fill(tensors, out)
        addresses = _addresses(tensors, out)
        if addresses != self.addresses:
            self.addresses, self.graph = addresses, None
            return self.fill(tensors, out)
        if self.graph is None:
            self.graph = self._capture(tensors, out)
            if self.graph is None:
                return self.fill(tensors, out)
        self.graph.replay()
        return out

    def _capture(self, tensors, out):
        """A graph of ``fill(tensors, out)``, or None (and eager from then on) where the
        capture fails or MAX_CAPTURES were made."""
        self.captures += 1
        if self.captures <= MAX_CAPTURES:
            try:
                return self._record(tensors, out)
            except RuntimeError:
                pass
        self.eager = True
        return None

    def _record(self, tensors, out):
        """Capture ``fill(tensors, out)`` into a new CUDA graph, "thread_local", so the
        writer thread may wait on its events meanwhile."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=out.device)
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(torch.cuda.current_stream(out.device))
        with torch.cuda.stream(self._stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.fill(tensors, out)
            finally:
                graph.capture_end()
        return graph
