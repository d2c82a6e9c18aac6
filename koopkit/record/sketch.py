"""Seeded random projections that keep a huge parameter vector in k numbers per snapshot.

Both sketches are linear maps S (k x n) applied on the device where the parameters live.
Exact DMD eigenvalues are invariant under a linear map that is injective on the span of the
snapshots, so with k comfortably above the number of snapshots the sketched trajectory has
the same full-rank spectrum; with rank truncation the geometry must also be kept
(Johnson-Lindenstrauss), which is why the expected inner-product error is tested.

References: Charikar, Chen & Farach-Colton (2002), CountSketch; Woodruff (2014),
"Sketching as a Tool for Numerical Linear Algebra".
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import threading
import warnings

import torch

from .transfer import Flattener

METHODS = ("countsketch", "gaussian")
_TABLE_LIMIT = 1 << 28  # above this many parameters, hash on the fly instead of caching tables
_GROUP = 1 << 26  # the fused kernel sketches tensors smaller than this in groups


def _signed(value: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_MASK32 = 0xFFFFFFFF


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(index: torch.Tensor, key: int) -> torch.Tensor:
    """SplitMix64 finaliser of (index + key * golden): every output bit depends on every input bit.

    int64 multiplication wraps, which is exactly the arithmetic modulo 2**64 the mixer needs.
    """
    x = index + _signed((key * _GOLDEN) % (1 << 64))
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    return x ^ _shift(x, 31)


def _fused_kernel(device: torch.device):
    """The Triton kernel module on CUDA devices where Triton is installed, else None."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    from . import fused_sketch

    return fused_sketch


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (C. Wellons' lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


class CountSketch:
    """y[h(i)] += s(i) * x[i]: a seeded signed bucket map with tile-rotation hashing.

    The coordinates are cut into tiles of k consecutive entries; tile t is rotated by a
    seeded offset a_t, so coordinate i = t * k + j lands in bucket (j + a_t) mod k. Two
    coordinates of different tiles collide with probability 1/k (as in CountSketch), two of
    the same tile never do, so inner-product errors are at most CountSketch's. Signs are
    s(i) = +-1 from a 32-bit mix of j and a seeded per-tile key. The structure lets a
    fused GPU kernel read each tile contiguously and hash on the fly
    (``koopkit.record.fused_sketch``); this torch code is the reference and the fallback.

    O(n) per snapshot. For vectors up to 2**28 entries the torch path caches the map on
    first use: on CPU as a sparse k x n matrix (CSR, one entry per tile in each bucket's
    row), whose product with the vector sums each bucket in one pass, in parallel over
    buckets; on other devices as per-coordinate bucket and sign tables for ``scatter_add_``.
    Above 2**28 it hashes on the fly, in slices, to bound memory.
    """

    method = "countsketch"
    hash = "tile-rotation"  # recorded with the sketch: another hash is another map

    def __init__(self, dim: int, size: int, seed: int = 0, device="cpu"):
        self.dim, self.size, self.seed = int(dim), int(size), int(seed)
        self.device = torch.device(device)
        tiles = torch.arange(-(-self.size // self.dim), device=self.device, dtype=torch.int64)
        # per tile: the rotation a_t in [0, k) and the sign key, both from seeded SplitMix64
        self.tile_offsets = torch.remainder(_shift(_mix(tiles, 2 * self.seed + 1), 1), self.dim)
        self.tile_keys = _mix(tiles, 2 * self.seed + 2) & _MASK32
        self._fused = _fused_kernel(self.device)
        self._buffer = None  # where the fused path concatenates small tensors
        self._shapes, self._groups = None, []  # the fused path's runs, planned per layout
        self._tables = None  # per-coordinate buckets and signs, made on first use
        self._matrices = {}  # dtype -> the map as a CSR matrix (on CPU), made on first use
        self._tables_lock = threading.Lock()  # params and grads may project at once

    def _buckets_and_signs(self, start: int, stop: int):
        index = torch.arange(start, stop, device=self.device, dtype=torch.int64)
        tile = index // self.dim
        lane = index - tile * self.dim
        buckets = torch.remainder(lane + self.tile_offsets[tile], self.dim)
        bits = _lowbias32((lane + self.tile_keys[tile]) & _MASK32) >> 31
        return buckets, bits.to(torch.float32).mul_(-2).add_(1)

    def _matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The map as a CSR matrix of ``dtype``, made once however many threads ask."""
        with self._tables_lock:
            if dtype not in self._matrices:
                self._matrices[dtype] = self._csr(dtype)
            return self._matrices[dtype]

    def _csr(self, dtype: torch.dtype) -> torch.Tensor:
        """The k x n CSR matrix of the map. Row b holds bucket b's coordinates, one per
        tile: lane (b - a_t) mod k of tile t, in increasing order, as ``scatter_add_`` adds
        them."""
        tiles = torch.arange(len(self.tile_offsets), dtype=torch.int64)
        lanes = torch.remainder(
            torch.arange(self.dim, dtype=torch.int64)[:, None] - self.tile_offsets, self.dim
        )  # (bucket, tile)
        index = tiles * self.dim + lanes
        kept = index < self.size  # the last tile may be partial
        bits = _lowbias32((lanes + self.tile_keys) & _MASK32) >> 31
        rows = torch.zeros(self.dim + 1, dtype=torch.int32)
        rows[1:] = kept.sum(dim=1).cumsum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "Sparse CSR tensor support is in beta state"
            return torch.sparse_csr_tensor(
                rows,
                index[kept].to(torch.int32),
                (1 - 2 * bits[kept]).to(dtype),
                size=(self.dim, self.size),
                check_invariants=False,
            )

    def graphable(self, dtype: torch.dtype) -> bool:
        """Whether projecting into an ``out`` of ``dtype`` runs the fused kernel, whose
        fixed sequence of kernels a CUDA graph can replay (``koopkit.record.graphed``).

        Not the torch path: captured, its temporaries (hundreds of MB) would stay reserved
        in the graph's memory pool. A float16 or bfloat16 ``out``'s float32 temporary is
        k values.
        """
        return self._fused is not None and dtype in (torch.float32, torch.float16, torch.bfloat16)

    def capturable(self, tensors) -> bool:
        """Whether a CUDA graph of the fused projection of ``tensors`` keeps no copy of
        them: a tensor sketched on its own that is not contiguous is flattened into a
        temporary, which a graph's pool would keep for the graph's life."""
        groups = self._plan(tensors, tensors[0].device)
        return all(tensors[g[0]].is_contiguous() for g in groups if g[4] is None)

    @torch.no_grad()  # rather than a detach per tensor, as in flatten_into
    def project(self, tensors, out: torch.Tensor) -> torch.Tensor:
        """Sketch the concatenation of ``tensors`` (flattened, in order) into ``out``.

        Sums run in at least float32; a float16 or bfloat16 ``out`` gets the rounded result.
        """
        if out.dtype in (torch.float16, torch.bfloat16):
            wide = torch.empty(out.shape, dtype=torch.float32, device=out.device)
            return out.copy_(self.project(tensors, wide))
        out.zero_()
        if self._fused is not None and self._fused.supports(out):
            self._project_fused(tensors, out)
            return out
        flats = [t.reshape(-1) for t in tensors]
        total = sum(flat.numel() for flat in flats)
        if total != self.size:
            raise ValueError(f"Expected {self.size} coordinates to sketch; got {total}.")
        if self.device.type == "cpu" and self.size <= _TABLE_LIMIT:
            x = flats[0] if len(flats) == 1 else torch.cat(flats)
            return torch.mv(self._matrix(out.dtype), x.to(out.dtype), out=out)
        offset = 0
        for flat in flats:
            self._accumulate(flat, offset, out)
            offset += flat.numel()
        return out

    def _project_fused(self, tensors, out):
        """One kernel launch per group of small tensors, copied into a reused buffer.

        A launch costs tens of microseconds on the host, a model has hundreds of tensors,
        and the copy into the buffer is one ``Flattener`` fill per group. The buffer (at
        most 2**26 float32, 256 MiB) lives as long as the sketch and is reused call after
        call, so calls on different CUDA streams must be ordered by the caller, as the
        Recorder orders its series' fills when the loop changes streams.
        """
        for first, stop, offset, flat, flatten in self._plan(tensors, out.device):
            if flatten is None:  # one tensor: sketched where it lies
                self._launch(tensors[first].reshape(-1), offset, out)
            else:
                flatten.copy(tensors[first:stop])  # planned with the groups
                self._launch(flat, offset, out)
        return out

    def _plan(self, tensors, device):
        """The groups of ``_plan_groups`` for these tensors' shapes, planned once per layout."""
        shapes = [t.shape for t in tensors]
        if shapes != self._shapes:
            self._groups, self._shapes = self._plan_groups(shapes, tensors, device), shapes
        return self._groups

    def _plan_groups(self, shapes, tensors, device):
        """Runs of consecutive tensors, each sketched by one launch: (first, stop, offset,
        flat, flatten), ``flatten`` a Flattener planned to fill the buffer's head ``flat``,
        or None for a run of one.

        A tensor of at least 2**26 entries is a run of its own; smaller ones join a run while
        it stays within 2**26 entries.
        """
        sizes = [math.prod(shape) for shape in shapes]
        if sum(sizes) != self.size:
            raise ValueError(f"Expected {self.size} coordinates to sketch; got {sum(sizes)}.")
        groups, first, offset, size = [], 0, 0, 0  # size: of the run from first to i
        for i, n in enumerate([*sizes, None]):
            if i > first and (n is None or n >= _GROUP or size + n > _GROUP):
                flat = flatten = None
                if i - first > 1:
                    if self._buffer is None:
                        self._buffer = torch.empty(min(_GROUP, self.size), device=device)
                    flat, flatten = self._buffer[:size], Flattener()
                    flatten.plan(flat, shapes[first:i], tensors[first:i])
                groups.append((first, i, offset, flat, flatten))
                first, offset, size = i, offset + size, 0
            size += n or 0
        return groups

    def _launch(self, flat, offset, out):
        self._fused.accumulate(flat, offset, out, self.tile_offsets, self.tile_keys)

    def _accumulate(self, flat, offset, out):
        step = 1 << 24
        for start in range(0, flat.numel(), step):
            part = flat[start : start + step]
            lo, hi = offset + start, offset + start + part.numel()
            if self.size > _TABLE_LIMIT:
                buckets, signs = self._buckets_and_signs(lo, hi)
            else:
                with self._tables_lock:  # made once, not once per projecting thread
                    if self._tables is None:
                        self._tables = self._buckets_and_signs(0, self.size)
                buckets, signs = self._tables[0][lo:hi], self._tables[1][lo:hi]
            # scatter_add_ rather than index_add_: the same sums in the same order on CPU,
            # in about half the time there
            out.scatter_add_(0, buckets, part.to(out.dtype) * signs.to(out.dtype))


class GaussianSketch:
    """y = G x / sqrt(k) with G ~ N(0, 1), regenerated block by block from the seed.

    O(k n) per snapshot: precise JL guarantees, but only affordable for modest n.
    """

    method = "gaussian"
    hash = "cpu-randn-blocks"  # recorded with the sketch: how G is drawn from the seed
    block = 1 << 16

    def __init__(self, dim: int, size: int, seed: int = 0, device="cpu"):
        self.dim, self.size, self.seed = int(dim), int(size), int(seed)
        self.device = torch.device(device)

    def graphable(self, dtype: torch.dtype) -> bool:
        """Never: G is drawn on the host at every call, which a CUDA graph cannot replay."""
        return False

    def matrix_block(self, j: int, width: int) -> torch.Tensor:
        """Block j of G, drawn on the CPU so the seed alone determines it on every device."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        block = torch.randn(self.dim, width, generator=g)
        return (block / self.dim**0.5).to(self.device)

    def project(self, tensors, out: torch.Tensor) -> torch.Tensor:
        """Sketch the concatenation of ``tensors`` (flattened, in order) into ``out``.

        Sums run in at least float32; a float16 or bfloat16 ``out`` gets the rounded result.
        """
        if out.dtype in (torch.float16, torch.bfloat16):
            wide = torch.empty(out.shape, dtype=torch.float32, device=out.device)
            return out.copy_(self.project(tensors, wide))
        x = torch.cat([t.detach().reshape(-1).to(out.dtype) for t in tensors])
        out.zero_()
        for j, start in enumerate(range(0, self.size, self.block)):
            stop = min(start + self.block, self.size)
            out.addmv_(self.matrix_block(j, stop - start).to(out.dtype), x[start:stop])
        return out


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sketch(method: str, dim: int, seed: int) -> tuple[str, int, int]:
    """Validate a sketch's method, width and seed; returns them with Python ints."""
    if method not in METHODS:
        raise ValueError(f"Invalid sketch_method={method!r}; expected one of {', '.join(METHODS)}.")
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"Invalid sketch={dim!r}; expected a positive int (the sketch width k).")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"Invalid sketch seed={seed!r}; expected an int >= 0.")
    return method, int(dim), int(seed)


def make_sketch(method: str, dim: int, size: int, seed: int, device):
    method, dim, seed = check_sketch(method, dim, seed)
    cls = CountSketch if method == "countsketch" else GaussianSketch
    return cls(dim, size, seed, device)
