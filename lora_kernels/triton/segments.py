"""Where a program's work lies in a heterogeneous batch: token tiles of slot segments, packed-slice
bounds, and programmatic dependent launch (PDL) detection.

Shared by the segment kernels (:mod:`shrink_expand`, :mod:`seg_grads`) and the fused GEMM
(:mod:`multi_fused`). Everything here reads device metadata inside kernels only: the launch
grids are sized from host ints (``LoRABatch`` upper bounds for a bounded batch), and the
programs past the real work exit at once, so a captured CUDA graph serves any adapter mix.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

# How a token-tile number becomes (slot, rows): named, not bare integers.
TILES_BY_MAP: tl.constexpr = tl.constexpr(0)    # one load from LoRABatch.tile_map (16-row tiles)
TILES_BY_SCAN: tl.constexpr = tl.constexpr(1)   # dense numbering, prefix scan over active slots
TILES_PER_SLOT: tl.constexpr = tl.constexpr(2)  # a fixed number of tiles per active slot

SCAN_MAX_ACTIVE = 4096  # beyond this the per-program prefix scan costs more than empty programs


@triton.jit
def segment_tile(pid_t, tile_map, seg_offsets, active_slots, num_active, tiles_per_seg,
                 BLOCK_M: tl.constexpr, A_BLOCK: tl.constexpr, MODE: tl.constexpr):
    """Map token-tile number ``pid_t`` to ``(slot, first sorted position, segment end)``;
    ``slot = -1`` when the tile holds no work (past the last tile, or padding of a bounded
    batch: ``-1`` entries of ``active_slots`` / ``tile_map``).

    TILES_BY_MAP: row ``pid_t`` of ``tile_map`` (BLOCK_M must be its 16 rows) holds all three,
    so the first useful load (token ids) waits on one metadata load, not three chained ones.
    TILES_BY_SCAN: tiles numbered densely across the active segments (``Σ ceil(len_i /
    BLOCK_M) ≤ ceil(T / BLOCK_M) + A``); every program recomputes the prefix sum of tiles per
    segment from ``seg_offsets`` (A ints, L2-resident), so a Zipf-skewed batch does not launch
    ``A × ceil(max_seg_len / BLOCK_M)`` mostly-empty programs.
    TILES_PER_SLOT: ``tiles_per_seg`` tiles per active segment, the extra ones exit.
    """
    if MODE == TILES_BY_MAP:
        row = tile_map + pid_t * 4
        slot = tl.load(row)
        row_lo = tl.load(row + 1)
        seg_hi = tl.load(row + 2)
    elif MODE == TILES_BY_SCAN:
        a = tl.arange(0, A_BLOCK)
        slots = tl.load(active_slots + a, mask=a < num_active, other=-1)
        am = slots >= 0
        lo = tl.load(seg_offsets + slots + 1, mask=am, other=0)
        hi = tl.load(seg_offsets + slots + 2, mask=am, other=0)
        ntiles = tl.where(am, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
        cum = tl.cumsum(ntiles, 0)
        idx = tl.sum((cum <= pid_t).to(tl.int32), 0)  # segments wholly before this tile
        sel = a == idx
        slot = tl.sum(tl.where(sel, slots, 0), 0)
        first_tile = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
        seg_lo = tl.sum(tl.where(sel, lo, 0), 0)
        seg_hi = tl.sum(tl.where(sel, hi, 0), 0)
        row_lo = seg_lo + (pid_t - first_tile) * BLOCK_M
        # -1 padding sorts last, so idx past the live slots (or onto padding) means no work.
        slot = tl.where((idx < num_active) & (row_lo < seg_hi), slot, -1)
    else:
        a_idx = pid_t // tiles_per_seg
        slot = tl.load(active_slots + a_idx, mask=a_idx < num_active, other=-1)
        seg_lo = tl.load(seg_offsets + slot + 1, mask=slot >= 0, other=0)
        seg_hi = tl.load(seg_offsets + slot + 2, mask=slot >= 0, other=0)
        row_lo = seg_lo + (pid_t % tiles_per_seg) * BLOCK_M
        slot = tl.where(row_lo < seg_hi, slot, -1)
    return slot, row_lo, seg_hi


@triton.jit
def slice_bounds(BOUNDS, j, full, SLICED: tl.constexpr, SLICE_ALIGN: tl.constexpr):
    """Columns [lo, hi) of slice j (the whole [0, full) when unsliced). The alignment hint
    keeps the slices' row segments 16-byte aligned for vector loads/stores."""
    if SLICED:
        return (tl.multiple_of(tl.load(BOUNDS + j), SLICE_ALIGN),
                tl.multiple_of(tl.load(BOUNDS + j + 1), SLICE_ALIGN))
    else:
        return 0, full


def token_tiles(batch, block_m: int) -> tuple[int, int, int, int]:
    """``(grid tiles, MODE, tiles_per_seg, A_BLOCK)`` from the batch's host ints and shapes.

    16-row tiles read ``batch.tile_map`` (its row count is the grid: exact for an exact batch,
    the capacity for a bounded one). Wider tiles: a fixed ``tiles_per_seg`` per active segment
    when that grid is no larger than the dense one; the in-kernel scan otherwise (skewed
    segments), unless A is too large to scan.
    """
    if block_m == batch.TILE_ROWS:
        return batch.tile_map.shape[0], TILES_BY_MAP.value, 1, 16
    A = batch.num_active
    per_seg = max(1, triton.cdiv(batch.max_seg_len, block_m))
    dense = triton.cdiv(batch.num_tokens, block_m) + A
    if A * per_seg <= dense or A > SCAN_MAX_ACTIVE:
        return A * per_seg, TILES_PER_SLOT.value, per_seg, 16
    # A_BLOCK ≥ 16: one compiled variant covers every small batch.
    return dense, TILES_BY_SCAN.value, per_seg, max(16, triton.next_power_of_2(A))


@functools.lru_cache(maxsize=None)
def pdl_supported() -> bool:
    """Programmatic dependent launch: the expand may start while the shrink still runs and
    prefetch its B tiles, waiting (``gdc_wait``) only before it reads the shrink's output.
    Needs Triton's ``gdc_*`` intrinsics and the ``launch_pdl`` launch option (Triton ≥ 3.4;
    the GPU box has 3.6) and an sm_90+ device; never under the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    if os.environ.get("LORA_KERNELS_PDL", "1") == "0":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as tlc
    except ImportError:
        return False
    if not (hasattr(tlc, "gdc_wait") and hasattr(tlc, "gdc_launch_dependents")):
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False
    import torch
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 9
