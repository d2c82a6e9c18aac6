"""A CUDA fill replayed as one captured graph while its tensors stay where they are.

A CountSketch's fill on CUDA is a zero, a copy per group of small tensors and a Triton
launch per group. On the host that takes longer than the kernels take on the GPU, and a
training loop bound by kernel launches pays it as step time. Replaying a CUDA graph of the
same kernels is one launch.

A graph reads and writes the addresses it was captured with. So it is replayed only while
every source and the destination sit at those addresses with the same shape, strides and
dtype. It is captured once they have held for two calls in a row. Otherwise the fill runs
as before, for example for gradients set to None and allocated anew at each step. Where
graphs keep being dropped soon after their capture (each capture costs more than a fill),
capturing stops.
"""

from __future__ import annotations

import torch

PAYS_AFTER = 16  # replays after which a graph has paid for its capture
MAX_WASTED = 8  # graphs dropped before paying, after which the fill always runs as it is


def _addresses(tensors, out) -> list:
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in (*tensors, out)]


class GraphedFill:
    """``fill(tensors, out)`` replayed from a CUDA graph when the addresses repeat.

    ``fill`` must launch the same kernels for the same addresses and make no host
    synchronisation, as the fused CountSketch does. ``capturable(tensors)`` says whether a
    capture of the fill would keep no large temporary in the graph's memory pool; where it
    does not hold, the fill runs as it is from then on. A capture that fails raises (torch's
    caching allocator can be left holding memory after one, so it is not hidden) and is
    never tried again. Calls come from one thread; the graph is replayed on the current
    stream, in order with the work around it.
    """

    def __init__(self, fill, capturable=lambda tensors: True):
        self.fill = fill
        self.capturable = capturable
        self.addresses = None  # of the last call
        self.graph = None  # captured at ``addresses``
        self.replays = 0  # of ``graph``
        self.wasted = 0  # graphs dropped before PAYS_AFTER replays
        self.eager = False  # MAX_WASTED were: no more graphs
        self._stream = None  # where graphs are captured (never the legacy default stream)

    def __call__(self, tensors, out: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fill(tensors, out)
        addresses = _addresses(tensors, out)
        if addresses != self.addresses:
            self._drop()
            self.addresses = addresses
            return self.fill(tensors, out)
        if self.graph is None:
            if not self.capturable(tensors):
                self.eager = True
                return self.fill(tensors, out)
            try:
                self.graph = self._capture(tensors, out)
            except BaseException:
                self.eager = True  # each failed capture can leave the allocator worse off
                raise
        self.graph.replay()
        self.replays += 1
        return out

    def _drop(self) -> None:
        if self.graph is not None and self.replays < PAYS_AFTER:
            self.wasted += 1
            self.eager = self.wasted >= MAX_WASTED
        self.graph, self.replays = None, 0

    def _capture(self, tensors, out):
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
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:  # "capture invalidated": the fill's error says why
                    pass
                raise
            graph.capture_end()
        return graph
