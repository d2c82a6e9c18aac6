"""The CountSketch as one fused Triton kernel per tensor: each tile read once, hashed on the fly.

Program (p, c) owns buckets [c * BLOCK, (c + 1) * BLOCK) and a run of TILES tiles. For each
tile it loads the coordinates that rotate into its buckets (one contiguous, coalesced
window that wraps at most once), computes their signs from the per-tile key with the same
32-bit mixer as the torch reference (``koopkit.record.sketch``), and accumulates in
registers; one atomic add per bucket and program ends it. No per-coordinate tables, no
per-coordinate atomics: the kernel is bound by reading the parameters.

Imported only on CUDA devices where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024  # buckets per program
MAX_TILES = 64  # tiles per program


@triton.jit
def _lowbias32(x):
    """C. Wellons' lowbias32 on int64 holding uint32, as ``sketch._lowbias32``."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _countsketch_kernel(
    x_ptr,
    out_ptr,
    tile_offsets_ptr,
    tile_keys_ptr,
    offset,
    numel,
    dim,
    first_tile,
    last_tile,
    TILES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    buckets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_dim = buckets < dim
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = first_tile + tl.program_id(0).to(tl.int64) * TILES
    for i in range(tl.minimum(last_tile - base + 1, TILES)):
        tile = base + i
        rotation = tl.load(tile_offsets_ptr + tile)
        key = tl.load(tile_keys_ptr + tile)
        lane = buckets - rotation  # the coordinate of this tile that lands in each bucket
        lane = tl.where(lane < 0, lane + dim, lane)
        local = tile * dim + lane - offset
        keep = in_dim & (local >= 0) & (local < numel)
        value = tl.load(x_ptr + local, mask=keep, other=0.0).to(tl.float32)
        bit = _lowbias32((lane + key) & 0xFFFFFFFF) >> 31
        acc += tl.where(bit == 0, value, -value)
    tl.atomic_add(out_ptr + buckets, acc, mask=in_dim)


def supports(out: torch.Tensor) -> bool:
    """The kernel sums in float32 into a contiguous float32 output on a CUDA device."""
    return out.dtype == torch.float32 and out.is_contiguous() and out.is_cuda


def accumulate(flat, offset, out, tile_offsets, tile_keys) -> None:
    """out += the sketch of ``flat``, the coordinates [offset, offset + numel) of the vector."""
    numel = flat.numel()
    if numel == 0:
        return
    dim = out.numel()
    first_tile, last_tile = offset // dim, (offset + numel - 1) // dim
    tiles = last_tile - first_tile + 1
    per_program = min(MAX_TILES, triton.next_power_of_2(tiles))
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(tiles, per_program), triton.cdiv(dim, block))
    with torch.cuda.device(out.device):  # Triton launches on the current device
        _countsketch_kernel[grid](
            flat.contiguous(),
            out,
            tile_offsets,
            tile_keys,
            offset,
            numel,
            dim,
            first_tile,
            last_tile,
            TILES=per_program,
            BLOCK=block,
        )
