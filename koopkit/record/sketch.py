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

import torch

METHODS = ("countsketch", "gaussian")
_TABLE_LIMIT = 1 << 28  # above this many parameters, hash on the fly instead of caching tables


def _signed(value: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


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


class CountSketch:
    """y[h(i)] += s(i) * x[i] with seeded universal hashes h (buckets) and s (signs).

    O(n) per snapshot. Bucket and sign tables are cached on the device for vectors up to
    2**28 entries and computed on the fly above that, in slices, to bound memory.
    """

    method = "countsketch"

    def __init__(self, dim: int, size: int, seed: int = 0, device="cpu"):
        self.dim, self.size, self.seed = int(dim), int(size), int(seed)
        self.device = torch.device(device)
        self._keys = (
            2 * self.seed + 1,
            2 * self.seed + 2,
        )  # distinct streams for buckets and signs
        self._tables = self._buckets_and_signs(0, self.size) if self.size <= _TABLE_LIMIT else None

    def _buckets_and_signs(self, start: int, stop: int):
        index = torch.arange(start, stop, device=self.device, dtype=torch.int64)
        buckets = torch.remainder(_shift(_mix(index, self._keys[0]), 1), self.dim)
        signs = (_shift(_mix(index, self._keys[1]), 63)).to(torch.float32).mul_(2).sub_(1)
        return buckets, signs

    def project(self, tensors, out: torch.Tensor) -> torch.Tensor:
        """Sketch the concatenation of ``tensors`` (flattened, in order) into ``out``."""
        out.zero_()
        offset = 0
        for t in tensors:
            flat = t.detach().reshape(-1)
            self._accumulate(flat, offset, out)
            offset += flat.numel()
        return out

    def _accumulate(self, flat, offset, out):
        step = 1 << 24
        for start in range(0, flat.numel(), step):
            part = flat[start : start + step]
            lo, hi = offset + start, offset + start + part.numel()
            if self._tables is not None:
                buckets, signs = self._tables[0][lo:hi], self._tables[1][lo:hi]
            else:
                buckets, signs = self._buckets_and_signs(lo, hi)
            out.index_add_(0, buckets, part.to(out.dtype) * signs.to(out.dtype))


class GaussianSketch:
    """y = G x / sqrt(k) with G ~ N(0, 1), regenerated block by block from the seed.

    O(k n) per snapshot: precise JL guarantees, but only affordable for modest n.
    """

    method = "gaussian"
    block = 1 << 16

    def __init__(self, dim: int, size: int, seed: int = 0, device="cpu"):
        self.dim, self.size, self.seed = int(dim), int(size), int(seed)
        self.device = torch.device(device)

    def matrix_block(self, j: int, width: int) -> torch.Tensor:
        """Block j of G, drawn on the CPU so the seed alone determines it on every device."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        block = torch.randn(self.dim, width, generator=g)
        return (block / self.dim**0.5).to(self.device)

    def project(self, tensors, out: torch.Tensor) -> torch.Tensor:
        """Sketch the concatenation of ``tensors`` (flattened, in order) into ``out``."""
        x = torch.cat([t.detach().reshape(-1).to(out.dtype) for t in tensors])
        out.zero_()
        for j, start in enumerate(range(0, self.size, self.block)):
            stop = min(start + self.block, self.size)
            out.addmv_(self.matrix_block(j, stop - start).to(out.dtype), x[start:stop])
        return out


def make_sketch(method: str, dim: int, size: int, seed: int, device):
    if method not in METHODS:
        raise ValueError(f"Invalid sketch method {method!r}; expected one of {', '.join(METHODS)}.")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"Invalid sketch={dim!r}; expected a positive int (the sketch width k).")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid sketch seed={seed!r}; expected an int >= 0.")
    cls = CountSketch if method == "countsketch" else GaussianSketch
    return cls(dim, size, seed, device)
